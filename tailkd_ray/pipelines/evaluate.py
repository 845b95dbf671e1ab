"""``tailkd eval``: any Hugging Face student against the co-located teacher (exact KL) on the held-out data
(DESIGN §7), in this process.

    _setup_models   the student (wrapped for the chunked metrics) and the teacher, on the GPU if there is one
    validation_dataset   the val blocks: data.val, else the held-out share of data.train
    evaluate        the metrics of core.metrics -> <student>_eval.json beside the student

The metrics go beside the student evaluated (``runs/x/student`` -> ``runs/x/student_eval.json``), never to
``output_dir/eval.json``: pointed at a run's output_dir, an evaluation would otherwise overwrite that run's own
(summary-based) record of its last validation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import torch

from tailkd_ray.config import Config
from tailkd_ray.core.losses import teacher_logits_over
from tailkd_ray.core.metrics import evaluate
from tailkd_ray.data.splits import validation_dataset
from tailkd_ray.errors import DataError
from tailkd_ray.models import StudentWithHead, load_model, load_teacher, shared_vocab_size
from tailkd_ray.runtime import init_ray
from tailkd_ray.train.runlog import write_eval_json

log = logging.getLogger(__name__)


def evaluate_student(cfg: Config, student_path: Union[str, Path]) -> dict:
    """Evaluate the student at ``student_path``; writes ``<student_path>_eval.json`` (``student_eval_path``) and
    returns the metrics, with ``eval_json``: where they were written."""
    init_ray()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, teacher = _setup_models(cfg, student_path, device)
    val_ds = validation_dataset(cfg)
    if val_ds is None:
        raise DataError("no validation data: set data.val, or data.val_fraction > 0 to hold out part of data.train")
    shared_vocab, student_rows = shared_vocab_size(cfg), student.head.weight.shape[0]
    metrics = evaluate(student, val_ds.iter_torch_batches(batch_size=cfg.train.batch_size),
                       teacher=lambda ids: teacher_logits_over(teacher(input_ids=ids).logits, shared_vocab,
                                                               student_rows), k=cfg.loss.k,
                       chunk_tokens=cfg.loss.chunk_tokens, device=device)
    metrics.update(kl_source="exact", student=str(student_path))
    target = student_eval_path(student_path)
    log.info("eval of %s written to %s", student_path, write_eval_json(metrics, target.parent, target.name))
    return {**metrics, "eval_json": str(target)}


def student_eval_path(student_path: Union[str, Path]) -> Path:
    """Where ``tailkd eval`` writes a student's metrics: beside its directory, ``<name>_eval.json``."""
    student = Path(student_path).absolute()
    return student.parent / f"{student.name}_eval.json"


def _setup_models(cfg: Config, student_path: Union[str, Path], device: str):
    """(student, teacher): the student wrapped to run the metrics chunk by chunk from its hidden states."""
    student = load_model(student_path, trust_remote_code=cfg.student.trust_remote_code, device=device)
    return StudentWithHead(student), load_teacher(cfg.teacher, device=device)
