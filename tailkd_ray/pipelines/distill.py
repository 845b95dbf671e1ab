"""``tailkd distill``: corpus -> teacher summaries -> Ray Train -> ``eval.json`` + ``student/`` (DESIGN §1).

    preflight            the config's models, paths and placement, before any work (pipelines.preflight)

    _setup_data          train / val blocks of the corpus (data_report.json: what was read, skipped, packed)
    _setup_summaries     the teacher's summaries for them: streamed from the actor pool, or read from the
                         summary cache (scored first where missing); none in co-located or teacher-less mode
    run_training         the student, trained on Ray Train; its workers write metrics.jsonl, student/, eval.json
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from tailkd_ray.config import Config
from tailkd_ray.data.splits import Corpora, Ingest, train_val_datasets, with_in_memory_data
from tailkd_ray.pipelines.preflight import check_inputs, require_resources
from tailkd_ray.runtime import init_ray
from tailkd_ray.teacher.cache import open_cache, score_to_cache, teacher_identity
from tailkd_ray.teacher.pool import ScoringProgress, score_dataset
from tailkd_ray.train.loop import StepHook, run_training, teacher_mode_for
from tailkd_ray.train.runlog import EVAL_FILE, METRICS_FILE, STUDENT_DIR, read_eval_json, timed

log = logging.getLogger(__name__)

DATA_REPORT_FILE = "data_report.json"


def distill(cfg: Config, *, step_hook: Optional[StepHook] = None, ingest: Optional[Ingest] = None,
            train_data: Any = None, val_data: Any = None) -> dict:
    """The whole run; returns the eval metrics. ``step_hook``: see ``train.loop.run_training``. ``ingest``: what
    ``data.splits.train_val_datasets`` gave for this config's data and ``train.seed`` in this Ray session, when the
    caller already has it (the demo's runs share one corpus), instead of tokenizing again. ``train_data`` /
    ``val_data``: a Hugging Face ``datasets.Dataset`` in place of data.train / data.val (``with_in_memory_data``).

    The driver's fixed costs (preflight, Ray start, ingest, summaries) go into the run's ``setup`` records."""
    cfg, corpora = with_in_memory_data(cfg, train_data, val_data)
    seconds = {}
    with timed(seconds, "preflight_s"):
        check_inputs(cfg)
    with timed(seconds, "ray_start_s"):
        init_ray()
    with timed(seconds, "preflight_s"):
        require_resources(cfg, "distill")
    with timed(seconds, "ingest_s"):
        train_ds, val_ds = _setup_data(cfg, ingest, corpora)
    mode = teacher_mode_for(cfg)
    streamed = mode == "summary" and cfg.summary.cache_dir is None
    with ScoringProgress("teacher pool (streamed)", cfg.data.seq_len) if streamed else nullcontext() as progress:
        if mode == "summary":
            with timed(seconds, "summaries_s"):
                train_ds, val_ds = _setup_summaries(cfg, train_ds, val_ds, progress)
        run_training(cfg, train_ds, val_ds, mode, step_hook=step_hook, driver_seconds=seconds)
    out = Path(cfg.output_dir).resolve()
    log.info("outputs: %s, %s, %s, %s", out / STUDENT_DIR, out / METRICS_FILE, out / EVAL_FILE, out / DATA_REPORT_FILE)
    return read_eval_json(cfg.output_dir)


def _setup_data(cfg: Config, ingest: Optional[Ingest], corpora: Corpora):
    """(train, val) blocks, ``ingest``'s or tokenized now; the ingest's counts go to ``OUT/data_report.json``."""
    train_ds, val_ds, report = ingest or train_val_datasets(cfg, corpora)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DATA_REPORT_FILE).write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return train_ds, val_ds


def _setup_summaries(cfg: Config, train_ds, val_ds, progress: Optional[ScoringProgress]):
    """The blocks with their teacher summaries (a CLM student needs them only for its evaluation)."""
    if cfg.loss.kind != "clm":
        train_ds = teacher_summaries(cfg, train_ds, split="train", progress=progress)
    if val_ds is not None:
        val_ds = teacher_summaries(cfg, val_ds, split="val", progress=progress)
    return train_ds, val_ds


def teacher_summaries(cfg: Config, blocks, *, split: str = "train", progress: Optional[ScoringProgress] = None):
    """The teacher summaries of ``blocks``: the pool's output streamed straight into training (no disk) when
    ``summary.cache_dir`` is null (its blocks counted into ``progress`` when given), else the cache's ``split``
    (scored first if missing or unfinished)."""
    if cfg.summary.cache_dir is None:
        return score_dataset(blocks, cfg, progress)
    teacher_id = teacher_identity(cfg.teacher.model)
    score_to_cache(cfg, blocks, teacher_id=teacher_id, split=split)
    return open_cache(cfg, split=split, teacher_id=teacher_id)
