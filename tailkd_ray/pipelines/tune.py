"""``tailkd tune``: a Ray Tune search over TAD's K and β in which every trial trains from ONE teacher pass.

    search_config   the search's config, checked (K ≤ M, validation data, ...), output and cache dirs absolute
    preflight       its models, paths and placement (one trial must fit), before any work (pipelines.preflight)
    score_splits    corpus --(once)--> summary cache, train + val splits, top M >= max K   (pipelines.score)
    make_tuner      one trial per (K, β) = a ~0-CPU driver that fits a multi-worker TorchTrainer
                    (train.loop.run_training) on the cache (teacher.cache.open_cache); ASHA judges tune.metric
                    at every validation (train.eval_every)
    results         OUT/tune_results.csv, OUT/tune_heatmap.png, OUT/best_config.yaml,
                    OUT/trials/k{K}_beta{β}/student/

Cost model. Naively each trial re-runs the teacher over the corpus: T trials cost T teacher passes. Here the
teacher runs once per search (zero times when a matching cache exists): one summary with M ≥ max K serves
every K ≤ M exactly (DESIGN §3), and β only weighs terms of the loss. ``run_tune`` logs and returns the
passes it ran and the teacher tokens it scored next to what per-trial scoring would have cost.

Trials. A trial is the Train V2 pattern: a Tune function trainable that builds and fits a ``TorchTrainer``
with a ``TuneReportCallback`` subclass in its ``RunConfig`` callbacks. The trainable itself asks for
``preflight.TRIAL_DRIVER`` (Tune refuses an all-zero request); its workers hold the real resources
(``train.num_workers`` × ``placement.train_worker_resources``). Concurrency is ``tune.max_concurrent``,
lowered to the trials the cluster can host at once (``trials_that_fit``; not lowered with ``autoscaling``).
Each trial writes to ``OUT/trials/k{K}_beta{β}/`` (metrics.jsonl, eval.json, student/).

Early stopping. Only validation results reach Tune (a report carrying just a checkpoint would fail Tune's
metric check). The last step's validation reaches Tune only once the trial has exported its student: the
trial reports its eval.json (``step`` = train.max_steps) after its TorchTrainer returns, not from the
training loop, where a stop decided on it (ASHA stops every trial at max_t = train.max_steps) would kill
the trial before the export. So every completed trial reports its final metric, also one that validates
only at its last step (train.eval_every >= train.max_steps), and an early-stopped one never exports.
ASHA's time axis is the optimizer step, so its rungs (``tune.grace_period`` × ``tune.reduction_factor``^i)
are in steps.

Paths. Trials keep the working directory of Ray's workers (``runtime.init_ray`` sets ``RAY_CHDIR_TO_TRIAL_DIR=0``
for the driver and every worker), as Train workers do, so relative data and model paths mean the same in a trial
as in ``tailkd distill``.

Resume. Tune's experiment state lives in ``OUT/tune/search``; running ``tailkd tune`` again with the same
config and output_dir restores it (``Tuner.restore``): finished and early-stopped trials are kept, not
re-run; unfinished and errored ones run again, and their ``TorchTrainer`` (same output_dir and
``train.run_name``) resumes from its latest checkpoint. A different config on the same output_dir is refused.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from tailkd_ray.config import Config, ConfigError, differing_fields, from_dict, require_k_within_top_m, to_dict
from tailkd_ray.data.splits import with_in_memory_data
from tailkd_ray.errors import SearchError, find_tailkd_error
from tailkd_ray.pipelines.preflight import TRIAL_DRIVER, check_inputs, require_resources, trial_demands
from tailkd_ray.pipelines.score import score_splits
from tailkd_ray.placement import total_need
from tailkd_ray.runtime import init_ray, is_quiet
from tailkd_ray.teacher.cache import SPLITS, check_cache, open_cache, teacher_identity
from tailkd_ray.train.loop import run_training
from tailkd_ray.train.runlog import read_eval_json, read_records, run_complete

log = logging.getLogger(__name__)

EXPERIMENT = "search"  # Tune experiment name under OUT/tune/
RESULT_COLUMNS = ("trial", "k", "beta", "status", "steps", "evals", "final", "best", "student", "error")


def run_tune(cfg: Config, *, train_data: Any = None, val_data: Any = None) -> dict:
    """``tailkd tune``: one teacher pass into the summary cache, then a Ray Tune search over K and β.
    ``train_data`` / ``val_data``: a Hugging Face ``datasets.Dataset`` in place of data.train / data.val
    (``data.splits.with_in_memory_data``); the trials read the cache only, so only the teacher pass reads it.

    Returns the summary printed by the CLI: trial counts by status, the best trial (K, β, metric, student
    and config paths), output files, and the teacher cost (``teacher_passes`` run by this call, 0 when the
    cache was reused; ``teacher_tokens_scored``; ``cache_tokens``; ``tokens_if_scored_per_trial``).
    """
    cfg, corpora = with_in_memory_data(cfg, train_data, val_data)
    cfg = search_config(cfg)
    check_inputs(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    init_ray()
    require_resources(cfg, "tune")
    teacher_id = teacher_identity(cfg.teacher.model)
    teacher = score_splits(cfg, teacher_id, corpora=corpora)  # the one teacher pass (none when the cache is complete)
    for split in SPLITS:  # every shard hashed once here, not once per trial
        check_cache(cfg, split=split, teacher_id=teacher_id)
    tuner, restored = make_tuner(cfg, teacher_id)
    rows = sorted((trial_row(result, cfg) for result in tuner.fit()), key=lambda r: (r["k"], r["beta"]))
    naive = len(rows) * teacher.cache_tokens
    log.info("teacher passes: %d by this search (%d tokens scored; cache %s holds %d) shared by %d trials; "
             "scoring per trial would have cost %d passes, %d tokens", teacher.passes, teacher.tokens_scored,
             teacher.cache_dir, teacher.cache_tokens, len(rows), len(rows), naive)
    best = write_results(cfg, rows)
    out = Path(cfg.output_dir)
    log.info("outputs: %s, %s, %s; the trials' students under %s", out / "tune_results.csv",
             out / "tune_heatmap.png", out / "best_config.yaml", out / "trials")
    counts = {status: sum(r["status"] == status for r in rows) for status in ("completed", "early_stopped", "error")}
    return {
        "trials": len(rows), **counts, "restored": restored, "metric": cfg.tune.metric,
        "best": {"k": best["k"], "beta": best["beta"], cfg.tune.metric: best["final"], "student": best["student"],
                 "config": str(out / "best_config.yaml")},
        "results_csv": str(out / "tune_results.csv"), "heatmap": str(out / "tune_heatmap.png"),
        "teacher_passes": teacher.passes, "teacher_tokens_scored": teacher.tokens_scored,
        "cache_tokens": teacher.cache_tokens, "tokens_if_scored_per_trial": naive, "cache_dir": teacher.cache_dir,
    }


# --------------------------------------------------------------------------------------------------
# The search's config, its trials' configs
# --------------------------------------------------------------------------------------------------
def search_config(cfg: Config) -> Config:
    """The effective config of a search: absolute output_dir, ``summary.cache_dir`` defaulting to
    ``OUT/summary_cache`` (absolute; not part of a cache's identity), checked for a K/β search."""
    values = to_dict(cfg)
    out = Path(cfg.output_dir).resolve()
    values["output_dir"] = str(out)
    cache_dir = cfg.summary.cache_dir or str(out / "summary_cache")
    values["summary"]["cache_dir"] = cache_dir if "://" in cache_dir else str(Path(cache_dir).resolve())
    cfg = from_dict(values)
    if cfg.teacher.model is None:
        raise ConfigError("tune needs a teacher: set teacher.model")
    if cfg.loss.kind != "tad":
        raise ConfigError(f"tune searches TAD's K and β: set loss.kind: tad (got {cfg.loss.kind})")
    if cfg.summary.top_m is None:
        raise ConfigError("tune shares one teacher pass through the summary cache: set summary.top_m "
                          "(null means a co-located teacher in every trial)")
    require_k_within_top_m("max(tune.k)", max(cfg.tune.k), cfg.summary.top_m)
    if len(set(cfg.tune.beta)) > 1 and max(cfg.tune.k) == cfg.summary.top_m and cfg.summary.tail_samples == 0:
        raise ConfigError(f"tune.beta = {list(cfg.tune.beta)} is searched, but at K = max(tune.k) = summary.top_m = "
                          f"{cfg.summary.top_m} with summary.tail_samples = 0 the summary holds nothing beyond the "
                          f"teacher's top K: TAD's tail term is 0 and every β trains the same student; set "
                          f"summary.tail_samples > 0, raise summary.top_m above max(tune.k), or lower max(tune.k)")
    if cfg.data.val is None and cfg.data.val_fraction == 0:
        raise ConfigError("tune needs validation data for tune.metric: set data.val or data.val_fraction > 0")
    return cfg


def trial_name(k: int, beta: float) -> str:
    return f"k{int(k)}_beta{float(beta):.6g}"


def trial_config(cfg: Config, k: int, beta: float, output_dir: Optional[str] = None) -> Config:
    """The search config with ``loss.k = k``, ``loss.beta = beta``, written to ``OUT/trials/<name>``."""
    values = to_dict(cfg)
    values["loss"].update(k=int(k), beta=float(beta))
    values["output_dir"] = output_dir or str(Path(cfg.output_dir) / "trials" / trial_name(k, beta))
    return from_dict(values)


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------
def param_space(cfg: Config) -> dict:
    """``grid``: every (K, β) of tune.k × tune.beta; ``random``: K uniform over the integers in
    [min k, max k], β log-uniform over [min β, max β]."""
    ks, betas = sorted(set(cfg.tune.k)), sorted({float(b) for b in cfg.tune.beta})
    if cfg.tune.search == "grid":
        return {"k": tune.grid_search(ks), "beta": tune.grid_search(betas)}
    return {"k": tune.randint(ks[0], ks[-1] + 1) if len(ks) > 1 else ks[0],
            "beta": tune.loguniform(betas[0], betas[-1]) if len(betas) > 1 else betas[0]}


def trials_that_fit(cfg: Config, cluster: dict) -> int:
    """How many trials ``cluster`` (total resources, as ``ray.cluster_resources()``) hosts at once, each holding
    ``preflight.trial_demands`` (its workers, one CPU for its data's tasks, its driver). Summed over nodes: a
    trial's workers may span nodes. ``preflight.require_resources`` has made sure at least one fits."""
    need = total_need(trial_demands(cfg))
    return min(math.floor(cluster.get(name, 0.0) / amount + 1e-6) for name, amount in need.items() if amount > 0)


def concurrency(cfg: Config) -> int:
    """``tune.max_concurrent``, lowered to ``trials_that_fit`` on a fixed-size cluster."""
    if cfg.autoscaling:
        return cfg.tune.max_concurrent
    fit = trials_that_fit(cfg, ray.cluster_resources())
    if fit < cfg.tune.max_concurrent:
        log.warning("tune.max_concurrent = %d but the cluster hosts %d trial(s) at once: running %d",
                    cfg.tune.max_concurrent, fit, fit)
    return min(cfg.tune.max_concurrent, fit)


def make_tuner(cfg: Config, teacher_id: dict):
    """A new Tuner, or the one of an interrupted or finished search on the same output_dir (restored)."""
    out = Path(cfg.output_dir)
    trainable = tune.with_resources(tune.with_parameters(train_trial, base=to_dict(cfg), teacher_id=teacher_id),
                                    {"cpu": TRIAL_DRIVER.unit["CPU"]})
    storage, spec = out / "tune", out / "tune" / "search_config.json"
    path = storage / EXPERIMENT
    if tune.Tuner.can_restore(str(path)):
        _require_same_search(cfg, spec)
        log.info("restoring the search in %s: finished trials are kept, unfinished ones resume", path)
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True), True
    scheduler = None
    grace = cfg.tune.grace_period or cfg.train.eval_every
    if cfg.tune.asha and grace >= cfg.train.max_steps:
        log.warning("ASHA off: its grace period (%d steps: tune.grace_period, default train.eval_every) is not below "
                    "train.max_steps = %d, so no trial could be stopped early", grace, cfg.train.max_steps)
    elif cfg.tune.asha:
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps, grace_period=grace,
                                  reduction_factor=cfg.tune.reduction_factor)
    storage.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(to_dict(cfg), indent=1, sort_keys=True) + "\n")
    tuner = tune.Tuner(
        trainable, param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode="min", scheduler=scheduler,
            # The concurrency limit goes to the generator itself: Tune ignores max_concurrent_trials when
            # given a BasicVariantGenerator (it only wraps Searchers).
            search_alg=BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=concurrency(cfg)),
            num_samples=cfg.tune.num_samples if cfg.tune.search == "random" else 1,
            trial_name_creator=lambda trial: trial_name(trial.config["k"], trial.config["beta"]),
            trial_dirname_creator=lambda trial: trial_name(trial.config["k"], trial.config["beta"])),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(storage), verbose=0 if is_quiet() else 1))
    return tuner, False


def _require_same_search(cfg: Config, spec: Path) -> None:
    before = json.loads(spec.read_text()) if spec.is_file() else {}
    differing = differing_fields(before, to_dict(cfg), recorded_as="the search")
    if differing:
        raise ConfigError(f"{cfg.output_dir} holds a search with another config (restoring it would mix "
                          f"them); differing field(s):\n  " + "\n  ".join(differing) +
                          "\nuse another output_dir for a new search, or the same config to resume this one")


# --------------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------------
class ValidationReport(TuneReportCallback):
    """Forward a trial's validation results to Tune, except the last step's, which ``train_trial`` reports
    after the export (see the module doc)."""

    def __init__(self, metric: str, last_step: int):
        super().__init__()
        self.metric, self.last_step = metric, last_step

    def after_report(self, run_context, metrics, checkpoint):
        result = metrics[0]  # rank 0's; validation metrics are all-reduced, every rank reports the same
        if self.metric in result and result["step"] < self.last_step:
            # No checkpoint for Tune: a resumed trial restarts from its TorchTrainer's own checkpoints.
            super().after_report(run_context, metrics, None)


def train_trial(params: dict, *, base: dict, teacher_id: dict) -> None:
    """Tune function trainable: train one (K, β) student with a TorchTrainer on the shared cache, then
    report its final validation (eval.json) to Tune."""
    cfg = trial_config(from_dict(base), params["k"], params["beta"])
    train_ds, val_ds = (open_cache(cfg, split=split, teacher_id=teacher_id, hashes=False) for split in SPLITS)
    run_training(cfg, train_ds, val_ds, "summary",
                 callbacks=[ValidationReport(cfg.tune.metric, cfg.train.max_steps)])
    # The student is exported: a stop Tune decides on this report (ASHA's at max_t) costs nothing now.
    tune.report(read_eval_json(cfg.output_dir))


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
def write_results(cfg: Config, rows: list[dict]) -> dict:
    """tune_results.csv and tune_heatmap.png, then best_config.yaml; returns the best completed trial's row."""
    out = Path(cfg.output_dir)
    write_results_csv(rows, out / "tune_results.csv", cfg.tune.metric)
    plot_heatmap(rows, out / "tune_heatmap.png", cfg.tune.metric, cfg.tune.search)
    completed = [r for r in rows if r["status"] == "completed"]
    if not completed:
        errored = [r for r in rows if r["status"] == "error"]
        first = f"; first error ({errored[0]['trial']}): {errored[0]['error']}" if errored else ""
        raise SearchError(f"no trial of the search completed ({len(errored)} of {len(rows)} errored, "
                          f"{len(rows) - len(errored)} stopped early){first}; see {out / 'tune_results.csv'} "
                          f"(status, error) and the trials' logs under {out / 'tune' / EXPERIMENT}")
    best = min(completed, key=lambda r: r["final"])
    write_best_config(cfg, best, out / "best_config.yaml")
    return best


def trial_row(result, cfg: Config) -> dict:
    """One results row: K, β, status (completed | early_stopped | error), optimizer steps trained, validations
    run, final metric (the student's eval.json; else the last validation) and best one. Read from the trial's
    own metrics.jsonl, which survives resumes (Tune's copy of a resumed trial starts again from its restart)."""
    k, beta = int(result.config["k"]), float(result.config["beta"])
    out = Path(cfg.output_dir) / "trials" / trial_name(k, beta)
    steps = max((r["step"] for r in read_records(out, "step")), default=0)
    # {step: metric} per validation; a step redone after a resume keeps its last value
    validations = list({r["step"]: r[cfg.tune.metric] for r in read_records(out, "eval")}.values())
    completed = run_complete(out)
    final = read_eval_json(out)[cfg.tune.metric] if completed else (validations[-1] if validations else math.nan)
    status = "error" if result.error is not None else "completed" if completed else "early_stopped"
    return {"trial": out.name, "k": k, "beta": beta, "status": status, "steps": steps, "evals": len(validations),
            "final": final, "best": min((v for v in validations + [final] if not math.isnan(v)), default=math.nan),
            "student": str(out / "student") if completed else "",
            "error": trial_error_line(result.error)}


def trial_error_line(error: Optional[BaseException]) -> str:
    """A trial's error in one line: our own message when a ``TailKDError`` is behind Ray's wrappers, else the
    first line of what Ray reports."""
    if error is None:
        return ""
    ours = find_tailkd_error(error)
    return str(ours if ours is not None else error).splitlines()[0]


def write_results_csv(rows: list[dict], path: Path, metric: str) -> None:
    header = [c if c not in ("final", "best") else f"{c}_{metric}" for c in RESULT_COLUMNS]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[row[c] for c in RESULT_COLUMNS] for row in rows])


def plot_heatmap(rows: list[dict], path: Path, metric: str, search: str) -> None:
    """Best ``metric`` per trial over K × β: a heatmap for a grid, a scatter (log β) for a random search.
    Early-stopped trials are marked '(stopped)' / hollow."""
    # Deferred: matplotlib takes ~1 s to import, and Tune's trial processes import this module without plotting.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = _heatmap(ax, rows) if search == "grid" else _scatter(ax, rows)
    fig.colorbar(image, ax=ax, label=f"best {metric}")
    ax.set_xlabel("β")
    ax.set_ylabel("K")
    ax.set_title(f"TAD search: best {metric} per trial (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _heatmap(ax, rows: list[dict]):
    ks, betas = sorted({r["k"] for r in rows}), sorted({r["beta"] for r in rows})
    grid = np.full((len(ks), len(betas)), np.nan)
    for r in rows:
        grid[ks.index(r["k"]), betas.index(r["beta"])] = r["best"]
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    for r in rows:
        note = "" if r["status"] == "completed" else f"\n({r['status'].replace('early_', '')})"
        ax.text(betas.index(r["beta"]), ks.index(r["k"]), f"{r['best']:.4g}{note}", ha="center",
                va="center", fontsize=8, bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"})
    return image


def _scatter(ax, rows: list[dict]):
    done = [r for r in rows if r["status"] == "completed"]
    image = ax.scatter([r["beta"] for r in done], [r["k"] for r in done], c=[r["best"] for r in done],
                       cmap="viridis_r", s=60)
    stopped = [r for r in rows if r["status"] != "completed"]
    ax.scatter([r["beta"] for r in stopped], [r["k"] for r in stopped], facecolors="none",
               edgecolors="grey", s=60, label="stopped / error")
    ax.set_xscale("log")
    if stopped:
        ax.legend(loc="best", fontsize=8)
    return image


def write_best_config(cfg: Config, best: dict, path: Path) -> None:
    """The best trial's config, ready for ``tailkd distill`` (output_dir OUT/best; the same summary cache)."""
    best_cfg = trial_config(cfg, best["k"], best["beta"], output_dir=str(Path(cfg.output_dir) / "best"))
    header = (f"# Best of the K/β search in {cfg.output_dir}: K = {best['k']}, β = {best['beta']:g}, "
              f"{cfg.tune.metric} = {best['final']:.6g}\n# its student: {best['student']}\n"
              f"# re-run: tailkd distill --config {path}\n")
    path.write_text(header + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
