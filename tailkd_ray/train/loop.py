"""Ray Train student training: the worker loop and the trainer that runs it (DESIGN §5, §10, §11).

``run_training`` builds a ``TorchTrainer`` (Ray Train V2) whose workers run ``train_loop_per_worker``:

- data: ``ray.train.get_dataset_shard("train").iter_torch_batches``; each row holds ``input_ids`` (seq_len + 1
  tokens), where samples lie whole in blocks (supervised formats, data.packing: false) a ``loss_mask`` (the losses
  cover the targets where it is 1), for packed supervised samples ``position_ids`` (every forward runs at them, so
  no sample attends to another) and, in summary mode, the five teacher-summary columns for positions 0..seq_len-1;
- objective: ``core.losses.distill_objective`` on the student's final hidden states and LM head (chunked over
  tokens; never a [B·T, V] float32 tensor): mean over tokens of CLM + λ·L_DIV;
- AdamW, linear warmup + cosine decay to 0, gradient clipping, gradient accumulation (``strategies.py``);
- teacher: a ``TeacherSummary`` from the batch (``summary``), full logits of a teacher loaded in every
  worker (``colocated``, exact loss), or none (``none``: CLM only, no teacher metrics);
- checkpoints and resume (``checkpoint.py``); a relaunch after completion returns without training or writing.

Data order and position. The train blocks arrive in one seeded permutation (``data.shuffle``: the driver
shuffles them once, before any teacher, ``data.splits.shuffled_blocks``); each worker reshuffles its stream every
epoch in a local buffer of ``train.shuffle_buffer`` rows seeded by (train.seed, epoch, rank)
(``data.hashing.epoch_shuffle_seed``), so epochs differ and the same seed gives the same order. Each worker
records (epoch, micro-batches consumed in that epoch) of its own shard; on resume it re-reads its shard,
reshuffles the epoch with the same seed and discards that many micro-batches before training. This resumes at
the same rows when the dataset order is deterministic (the packers, the seeded shuffle, ``from_items`` and
Parquet reads are) and the streaming split hands blocks to the workers in the same way: it gives each block to the
worker with the fewest rows so far, in the order the blocks arrive, which is the dataset's order because the
workers' streams preserve it (``ingest_options``; without it the teacher pool's batches arrive as they finish).
Every step record carries a fingerprint of the rows each rank trained on (``rows_fingerprint``) to check it;
``jobs/chaos.py`` compares them with an uninterrupted run's. The skipped micro-batches are
still read (and, in streamed summary mode, scored by the teacher) — resume costs I/O, not training steps.

Validation runs on every worker's share of the val set (Ray splits it equally, dropping up to
num_workers − 1 rows to do so) and sums the metric accumulators across workers with one all-reduce.

Outputs (rank 0, under ``output_dir``, which must be shared storage on a multi-node cluster): ``metrics.jsonl``
and ``tensorboard/`` (``runlog.py``), ``data_stats.txt`` (Ray Data's per-stage timing of the input pipeline),
``eval.json`` and ``student/`` (safetensors + tokenizer).
"""

from __future__ import annotations

import logging
import math
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import (CheckpointConfig, CheckpointConsistencyMode, CheckpointUploadMode, DataConfig, FailureConfig,
                       RunConfig, ScalingConfig)
from ray.train.torch import TorchTrainer
from ray.util.annotations import RayDeprecationWarning
from torch import nn

from tailkd_ray.config import Config, ConfigError, from_dict, to_dict
from tailkd_ray.core.losses import distill_objective
from tailkd_ray.core.metrics import block_tensors, evaluate
from tailkd_ray.core.summary import FIELDS, TeacherSummary
from tailkd_ray.data.hashing import epoch_shuffle_seed, rows_fingerprint
from tailkd_ray.errors import NonFiniteLossError
from tailkd_ray.models import (build_student, inference_dtype, load_teacher, shared_vocab_size, student_config,
                               teacher_logits)
from tailkd_ray.placement import require_train_placement, train_worker_resources
from tailkd_ray.runtime import train_logging_config
from tailkd_ray.train.checkpoint import (Progress, export_student, load_checkpoint, resume_checkpoint,
                                         save_checkpoint)
from tailkd_ray.train.runlog import RunLog, run_complete, timed, write_eval_json
from tailkd_ray.train.strategies import STRATEGIES

log = logging.getLogger(__name__)

TEACHER_MODES = ("summary", "colocated", "none")
StepHook = Callable[[int, int], None]  # (optimizer step just finished, world rank)
DATA_STATS_FILE = "data_stats.txt"


def teacher_mode_for(cfg: Config) -> str:
    """``none`` without a teacher (CLM only), ``colocated`` when ``summary.top_m`` is null, else ``summary``."""
    if cfg.teacher.model is None:
        if cfg.loss.kind != "clm":
            raise ConfigError(f"loss.kind = {cfg.loss.kind} needs a teacher: set teacher.model (or loss.kind: clm)")
        return "none"
    return "colocated" if cfg.summary.top_m is None else "summary"


# --------------------------------------------------------------------------------------------------
# The driver side: a TorchTrainer over the workers
# --------------------------------------------------------------------------------------------------
def run_training(cfg: Config, train_ds, val_ds=None, teacher_mode: Optional[str] = None, *,
                 step_hook: Optional[StepHook] = None, callbacks: Optional[list] = None,
                 driver_seconds: Optional[dict] = None):
    """Train the student with Ray Train; returns the ``ray.train.Result``.

    ``teacher_mode`` is ``summary`` (rows carry summary columns), ``colocated`` (exact, teacher in every
    worker) or ``none`` (CLM only); None derives it from the config (``teacher_mode_for``). ``step_hook(step,
    rank)`` runs in every worker after each optimizer step (monitoring; fault injection in tests).
    ``callbacks`` go to the trainer's ``RunConfig`` (e.g. a Tune trial's ``TuneReportCallback``).
    ``driver_seconds``: the caller's stages before this (``runlog``: preflight_s, ...), for the ``setup`` records.
    The val set is read once, before training (``val_read_s``).
    Checkpoints and Ray's run state live in ``output_dir/ray_train/<train.run_name>``. Workers are placed by
    ``placement.train_worker_resources``; a cluster that cannot host ``train.num_workers`` of them fails here
    (``PlacementError``) instead of waiting forever, unless ``autoscaling`` is set.
    """
    mode = teacher_mode or teacher_mode_for(cfg)
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
    if mode == "none" and cfg.loss.kind != "clm":
        raise ConfigError(f"loss.kind = {cfg.loss.kind} needs a teacher; teacher_mode none trains CLM only")
    require_train_placement(cfg.train, allow_autoscale=cfg.autoscaling)
    if cfg.student.model is None:
        student_config(cfg)  # a bad student.config fails here, by name, not inside a worker
    shared_vocab = shared_vocab_size(cfg) if mode == "colocated" else None
    seconds = dict(driver_seconds or {})
    datasets = {"train": train_ds}
    if val_ds is not None:
        # Read once, into the object store: every validation reads it there instead of running its pipeline again
        # (a cache's Parquet listed and read, the teacher pool started and scoring, a held-out split hashed over
        # the whole corpus, at every validation).
        with timed(seconds, "val_read_s"):
            datasets["val"] = val_ds.materialize()
    storage_path = Path(cfg.output_dir).resolve() / "ray_train"
    resume_from = resume_checkpoint(storage_path / cfg.train.run_name)
    train = cfg.train
    log.info("training %s: %d %s worker(s) (%s), %d steps of %d x %d sequences x %d tokens per worker, loss %s, "
             "teacher %s, validation every %d steps", train.run_name, train.num_workers,
             "GPU" if train.use_gpu else "CPU", train.strategy, train.max_steps, train.grad_accum, train.batch_size,
             cfg.data.seq_len, cfg.loss.kind, mode, train.eval_every)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "teacher_mode": mode, "step_hook": step_hook,
                           "datasets": sorted(datasets), "shared_vocab": shared_vocab,
                           "resume_from": resume_from and str(resume_from),
                           "driver_seconds": seconds, "fit_called": time.time()},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=train_worker_resources(cfg.train)),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks or []),
                             logging_config=train_logging_config()),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest_options()),
    )
    return trainer.fit()


def ingest_options():
    """Ray Data's options for the workers' streams: Ray Train's default (the driver's DataContext), in order.
    Train applies these, not the datasets' own options, so without ``preserve_order`` the teacher pool's batches
    reach the streaming split as they finish, and which worker trains which block, and so which blocks a resumed
    worker skips, changes from run to run: blocks trained twice and others never (DESIGN §10; jobs/chaos.py)."""
    with warnings.catch_warnings():  # Ray's own: its default passes the deprecated exclude_resources on
        warnings.simplefilter("ignore", RayDeprecationWarning)
        options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


# --------------------------------------------------------------------------------------------------
# The worker: setup, then the loop
# --------------------------------------------------------------------------------------------------
@dataclass
class _Worker:
    """What one training worker holds for the whole run."""

    cfg: Config
    mode: str  # TEACHER_MODES
    rank: int
    world_size: int
    device: torch.device
    out_dir: Path
    teacher: Optional[nn.Module]  # co-located mode only
    shared_vocab: Optional[int]  # co-located mode only: the tokenizer's length (padded vocabularies)
    student_rows: int  # the student's vocab_size (LM-head rows)
    strategy: object  # a strategies.STRATEGIES instance
    log: RunLog
    has_val: bool
    step_hook: Optional[StepHook]

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()


@dataclass
class _Attempt:
    """What one attempt of the worker group counts (a restarted group starts a new attempt)."""

    started: float  # time.perf_counter() when its first step began
    first_step: int  # the optimizer step it started from (0, or a checkpoint's)
    skipped: int = 0  # non-finite steps it skipped (train.max_nonfinite_steps)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train V2 worker entry point; ``config`` = {"cfg": to_dict(Config), "teacher_mode", "step_hook",
    "datasets": names of the datasets given to the trainer, "resume_from": the driver's checkpoint or None,
    "driver_seconds": the driver's stages, "fit_called": its time.time() at trainer.fit()}."""
    worker_started, seconds = time.perf_counter(), {"worker_start_s": time.time() - config["fit_called"]}
    with timed(seconds, "student_build_s"):
        worker = _setup_worker(config)
    progress = _restore(worker, config["resume_from"])
    if progress is None:
        return  # a relaunch of a finished run: nothing new
    cfg, train_shard = worker.cfg, ray.train.get_dataset_shard("train")
    batches = micro_batches(train_shard, cfg.train.batch_size, progress, prefetch_batches=cfg.train.prefetch_batches,
                            shuffle_buffer=cfg.train.shuffle_buffer if cfg.data.shuffle else 0,
                            seed=cfg.train.seed, rank=worker.rank)
    worker.log.open()
    dist.barrier()  # every rank starts its first step (and pulls data) together, after rank 0's trackers started
    attempt = _Attempt(started=time.perf_counter(), first_step=progress.step)
    # Fixed costs are records of their own (setup here; checkpoints, export): short runs are dominated by them.
    # worker_start_s: the driver's trainer.fit() to this worker's start (controller, placement group, worker
    # processes, imports; a restarted attempt counts the attempts before it too, and clocks of two nodes may differ).
    worker.log.write("setup", {"step": progress.step, "setup_s": attempt.started - worker_started, **seconds,
                               **config["driver_seconds"]})
    final = None  # the last step's validation metrics
    while progress.step < cfg.train.max_steps:
        _optimizer_step(worker, batches, progress, attempt)
        if worker.step_hook is not None:
            worker.step_hook(progress.step, worker.rank)
        last = progress.step == cfg.train.max_steps
        metrics = {"step": progress.step}
        if worker.has_val and (progress.step % cfg.train.eval_every == 0 or last):
            started = time.perf_counter()
            metrics.update(_validate(worker))
            worker.log.write("eval", {**metrics, "eval_s": time.perf_counter() - started})
            if worker.rank == 0:
                print(eval_line(metrics, cfg.train.max_steps), flush=True)
            final = metrics if last else None
        _report(worker, progress, metrics, checkpoint=progress.step % cfg.train.checkpoint_every == 0 or last)
    _finish(worker, progress, final, train_shard)


def _setup_worker(config: dict) -> _Worker:
    """Config, device, co-located teacher, student and strategy of this worker (in dependency order)."""
    cfg = from_dict(config["cfg"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    teacher = None
    if config["teacher_mode"] == "colocated":
        teacher = load_teacher(cfg.teacher, device=device, dtype=inference_dtype(device))
    student = build_student(cfg, teacher_state=teacher.state_dict() if teacher is not None else None)
    student_rows = student.get_output_embeddings().weight.shape[0]
    strategy = STRATEGIES[cfg.train.strategy](student, cfg, device)
    strategy.train(True)
    torch.manual_seed(cfg.train.seed + 1000 * (rank + 1))  # per-rank stream (dropout); model init is shared
    out_dir = Path(cfg.output_dir).resolve()
    return _Worker(cfg=cfg, mode=config["teacher_mode"], rank=rank, world_size=context.get_world_size(),
                   device=device, out_dir=out_dir, teacher=teacher, shared_vocab=config.get("shared_vocab"),
                   student_rows=student_rows, strategy=strategy,
                   log=RunLog(out_dir, enabled=rank == 0, config=config["cfg"]),
                   has_val="val" in config.get("datasets", ()),
                   step_hook=config.get("step_hook"))


def _restore(worker: _Worker, resume_from: Optional[str]) -> Optional[Progress]:
    """Progress from Ray Train's latest checkpoint (a restarted worker group, or a relaunch whose run snapshot
    agrees with the driver), else from ``resume_from`` (the driver's newest intact checkpoint,
    ``checkpoint.resume_checkpoint``), else from the start; None for a relaunch of a run that finished and wrote
    its outputs."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from is None:
        return Progress()
    with checkpoint.as_directory() if checkpoint is not None else nullcontext(resume_from) as directory:
        progress = load_checkpoint(worker.strategy, directory, worker.rank)
    finished = progress.step >= worker.cfg.train.max_steps and worker.rank == 0 and run_complete(worker.out_dir)
    if _broadcast_flag(finished, worker.device):
        return None
    worker.log.write("resume", {"resumed_from_step": progress.step, **asdict(progress)})
    return progress


def micro_batches(shard, batch_size: int, progress: Progress, *, prefetch_batches: int = 1, shuffle_buffer: int = 0,
                  seed: int = 0, rank: int = 0) -> Iterator[dict]:
    """Endless micro-batches of a worker's shard, epoch after epoch, resuming at ``progress``: the first
    ``progress.batches_in_epoch`` batches of the current epoch are read and discarded (see module doc). With a
    ``shuffle_buffer`` (rows; 0 = none) every epoch is reshuffled locally with ``epoch_shuffle_seed(seed, epoch,
    rank)``."""
    skip = progress.batches_in_epoch
    while True:
        produced = 0
        shuffle = {} if not shuffle_buffer else {"local_shuffle_buffer_size": shuffle_buffer,
                                                 "local_shuffle_seed": epoch_shuffle_seed(seed, progress.epoch, rank)}
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=prefetch_batches,
                                              **shuffle):
            produced += 1
            if produced <= skip:
                continue
            progress.batches_in_epoch = produced
            yield batch
        if produced == 0:
            raise RuntimeError(f"the training shard of this worker has fewer than train.batch_size = {batch_size} "
                               f"rows: lower train.batch_size or train.num_workers, or add data")
        skip = 0
        progress.epoch += 1
        progress.batches_in_epoch = 0


# --------------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------------
def _optimizer_step(worker: _Worker, batches: Iterator[dict], progress: Progress, attempt: _Attempt) -> None:
    """One optimizer step over ``train.grad_accum`` micro-batches, its records and progress line. A step whose loss
    or gradient is not finite is skipped (no update) while ``train.max_nonfinite_steps`` allows, else the run stops."""
    cfg, strategy, started = worker.cfg, worker.strategy, time.perf_counter()
    local = _forward_backward(worker, batches)
    per_rank = _all_gather_rows(local.to(worker.device))
    sums = per_rank.sum(0)
    optimizing = time.perf_counter()
    grad_norm = strategy.grad_norm()
    progress.step += 1
    problem = nonfinite_problem(progress.step, per_rank, grad_norm)
    if problem and attempt.skipped >= cfg.train.max_nonfinite_steps:
        raise NonFiniteLossError(f"non-finite training loss or gradient at {problem} (train.max_nonfinite_steps"
                                 f" = {cfg.train.max_nonfinite_steps}, {attempt.skipped} skipped before)")
    strategy.step(update=problem is None)
    lr = strategy.lr
    finished = time.perf_counter()
    if problem:
        attempt.skipped += 1
        worker.log.write("nonfinite", {"step": progress.step, "problem": problem, "skipped": attempt.skipped})
    tokens = max(float(sums[3]), 1.0)
    # Where the step went, on rank 0 (compute includes the loss all-reduce); data_wait_s is the mean over
    # workers, elapsed_s counts from the attempt's first step (evaluations and checkpoints included).
    record = {"step": progress.step, "loss": float(sums[0]) / tokens, "clm": float(sums[1]) / tokens,
              "div": float(sums[2]) / tokens, "lr": lr, "grad_norm": grad_norm, "tokens": int(sums[3]),
              "epoch": progress.epoch, "step_time_s": finished - started,
              "data_wait_s": float(sums[4]) / worker.world_size, "compute_s": optimizing - started - float(local[4]),
              "optimizer_s": finished - optimizing, "elapsed_s": finished - attempt.started,
              "peak_memory_mb": peak_memory_mb(worker.device),
              "rows_fingerprint": [f"{int(rows):013x}" for rows in per_rank[:, 5].tolist()]}
    worker.log.write("step", record)
    if worker.rank == 0 and progress_due(progress.step, cfg.train):
        print(progress_line(record, cfg.train.max_steps, steps_done=progress.step - attempt.first_step), flush=True)


def _forward_backward(worker: _Worker, batches: Iterator[dict]) -> torch.Tensor:
    """Forward and backward over ``grad_accum`` micro-batches; returns [loss, clm, div] token sums, the token count,
    the seconds spent waiting for input (data pipeline, teacher pool) — a step starved of teacher summaries
    shows there, not in the compute time — and the fingerprint of the rows trained on (``rows_fingerprint``)."""
    cfg = worker.cfg
    kwargs = asdict(cfg.loss)  # kind, k, beta, normalize, temperature, weight, chunk_tokens
    sums = torch.zeros(6, dtype=torch.float64)
    rows = []
    for micro in range(cfg.train.grad_accum):
        waiting = time.perf_counter()
        batch = next(batches)
        sums[4] += time.perf_counter() - waiting
        rows.append(batch["input_ids"].cpu().numpy())
        inputs, targets, mask, positions = block_tensors(batch, worker.device)
        teacher = None if cfg.loss.kind == "clm" else _teacher_for_batch(worker, inputs, positions, batch)

        def head_fn(hidden, weight, bias):
            out = distill_objective(hidden, weight, targets, teacher, lm_head_bias=bias, mask=mask,
                                    position_ids=positions, **kwargs)
            # The loss leaves the module's forward as a plain tensor so that DeepSpeed ZeRO-3 / FSDP2 hook it
            # (they re-gather the LM head for backward through hooks on forward outputs; a dataclass hides it).
            return out.loss, out

        with worker.strategy.sync_context(micro == cfg.train.grad_accum - 1), worker.autocast():
            loss, out = worker.strategy(inputs, head_fn, position_ids=positions)
            worker.strategy.backward(loss)
        sums[:4] += torch.tensor([out.loss.item() * out.tokens, float(out.clm) * out.tokens,
                                  float(out.div) * out.tokens, out.tokens], dtype=torch.float64)
    sums[5] = rows_fingerprint(np.concatenate(rows))  # < 2**52: exact in float64
    return sums


def _teacher_for_batch(worker: _Worker, inputs: torch.Tensor, positions: Optional[torch.Tensor], batch: dict):
    """The loss's ``teacher`` argument for one batch: full logits, a summary, or None."""
    if worker.mode == "colocated":
        with torch.no_grad():
            return _colocated_logits(worker, inputs, positions)
    if worker.mode == "summary":
        missing = [f for f in FIELDS if f not in batch]
        if missing:
            raise KeyError(f"summary mode needs the teacher-summary columns in every training row; the batch lacks "
                           f"{missing} (has {sorted(batch)}): score the dataset first (tailkd_ray.teacher)")
        return TeacherSummary.from_batch(batch).to(worker.device)
    return None


def _colocated_logits(worker: _Worker, inputs: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """The co-located teacher's logits over the student's rows (``models.teacher_logits``)."""
    return teacher_logits(worker.teacher, inputs, positions, shared_vocab=worker.shared_vocab,
                          student_rows=worker.student_rows)


def progress_due(step: int, train) -> bool:
    """Whether rank 0 prints a progress line after ``step``: every ``train.log_every`` steps and at the end."""
    every = train.log_every or max(1, train.max_steps // 20)  # 0: about 20 lines per run
    return step % every == 0 or step == train.max_steps


def progress_line(record: dict, max_steps: int, *, steps_done: int) -> str:
    """One line of training progress from a step record: step, losses, throughput, data wait and time left."""
    per_step = record["elapsed_s"] / max(steps_done, 1)
    left = per_step * (max_steps - record["step"])
    return (f"train step {record['step']}/{max_steps}  loss {record['loss']:.4f}  clm {record['clm']:.4f}  "
            f"div {record['div']:.4f}  {record['tokens'] / max(record['step_time_s'], 1e-9):,.0f} tok/s  "
            f"data wait {record['data_wait_s']:.2f}s  ETA {int(left) // 60}m{int(left) % 60:02d}s")


def eval_line(metrics: dict, max_steps: int) -> str:
    """One line of a validation's results (DESIGN §7); the teacher metrics only when there is a teacher."""
    line = f"eval step {metrics['step']}/{max_steps}  val_loss {metrics['val_loss']:.4f}  ppl {metrics['val_ppl']:.4g}"
    if metrics.get("kl_source", "none") != "none":
        line += (f"  kl_to_teacher {metrics['kl_to_teacher']:.4g} ({metrics['kl_source']})  "
                 f"top1_agreement {metrics['top1_agreement']:.4f}")
    return line + f"  full_ece {metrics['full_ece']:.4g}"


def nonfinite_problem(step: int, per_rank: torch.Tensor, grad_norm: Optional[float]) -> Optional[str]:
    """None when the step is finite, else what was not: the ranks, the term (CLM or divergence) and the values.
    ``per_rank`` [world, 6] holds each rank's (loss, clm, div) token sums, token count, data wait and rows
    fingerprint."""
    bad = []
    for rank, (loss, clm, div, tokens, *_) in enumerate(per_rank.tolist()):
        terms = [name for name, value in (("CLM", clm), ("divergence", div)) if not math.isfinite(value)]
        if terms or not math.isfinite(loss):
            tokens = max(tokens, 1.0)
            bad.append(f"rank {rank}: {' and '.join(terms) or 'loss'} not finite (mean CLM {clm / tokens:.6g}, "
                       f"mean divergence {div / tokens:.6g} over {int(tokens)} tokens)")
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"gradient norm {grad_norm}")
    return f"step {step}: " + "; ".join(bad) if bad else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: allocated on the GPU, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------------
# Validation, reports and checkpoints, the final outputs
# --------------------------------------------------------------------------------------------------
def _validate(worker: _Worker) -> dict:
    """Validation metrics over every worker's val shard, summed across workers (``core.metrics``)."""
    shard = ray.train.get_dataset_shard("val")
    teacher_fn = (lambda ids, positions: _colocated_logits(worker, ids, positions)) if worker.mode == "colocated" \
        else None
    worker.strategy.train(False)
    with worker.autocast():
        metrics = evaluate(worker.strategy, shard.iter_torch_batches(batch_size=worker.cfg.train.batch_size),
                           teacher=teacher_fn, k=worker.cfg.loss.k, chunk_tokens=worker.cfg.loss.chunk_tokens,
                           device=worker.device, reduce=_all_reduce_sum)
    worker.strategy.train(True)
    metrics["kl_source"] = {"colocated": "exact", "summary": "summary", "none": "none"}[worker.mode]
    return metrics


def _report(worker: _Worker, progress: Progress, metrics: dict, *, checkpoint: bool) -> None:
    """Report the step's validation metrics to Ray Train, with a checkpoint when one is due."""
    if checkpoint:
        started = time.perf_counter()
        ray.train.report(metrics, checkpoint=save_checkpoint(worker.strategy, progress, worker.rank),
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        # Wait until the controller has registered it (it polls workers every ~2 s): a worker dying in
        # that window would otherwise lose this checkpoint too, i.e. more than one interval of work.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        worker.log.write("checkpoint", {"step": progress.step, "checkpoint_s": time.perf_counter() - started})
    elif len(metrics) > 1:  # metrics reported without a checkpoint are not kept by Ray, only passed on (Tune)
        ray.train.report(metrics)


def _finish(worker: _Worker, progress: Progress, final: Optional[dict], train_shard) -> None:
    """The run's outputs: data_stats.txt, the exported student and eval.json (also made by a relaunch that finds
    the last checkpoint but not the outputs)."""
    if worker.rank == 0:  # per-stage time of the input pipeline (read, teacher pool, ...) of this worker's shard
        (worker.out_dir / DATA_STATS_FILE).write_text(train_shard.stats() + "\n")
    if final is None:
        final = {"step": progress.step, **(_validate(worker) if worker.has_val else {})}
    started = time.perf_counter()
    export_student(worker.strategy, worker.cfg, worker.out_dir, worker.rank)
    worker.log.write("export", {"step": progress.step, "export_s": time.perf_counter() - started})
    if worker.rank == 0:
        write_eval_json(final, worker.out_dir)
    worker.log.final(final)
    worker.log.close()


# --------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------
def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _all_gather_rows(row: torch.Tensor) -> torch.Tensor:
    """Every rank's ``row`` stacked [world, n] (on CPU), so a failure can be traced to its rank."""
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return torch.stack(rows).cpu()


def _broadcast_flag(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())
