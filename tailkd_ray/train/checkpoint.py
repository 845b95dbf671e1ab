"""Checkpoints, resume and the exported student (DESIGN §10).

A checkpoint (every ``train.checkpoint_every`` steps and at the end) is the strategy's model + optimizer state
(``torch.distributed.checkpoint`` for FSDP2 / DDP, DeepSpeed's own for ZeRO-3) plus, per rank, the ``Progress``
(optimizer steps, epoch, micro-batches consumed in it), the schedule and the RNG states. Each worker writes its
part straight into the run's storage directory and Ray registers it in place (``NO_UPLOAD``). A restarted worker
group (``FailureConfig``) or a relaunch with the same ``train.run_name`` and ``output_dir`` resumes from the latest
one (``train/loop.py``). The export gathers the full student on rank 0 into ``OUT/student/`` (safetensors +
tokenizer).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM

from tailkd_ray.config import Config
from tailkd_ray.models import export_dtype, export_tokenizer, student_config
from tailkd_ray.train.runlog import STUDENT_DIR


@dataclass
class Progress:
    """Where a worker is: optimizer steps done and its own shard position (epoch, micro-batches in it)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def _rank_file(directory: str, rank: int) -> Path:
    return Path(directory) / f"progress_rank{rank}.json"


def save_checkpoint(strategy, progress: Progress, rank: int):
    """Write this worker's part of the step's checkpoint straight into the run's storage directory and return it
    as a ``ray.train.Checkpoint``. Ray registers it in place (``NO_UPLOAD``): writing to a local temporary
    directory for Ray to copy would write every checkpoint twice (12 bytes per parameter with AdamW). The ranks'
    files do not collide (DCP and DeepSpeed name them per rank); ``output_dir`` is shared storage anyway."""
    storage = ray.train.get_context().get_storage()
    directory = Path(storage.experiment_fs_path) / f"checkpoint_step{progress.step:08d}"
    if rank == 0 and directory.exists():  # left half-written by an attempt that failed before reporting it
        shutil.rmtree(directory)
    dist.barrier()
    directory.mkdir(parents=True, exist_ok=True)
    extra = strategy.save(str(directory))
    _rank_file(directory, rank).write_text(json.dumps({"progress": asdict(progress), **extra}))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    return ray.train.Checkpoint(str(directory), filesystem=storage.storage_filesystem)


def load_checkpoint(strategy, directory: str, rank: int) -> Progress:
    """Restore this worker's part of the checkpoint in ``directory`` into ``strategy``; returns its progress."""
    extra = json.loads(_rank_file(directory, rank).read_text())
    strategy.load(directory, extra)
    rng = torch.load(Path(directory) / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return Progress(**extra["progress"])


def export_student(strategy, cfg: Config, out_dir: Path, rank: int) -> None:
    """Gather the full student on rank 0 and save it in HF format (safetensors) with the tokenizer."""
    state = strategy.full_state_dict()  # collective: every rank takes part
    if rank != 0:
        return
    with torch.device("meta"):  # a skeleton the gathered state fills: no throwaway random init of a full model
        model = AutoModelForCausalLM.from_config(student_config(cfg), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    aliases = _tied_names(model)
    if unexpected or set(missing) - aliases:
        raise RuntimeError(f"gathered student state does not match its config: missing {sorted(set(missing) - aliases)}, "
                           f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    target = out_dir / STUDENT_DIR
    model.to(export_dtype(cfg)).save_pretrained(target)
    export_tokenizer(cfg).save_pretrained(target)


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that alias another one (tied embeddings): a gathered state may omit them."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.update({name, seen[id(param)]})
        seen.setdefault(id(param), name)
    return aliases
