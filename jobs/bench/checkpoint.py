"""``checkpoint``: seconds to persist one training checkpoint, written in place vs written locally and copied.

The trainer's checkpoint is the student's weights plus AdamW's two moments (12 bytes per parameter in float32),
saved with ``torch.distributed.checkpoint``. Two ways to get it into the run's storage:

- ``copy``: write it to a local temporary directory and copy that into storage, as Ray Train's default (SYNC)
  upload does (``pyarrow.fs.copy_files``, Ray's own call), then delete the temporary copy;
- ``in_place``: write it straight into storage, which ``train.checkpoint.save_checkpoint`` does and Ray registers
  without copying (``CheckpointUploadMode.NO_UPLOAD``).

The state has the shapes of a Llama (``--layers`` × ``--width``, vocabulary ``--vocab``; random values, so
nothing compresses) on ``--device``. Point ``--storage-dir`` at the file system a cluster checkpoints to
(a shared or network file system is where the copy costs most). Variants run interleaved, order
alternating; the ratio is the median of paired ratios.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import pyarrow.fs
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

from .measure import log, paired_ratio, small_llama_config, time_interleaved

NAME = "checkpoint"
HELP = "checkpoint seconds: written in place (NO_UPLOAD) vs written locally and copied (Ray's SYNC upload)"
SIZES = {
    "default": dict(layers=24, width=1024, vocab=151936, repeats=3),
    "quick": dict(layers=1, width=64, vocab=512, repeats=2),
}


def add_arguments(parser) -> None:
    for name, text in (("layers", "decoder layers of the model whose state is saved"), ("width", "hidden size"),
                       ("vocab", "vocabulary (embedding and LM head rows)"), ("repeats", "interleaved repeats")):
        defaults = f"default {SIZES['default'][name]}; --quick {SIZES['quick'][name]}"
        parser.add_argument("--" + name, type=int, help=f"{text} ({defaults})")
    parser.add_argument("--storage-dir", help="where checkpoints are persisted (default: a new temporary directory)")


def training_state(args) -> dict:
    """Random float32 weights and two AdamW moments with the shapes of a ``small_llama_config`` Llama."""
    config = small_llama_config(vocab=args.vocab, layers=args.layers, width=args.width, seq_len=2048, eos=0)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(args.seed)
    return {part: {name: torch.randn(shape, generator=generator).to(args.device) for name, shape in shapes.items()}
            for part in ("model", "exp_avg", "exp_avg_sq")}


def run(args) -> dict:
    state = training_state(args)
    parameters = sum(t.numel() for t in state["model"].values())
    state_bytes = sum(t.numel() * t.element_size() for part in state.values() for t in part.values())
    made_storage = args.storage_dir is None
    storage = Path(tempfile.mkdtemp(prefix="bench_checkpoint_") if made_storage else args.storage_dir)
    storage.mkdir(parents=True, exist_ok=True)
    local = pyarrow.fs.LocalFileSystem()
    target = storage / "checkpoint"

    def copy():
        staging = tempfile.mkdtemp(prefix="tailkd_ckpt_")
        dcp.save(state, checkpoint_id=staging)
        target.mkdir()
        pyarrow.fs.copy_files(staging, str(target), source_filesystem=local, destination_filesystem=local,
                              use_threads=True)
        shutil.rmtree(staging)

    def in_place():
        dcp.save(state, checkpoint_id=str(target))

    def fresh(step):  # each call writes a new checkpoint, as the trainer does every checkpoint_every steps
        def call():
            shutil.rmtree(target, ignore_errors=True)
            step()
        return call

    log(f"[checkpoint] {parameters / 1e9:.3f}B parameters, {state_bytes / 1e9:.2f} GB of state, into {storage}; "
        f"{args.repeats} interleaved repeats")
    try:
        timings = time_interleaved({"copy": fresh(copy), "in_place": fresh(in_place)}, repeats=args.repeats,
                                   warmup=0, device=torch.device(args.device), progress=log)
        written = sorted(p.name for p in target.iterdir())
    finally:
        shutil.rmtree(target, ignore_errors=True)
        if made_storage:
            shutil.rmtree(storage, ignore_errors=True)
    return {"config": {name: getattr(args, name) for name in SIZES["default"]} | {"seed": args.seed,
                                                                                  "storage_dir": args.storage_dir},
            "parameters": parameters, "state_bytes": state_bytes, "files_per_checkpoint": written,
            "seconds": timings, "ratio": paired_ratio(timings, "in_place", "copy")}


def print_table(result: dict) -> None:
    log(f"\ncheckpoint of {result['parameters'] / 1e9:.3f}B parameters + AdamW state ({result['state_bytes'] / 1e9:.2f} "
        f"GB), seconds (median of {result['config']['repeats']} repeats)")
    for name, seconds in result["seconds"].items():
        log(f"  {name:9s} {statistics.median(seconds):8.2f} s   {result['state_bytes'] / 1e9 / statistics.median(seconds):6.2f} GB/s")
    ratio = result["ratio"]
    log(f"\nin_place / copy   median(paired) {ratio['median_of_paired_ratios']:.3f}   (per repeat: "
        + ", ".join(f"{r:.3f}" for r in ratio["paired_ratios"]) + ")")
