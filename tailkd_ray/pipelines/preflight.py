"""What every pipeline checks on the driver before any tokenizing, scoring or training (DESIGN §12).

    check_inputs       output locations writable; the student config builds; teacher, student and data tokenizer
                       share one vocabulary; blocks fit the teacher's context window. Needs no Ray: `tailkd
                       config` runs it too, and a pipeline runs it before starting Ray.
    require_resources  each phase of the command's run fits the cluster with everything that runs beside it
                       (placement.require_together): tokenizing the corpus, scoring into the summary cache,
                       training (with the streamed teacher pool), a Tune trial.

A bad config so fails in seconds with one line, not after the corpus has been tokenized (or never: a trainer
holding every CPU of a local Ray leaves none for the teacher actor, and the run waits forever).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig

from tailkd_ray.config import Config, ConfigError
from tailkd_ray.data.splits import data_tokenizer
from tailkd_ray.models import check_vocab_compatible, require_reverse_kl_support, student_config
from tailkd_ray.placement import (Demand, data_task_demand, require_together, teacher_demand, tokenizer_demand,
                                  trainer_demand)
from tailkd_ray.teacher.pool import check_teacher_context
from tailkd_ray.train.loop import teacher_mode_for

# A Tune trial's driver only waits on its TorchTrainer (whose controller takes 0 CPU); Tune needs some resource.
TRIAL_DRIVER = Demand("Tune trial driver", {"CPU": 0.01}, 1)


def check_inputs(cfg: Config) -> None:
    """Every check that needs neither Ray nor the corpus (see the module doc); raises a ``TailKDError``."""
    for key, path in (("output_dir", cfg.output_dir), ("summary.cache_dir", cfg.summary.cache_dir)):
        if path is not None:
            require_writable_dir(key, path)
    mode = teacher_mode_for(cfg)  # refuses a distillation loss without a teacher
    for key, path, remote_code in (("teacher.model", cfg.teacher.model, cfg.teacher.trust_remote_code),
                                   ("student.model", cfg.student.model, cfg.student.trust_remote_code)):
        if path is not None:
            _require_model_config(key, path, remote_code)
    student_config(cfg)  # a student.config that makes no valid model fails here, by name
    if mode == "none":
        data_tokenizer(cfg)  # loads, or a DataError saying what to set
        return
    shared_vocab = check_vocab_compatible(cfg.teacher.model, cfg.student.model or cfg.student.config,
                                          cfg.data.tokenizer, trust_remote_code=cfg.teacher.trust_remote_code)
    require_reverse_kl_support(cfg, shared_vocab)
    check_teacher_context(cfg)


def require_writable_dir(key: str, path: str) -> None:
    """``path`` is, or can be created as, a directory this process may write; nothing is created here.
    Remote URIs (s3://...) are left to the storage's own errors."""
    if "://" in path:
        return
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"would be created under the file {existing}"
        raise ConfigError(f"{key} {path} {where}; set {key} to a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "directory" if existing == target else f"parent {existing} (where it would be created)"
        raise ConfigError(f"{key} {path}: its {what} is not writable by this user; set {key} to a writable path")


def require_resources(cfg: Config, command: str) -> None:
    """``placement.require_together`` for every phase of ``command``'s run (``placement_phases``)."""
    for phase, demands in placement_phases(cfg, command).items():
        require_together(demands, allow_autoscale=cfg.autoscaling, phase=phase)


def placement_phases(cfg: Config, command: str) -> dict[str, list[Demand]]:
    """What holds resources at the same time in each phase of ``command`` (score | distill | tune).

    The corpus is tokenized (and its blocks materialised) before anything else runs; the summary cache is written
    before training reads it; a streamed teacher pool runs beside the trainer workers; Tune runs at least one trial
    (its concurrency is lowered to what fits, ``pipelines.tune.trials_that_fit``).
    """
    phases = {"tokenizing the corpus": [tokenizer_demand(), data_task_demand()]}
    scored = teacher_mode_for(cfg) == "summary" and (cfg.loss.kind != "clm" or _has_val(cfg))
    cached = command in ("score", "tune") or (scored and cfg.summary.cache_dir is not None)
    if cached:
        phases["scoring into the summary cache"] = [teacher_demand(cfg.teacher), data_task_demand()]
    if command == "tune":
        phases["one Tune trial"] = trial_demands(cfg)
    elif command == "distill":
        streamed = [teacher_demand(cfg.teacher)] if scored and not cached else []
        phases["training"] = [trainer_demand(cfg.train), *streamed, data_task_demand()]
    return phases


def trial_demands(cfg: Config) -> list[Demand]:
    """What one Tune trial holds: its trainer workers, its data pipeline (reads of the cache), its driver."""
    return [trainer_demand(cfg.train), data_task_demand(), TRIAL_DRIVER]


def _has_val(cfg: Config) -> bool:
    return cfg.data.val is not None or cfg.data.val_fraction > 0


def _require_model_config(key: str, path: str, trust_remote_code: bool) -> None:
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(f"{key} {path}: no model config can be loaded there ({reason}); set {key} to a Hugging "
                          f"Face model directory (config.json)") from None


