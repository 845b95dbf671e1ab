"""Checkpoints, resume and the exported student (DESIGN §10).

A checkpoint (every ``train.checkpoint_every`` steps and at the end) is the strategy's model + optimizer state
(``torch.distributed.checkpoint`` for FSDP2 / DDP, DeepSpeed's own for ZeRO-3) plus, per rank, the ``Progress``
(optimizer steps, epoch, micro-batches consumed in it), the schedule and the RNG states. Each worker writes its
part straight into the run's storage directory and Ray registers it in place (``NO_UPLOAD``). A restarted worker
group (``FailureConfig``) or a relaunch with the same ``train.run_name`` and ``output_dir`` resumes from the latest
intact one (``train/loop.py``).

Integrity (DESIGN §10, §13): once every rank's files are written, the ranks hash their shares of the files and
rank 0 writes ``tailkd_manifest.json`` (each file's size and SHA-256) last, under a temporary name renamed into
place, so a directory without one was never finished. Before a run starts, ``resume_checkpoint`` verifies the
run's checkpoints newest first and picks the newest intact one, setting aside Ray's run snapshot when it points
elsewhere or is unreadable; workers check the sizes again before loading. The export gathers the full student on rank 0 into ``OUT/student/`` (safetensors +
tokenizer).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import ray.train
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM

from tailkd_ray.config import Config
from tailkd_ray.data.hashing import stream_sha256
from tailkd_ray.errors import CheckpointError
from tailkd_ray.models import export_dtype, export_tokenizer, student_config
from tailkd_ray.train.runlog import STUDENT_DIR

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_step"
MANIFEST = "tailkd_manifest.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of reported checkpoints, in the run dir
SET_ASIDE_SUFFIX = ".set-aside"


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
    directory = Path(storage.experiment_fs_path) / f"{CHECKPOINT_PREFIX}{progress.step:08d}"
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
    _write_manifest(directory, rank)
    return ray.train.Checkpoint(str(directory), filesystem=storage.storage_filesystem)


def _write_manifest(directory: Path, rank: int) -> None:
    """Collective, once every rank's files are written: each rank hashes every world_size-th file, rank 0 writes
    the manifest of them all last (temporary name, then rename)."""
    dist.barrier()
    names = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())
    world = dist.get_world_size()
    shares: list = [None] * world
    dist.all_gather_object(shares, {name: _file_entry(directory / name) for name in names[rank::world]})
    if rank == 0:
        files = dict(sorted(entry for share in shares for entry in share.items()))
        temporary = directory / f".{MANIFEST}.tmp"
        temporary.write_text(json.dumps({"files": files}, indent=1))
        os.replace(temporary, directory / MANIFEST)


def _file_entry(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": stream_sha256(f)}


def checkpoint_problem(directory: Path, *, hashes: bool = True) -> Optional[str]:
    """None when the checkpoint in ``directory`` is whole and unchanged since it was written, else what is wrong
    with it: no directory, no (or an unreadable) manifest, a file missing, of another size or (``hashes``) with
    other contents."""
    if not directory.is_dir():
        return "its directory is missing"
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (written last: the checkpoint was never finished)"
    except (ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({type(err).__name__})"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} holds {path.stat().st_size} bytes, {entry['bytes']} when written"
        if hashes and _file_entry(path)["sha256"] != entry["sha256"]:
            return f"{name} was changed after it was written (SHA-256 differs)"
    return None


def resume_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest intact checkpoint of the run in ``run_dir`` (None: the run has written none), checked on the
    driver before training starts. Damaged, unfinished or missing newer ones are passed over with a warning naming
    each and why. Ray Train V2 resumes from the latest checkpoint its run snapshot lists (and refuses to start when
    one is missing, or the snapshot is unreadable): unless that is the one chosen here, the snapshot is renamed
    to ``checkpoint_manager_snapshot.json.set-aside`` and the workers resume from the path returned.
    Raises ``CheckpointError`` when checkpoints were written but none is intact."""
    listed, snapshot_problem = _snapshot_checkpoints(run_dir)
    found = {path.name for path in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()}
    passed_over, chosen = [], None
    for name in sorted(found | set(listed), reverse=True):
        problem = checkpoint_problem(run_dir / name)
        if problem is None:
            chosen = run_dir / name
            break
        passed_over.append(f"{name}: {problem}")
    if chosen is None and passed_over:
        raise CheckpointError(f"no intact checkpoint to resume run {run_dir}: {'; '.join(passed_over)}. To fix: "
                              f"start afresh with another train.run_name (or delete {run_dir})")
    snapshot = run_dir / RAY_SNAPSHOT
    agrees = snapshot_problem is None and (listed[-1:] == [chosen.name] if chosen else not listed) \
        and all((run_dir / name).is_dir() for name in listed)
    if snapshot.exists() and not agrees:
        os.replace(snapshot, snapshot.with_name(RAY_SNAPSHOT + SET_ASIDE_SUFFIX))
        passed_over.append(f"Ray's {RAY_SNAPSHOT} {snapshot_problem or 'lists other checkpoints'}: renamed to "
                           f"{RAY_SNAPSHOT + SET_ASIDE_SUFFIX}")
    if passed_over:
        log.warning("resuming run %s from %s; passed over: %s", run_dir, chosen.name if chosen else "the start",
                    "; ".join(passed_over))
    return chosen


def _snapshot_checkpoints(run_dir: Path) -> tuple[list[str], Optional[str]]:
    """The checkpoint directory names Ray's run snapshot lists (its latest last), or what is wrong with it.
    Reads only the fields it needs: anything else about the snapshot is Ray's."""
    snapshot = run_dir / RAY_SNAPSHOT
    if not snapshot.exists():
        return [], None
    try:
        state = json.loads(snapshot.read_text())
        listed = [result["checkpoint_dir_name"] for result in state["checkpoint_results"]]
        latest = state["latest_checkpoint_result"]
        return [name for name in listed if latest is None or name != latest["checkpoint_dir_name"]] + \
            ([latest["checkpoint_dir_name"]] if latest else []), None
    except (ValueError, KeyError, TypeError) as err:
        return [], f"is unreadable ({type(err).__name__})"


def load_checkpoint(strategy, directory: str, rank: int) -> Progress:
    """Restore this worker's part of the checkpoint in ``directory`` into ``strategy``; returns its progress.
    Its files' sizes are checked against the manifest first (the driver hashed them before the run started)."""
    problem = checkpoint_problem(Path(directory), hashes=False)
    if problem:
        raise CheckpointError(f"checkpoint {directory} cannot be loaded: {problem}; relaunch the run to resume "
                              f"from the newest intact checkpoint")
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
