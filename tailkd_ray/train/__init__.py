"""Ray Train student training (DESIGN §5, §10, §11): ``loop.py`` (the trainer and the worker loop),
``strategies.py`` (FSDP2 | DDP | DeepSpeed ZeRO-3, AdamW and the schedule), ``checkpoint.py`` (save, resume,
export) and ``runlog.py`` (metrics.jsonl, TensorBoard, eval.json)."""
