"""A run's records: ``metrics.jsonl``, the trackers' (TensorBoard by default) and ``eval.json`` (DESIGN §11).

Every ``metrics.jsonl`` line is one JSON record that names its ``kind`` (``KINDS``) and carries ``step``:

- ``step``: one per optimizer step (loss, clm, div, lr, grad_norm, tokens, epoch, and its time split:
  step_time_s, data_wait_s, compute_s, optimizer_s, elapsed_s, peak_memory_mb);
- ``eval``: one per validation (the eval metrics and kl_source);
- ``setup`` (setup_s, of it student_build_s; worker_start_s; the driver's stages before training, those it timed:
  preflight_s, ray_start_s, ingest_s, summaries_s from ``pipelines.distill``, val_read_s from
  ``train.loop.run_training``), ``checkpoint`` (checkpoint_s), ``export`` (export_s), each ``eval``'s eval_s: the
  fixed costs;
- ``resume``: a restarted or relaunched attempt (resumed_from_step, epoch, batches_in_epoch);
- ``nonfinite``: a step skipped for a NaN/inf loss or gradient (problem, skipped).

Each attempt of a run (a first launch, a relaunch, a restarted worker group) starts with its ``setup`` record at the
step it starts from; the records of later steps that an earlier attempt wrote are redone by this one, so they are
marked ``"superseded": true`` in the file then, and ``read_records`` leaves them out: one record per step.

Rank 0 writes; ``read_records`` is the one reader (Tune's results, the demo's curves, the benchmarks, tests).
``run_complete`` is the one rule for a run that has nothing left to do: its eval.json and exported student exist.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

from tailkd_ray.config import Config, to_dict
from tailkd_ray.train.trackers import TRACKERS

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
STUDENT_DIR = "student"
KINDS = ("step", "eval", "setup", "checkpoint", "export", "resume", "nonfinite")
REDONE_KINDS = ("step", "eval", "checkpoint", "export", "nonfinite")  # what an attempt redoes after its start step
SUPERSEDED = "superseded"
_TRACKER_SECTION = {"step": "train", "eval": "val"}  # every other kind goes to "run"

PathLike = Union[str, Path]


class RunLog:
    """Rank 0's metrics.jsonl and trackers (``train.loggers``: ``trackers.py``); other ranks get a no-op log.
    Nothing is written, not even a tracker's first file, before the first record: a relaunch of a finished run
    leaves the outputs as they were."""

    def __init__(self, out_dir: Path, enabled: bool, config: Optional[dict] = None):
        self.enabled = enabled
        self.out_dir = out_dir
        self.config = config or to_dict(Config())  # the resolved config (config.to_dict), for the trackers
        self.trackers: Optional[list] = None

    def write(self, kind: str, record: dict) -> None:
        """Append ``record`` (which holds ``step``) as a record of ``kind``; its numbers go to the trackers too."""
        if kind not in KINDS:
            raise ValueError(f"unknown metrics.jsonl record kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not self.enabled:
            return
        self.open()
        if kind == "setup":
            _mark_superseded(self.out_dir / METRICS_FILE, after_step=record["step"])
        with (self.out_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps({"kind": kind, **record}) + "\n")
        numbers = _numbers(record, _TRACKER_SECTION.get(kind, "run"))
        for tracker in self.trackers:
            tracker.log(numbers, record["step"])

    def final(self, metrics: dict) -> None:
        """The run's final eval (eval.json) to the trackers, as ``final/<metric>``."""
        numbers = _numbers(metrics, "final")
        if self.enabled and numbers:
            self.open()
            for tracker in self.trackers:
                tracker.log_final(numbers, metrics["step"])

    def close(self) -> None:
        for tracker in self.trackers or ():
            tracker.close()

    def open(self) -> None:
        """Start the trackers (rank 0; idempotent): W&B and MLflow take seconds, which belong to the setup."""
        if self.enabled and self.trackers is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.trackers = [TRACKERS[name](self.out_dir, self.config) for name in self.config["train"]["loggers"]]


def _numbers(record: dict, section: str) -> dict[str, float]:
    return {f"{section}/{key}": value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def read_records(out_dir: PathLike, kind: Optional[str] = None) -> list[dict]:
    """The records of a run's metrics.jsonl in order (only those of ``kind`` when given), superseded ones left out
    (see the module doc); [] before its first."""
    path = Path(out_dir) / METRICS_FILE
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in records if (kind is None or r["kind"] == kind) and not r.get(SUPERSEDED)]


def _mark_superseded(path: Path, *, after_step: int) -> None:
    """Mark the records of steps after ``after_step`` that an attempt starting there will redo (atomic rewrite)."""
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines()]
    redone = [r for r in records if r["kind"] in REDONE_KINDS and r["step"] > after_step and not r.get(SUPERSEDED)]
    if not redone:
        return
    for record in redone:
        record[SUPERSEDED] = True
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records))
    partial.replace(path)


@contextmanager
def timed(seconds: dict, name: str):
    """Add the wall time of the ``with`` block to ``seconds[name]``."""
    started = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def write_eval_json(metrics: dict, out_dir: PathLike, name: str = EVAL_FILE) -> Path:
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def read_eval_json(out_dir: PathLike) -> Optional[dict]:
    """A run's final metrics, None before it wrote them."""
    path = Path(out_dir) / EVAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_complete(out_dir: PathLike) -> bool:
    """Whether a run finished: its eval.json is written and its student exported."""
    return (Path(out_dir) / EVAL_FILE).is_file() and (Path(out_dir) / STUDENT_DIR / "config.json").is_file()
