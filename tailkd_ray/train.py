"""Ray Train student training: the worker loop (FSDP2 | DDP | DeepSpeed ZeRO-3), checkpoints, resume, export.

``run_training`` builds a ``TorchTrainer`` (Ray Train V2) whose workers run ``train_loop_per_worker``:

- data: ``ray.train.get_dataset_shard("train").iter_torch_batches``; each row holds ``input_ids`` (seq_len + 1
  tokens) and, in summary mode, the five teacher-summary columns for positions 0..seq_len-1;
- objective: ``losses.distill_objective`` on the student's final hidden states and LM head (chunked over
  tokens; never a [B·T, V] float32 tensor): mean over tokens of CLM + λ·L_DIV;
- AdamW, linear warmup + cosine decay to 0, gradient clipping, gradient accumulation, bf16 on GPU only;
- teacher: a ``TeacherSummary`` from the batch (``summary``), full logits of a teacher loaded in every
  worker (``colocated``, exact loss), or none (``none``: CLM only, no teacher metrics);
- checkpoints every ``train.checkpoint_every`` steps and at the end: model + optimizer with
  ``torch.distributed.checkpoint`` (FSDP2 / DDP) or DeepSpeed's own ZeRO-3 checkpoint, plus per-rank
  step, scheduler, RNG and data position, reported with ``ray.train.report``. A restarted worker group
  (``FailureConfig``) or a relaunch with the same ``train.run_name`` and ``output_dir`` resumes from the
  latest one; a relaunch after completion returns without training or writing anything.

Data position. Each worker records (epoch, micro-batches consumed in that epoch) of its own shard; on
resume it re-reads its shard and discards that many micro-batches before training. This resumes at the
same rows when the dataset order is deterministic (``from_items``/Parquet reads and the packers here
are; a ``random_shuffle`` without a seed is not) and the streaming split hands blocks to the workers in the
same way, which Ray does not guarantee: the number of rows skipped per worker is exact, but which rows a
worker received before the failure may differ by whole blocks from what it receives now. The skipped
micro-batches are still read (and, in streamed summary mode, scored by the teacher) — resume costs I/O,
not training steps.

Validation runs on every worker's share of the val set (Ray splits it equally, dropping up to
num_workers − 1 rows to do so) and sums the metric accumulators across workers with one all-reduce.

Outputs (rank 0, under ``output_dir``, which must be shared storage on a multi-node cluster):
``metrics.jsonl`` (one record per step, per evaluation, and ``resumed_from_step`` on resume; a step's record
splits its time into ``data_wait_s``, ``compute_s`` and ``optimizer_s`` and records rank 0's ``peak_memory_mb``;
the fixed costs get records of their own: ``setup_s`` before the first step, ``checkpoint_s`` per checkpoint,
``export_s``),
``data_stats.txt`` (Ray Data's per-stage timing of the input pipeline), ``tensorboard/`` event files,
``eval.json`` and ``student/`` (safetensors + tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from tailkd_ray.config import Config, ConfigError, from_dict, to_dict
from tailkd_ray.errors import NonFiniteLossError
from tailkd_ray.runtime import train_logging_config
from tailkd_ray.core.summary import FIELDS, TeacherSummary

TEACHER_MODES = ("summary", "colocated", "none")
StepHook = Callable[[int, int], None]  # (optimizer step just finished, world rank)


def teacher_mode_for(cfg: Config) -> str:
    """``none`` without a teacher (CLM only), ``colocated`` when ``summary.top_m`` is null, else ``summary``."""
    if cfg.teacher.model is None:
        if cfg.loss.kind != "clm":
            raise ConfigError(f"loss.kind = {cfg.loss.kind} needs a teacher: set teacher.model (or loss.kind: clm)")
        return "none"
    return "colocated" if cfg.summary.top_m is None else "summary"


def lr_factor(step: int, *, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup_steps``, then cosine decay to 0 at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# --------------------------------------------------------------------------------------------------
# Strategies: one interface over FSDP2, DDP and DeepSpeed ZeRO-3
# --------------------------------------------------------------------------------------------------
class TorchStrategy:
    """FSDP2 or DDP with a torch AdamW, LambdaLR schedule and ``torch.distributed.checkpoint``."""

    def __init__(self, student: nn.Module, cfg: Config, device: torch.device):
        from tailkd_ray.models import StudentWithHead

        self.cfg = cfg
        wrapper = StudentWithHead(student)
        if cfg.train.strategy == "fsdp":
            self.module = _fully_shard(wrapper, device, bf16=cfg.train.use_gpu)
        else:
            import ray.train.torch

            self.module = ray.train.torch.prepare_model(wrapper, move_to_device=device, parallel_strategy="ddp")
        self.optimizer = _adamw(self.module, cfg)
        self.scheduler = _schedule(self.optimizer, cfg)

    def __call__(self, input_ids, head_fn):
        return self.module(input_ids, head_fn)

    def sync_context(self, last_micro_step: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of an accumulation."""
        if self.cfg.train.strategy == "ddp":
            return nullcontext() if last_micro_step else self.module.no_sync()
        self.module.set_requires_gradient_sync(last_micro_step)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum).backward()

    def grad_norm(self) -> float:
        """The global gradient norm, after clipping the gradients to ``train.grad_clip``."""
        max_norm = self.cfg.train.grad_clip or float("inf")  # inf: measure the norm, clip nothing
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self, update: bool = True) -> None:
        """Apply the accumulated gradients (or, ``update=False``, drop them); the schedule advances either way."""
        if update:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: str) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
        return {"scheduler": self.scheduler.state_dict()}

    def load(self, directory: str, extra: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(extra["scheduler"])

    def full_state_dict(self) -> Optional[dict]:
        """The full (unsharded) student state dict on CPU, on rank 0 only (None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        return _strip_wrapper(state) if dist.get_rank() == 0 else None


class DeepSpeedStrategy:
    """DeepSpeed ZeRO-3 with the same AdamW and schedule; DeepSpeed's own (ZeRO-partitioned) checkpoints."""

    def __init__(self, student: nn.Module, cfg: Config, device: torch.device):
        import deepspeed

        from tailkd_ray.models import StudentWithHead

        self.cfg = cfg
        wrapper = StudentWithHead(student)
        wrapper.register_for_zero3()
        optimizer = _adamw(wrapper, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, lr_scheduler=_schedule(optimizer, cfg),
            config=deepspeed_config(cfg, dist.get_world_size()))

    def __call__(self, input_ids, head_fn):
        return self.engine(input_ids, head_fn)

    def sync_context(self, last_micro_step: bool):
        return nullcontext()  # DeepSpeed accumulates and syncs at its own boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        self.engine.step()  # a real optimizer step only at the accumulation boundary

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()  # None when DeepSpeed did not compute it
        return float(norm) if norm is not None else None

    def step(self, update: bool = True) -> None:
        # The engine stepped inside backward; config validation keeps max_nonfinite_steps (update=False) off it.
        assert update, "DeepSpeed cannot skip a step it has already applied"

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: str) -> dict:
        self.engine.save_checkpoint(directory, tag="state")
        return {}

    def load(self, directory: str, extra: dict) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="state")
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/state")

    def full_state_dict(self) -> Optional[dict]:
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if dist.get_rank() != 0:
                return None
            return _strip_wrapper({k: v.detach().cpu().clone() for k, v in module.state_dict().items()})


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed ZeRO-3 config from ours: batch sizes, accumulation, clipping, bf16 on GPU only."""
    train = cfg.train
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": train.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _adamw(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _schedule(optimizer: torch.optim.Optimizer, cfg: Config):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, warmup_steps=cfg.train.warmup_steps, max_steps=cfg.train.max_steps))


def _fully_shard(wrapper: nn.Module, device: torch.device, *, bf16: bool) -> nn.Module:
    """FSDP2: each decoder block is a unit, then the root (embeddings, final norm, LM head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tailkd_ray.models import decoder_blocks

    wrapper.to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in decoder_blocks(wrapper.model):
        fully_shard(block, mp_policy=policy)
    fully_shard(wrapper, mp_policy=policy)
    return wrapper


def _strip_wrapper(state: dict) -> dict:
    """``StudentWithHead`` state -> the HF model's own key names."""
    return {key.removeprefix("module.").removeprefix("model."): value for key, value in state.items()}


STRATEGIES = {"fsdp": TorchStrategy, "ddp": TorchStrategy, "deepspeed": DeepSpeedStrategy}


# --------------------------------------------------------------------------------------------------
# Data position, checkpoints, logging
# --------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a worker is: optimizer steps done and its own shard position (epoch, micro-batches in it)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def micro_batches(shard, batch_size: int, progress: Progress, *, prefetch_batches: int = 1) -> Iterator[dict]:
    """Endless micro-batches of a worker's shard, epoch after epoch, resuming at ``progress``: the first
    ``progress.batches_in_epoch`` batches of the current epoch are read and discarded (see module doc)."""
    skip = progress.batches_in_epoch
    while True:
        produced = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=prefetch_batches):
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


def _rank_file(directory: str, rank: int) -> Path:
    return Path(directory) / f"progress_rank{rank}.json"


def save_checkpoint(strategy, progress: Progress, rank: int):
    """Write this worker's part of the step's checkpoint straight into the run's storage directory and return it
    as a ``ray.train.Checkpoint``. Ray registers it in place (``NO_UPLOAD``): writing to a local temporary
    directory for Ray to copy would write every checkpoint twice (12 bytes per parameter with AdamW). The ranks'
    files do not collide (DCP and DeepSpeed name them per rank); ``output_dir`` is shared storage anyway."""
    import ray.train

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
    extra = json.loads(_rank_file(directory, rank).read_text())
    strategy.load(directory, extra)
    rng = torch.load(Path(directory) / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return Progress(**extra["progress"])


class RunLog:
    """Rank 0's metrics.jsonl + TensorBoard writer (other ranks get a no-op log)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict, *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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


def _outputs_complete(out_dir: Path) -> bool:
    return (out_dir / "eval.json").is_file() and (out_dir / "student" / "config.json").is_file()


# --------------------------------------------------------------------------------------------------
# The worker loop
# --------------------------------------------------------------------------------------------------
def _teacher_for_batch(mode: str, teacher_model, inputs: torch.Tensor, batch: dict, device: torch.device):
    """The loss's ``teacher`` argument for one batch: full logits, a summary, or None."""
    if mode == "colocated":
        with torch.no_grad():
            return teacher_model(input_ids=inputs).logits
    if mode == "summary":
        missing = [f for f in FIELDS if f not in batch]
        if missing:
            raise KeyError(f"summary mode needs the teacher-summary columns in every training row; the batch lacks "
                           f"{missing} (has {sorted(batch)}): score the dataset first (tailkd_ray.cache)")
        return TeacherSummary.from_batch(batch).to(device)
    return None


def _train_step(strategy, batches: Iterator[dict], cfg: Config, mode: str, teacher_model, device, autocast):
    """One optimizer step's forward/backward over ``grad_accum`` micro-batches; returns summed (loss, clm, div),
    the token count, and the seconds spent waiting for input (data pipeline, teacher pool) — a step starved
    of teacher summaries shows here, not in the compute time."""
    from tailkd_ray.core.losses import distill_objective

    kwargs = asdict(cfg.loss)  # kind, k, beta, normalize, temperature, weight, chunk_tokens
    sums = torch.zeros(5, dtype=torch.float64)
    for micro in range(cfg.train.grad_accum):
        waiting = time.perf_counter()
        batch = next(batches)
        sums[4] += time.perf_counter() - waiting
        ids = batch["input_ids"].to(device).long()
        inputs, targets = ids[:, :-1], ids[:, 1:]
        teacher = None if cfg.loss.kind == "clm" else _teacher_for_batch(mode, teacher_model, inputs, batch, device)

        def head_fn(hidden, weight, bias):
            out = distill_objective(hidden, weight, targets, teacher, lm_head_bias=bias, **kwargs)
            # The loss leaves the module's forward as a plain tensor so that DeepSpeed ZeRO-3 / FSDP2 hook it
            # (they re-gather the LM head for backward through hooks on forward outputs; a dataclass hides it).
            return out.loss, out

        with strategy.sync_context(micro == cfg.train.grad_accum - 1), autocast():
            loss, out = strategy(inputs, head_fn)
            strategy.backward(loss)
        sums[:4] += torch.tensor([out.loss.item() * out.tokens, float(out.clm) * out.tokens,
                                  float(out.div) * out.tokens, out.tokens], dtype=torch.float64)
    return sums


def _evaluate(strategy, cfg: Config, mode: str, teacher_model, device, autocast) -> dict:
    """Validation metrics over every worker's val shard, summed across workers (eval.py)."""
    import ray.train

    from tailkd_ray.eval import evaluate

    shard = ray.train.get_dataset_shard("val")
    teacher_fn = (lambda ids: teacher_model(input_ids=ids).logits) if mode == "colocated" else None
    strategy.train(False)
    with autocast():
        metrics = evaluate(strategy, shard.iter_torch_batches(batch_size=cfg.train.batch_size), teacher=teacher_fn,
                           k=cfg.loss.k, chunk_tokens=cfg.loss.chunk_tokens, device=device, reduce=_all_reduce_sum)
    strategy.train(True)
    metrics["kl_source"] = {"colocated": "exact", "summary": "summary", "none": "none"}[mode]
    return metrics


def _export(strategy, cfg: Config, out_dir: Path, rank: int) -> None:
    """Gather the full student on rank 0 and save it in HF format (safetensors) with the tokenizer."""
    from transformers import AutoModelForCausalLM

    from tailkd_ray.models import export_dtype, load_tokenizer, student_config

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
    target = out_dir / "student"
    model.to(export_dtype(cfg)).save_pretrained(target)
    load_tokenizer(cfg).save_pretrained(target)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: allocated on the GPU, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _progress_due(step: int, train) -> bool:
    every = train.log_every or max(1, train.max_steps // 20)  # 0: about 20 lines per run
    return step % every == 0 or step == train.max_steps


def progress_line(record: dict, max_steps: int, *, steps_done: int) -> str:
    """One line of training progress from a step record: step, losses, throughput, data wait and time left."""
    per_step = record["elapsed_s"] / max(steps_done, 1)
    left = per_step * (max_steps - record["step"])
    return (f"train step {record['step']}/{max_steps}  loss {record['loss']:.4f}  clm {record['clm']:.4f}  "
            f"div {record['div']:.4f}  {record['tokens'] / max(record['step_time_s'], 1e-9):,.0f} tok/s  "
            f"data wait {record['data_wait_s']:.2f}s  ETA {int(left) // 60}m{int(left) % 60:02d}s")


def nonfinite_problem(step: int, per_rank: torch.Tensor, grad_norm: Optional[float]) -> Optional[str]:
    """None when the step is finite, else what was not: the ranks, the term (CLM or divergence) and the values.
    ``per_rank`` [world, 5] holds each rank's (loss, clm, div) token sums, token count and data wait."""
    bad = []
    for rank, (loss, clm, div, tokens, _) in enumerate(per_rank.tolist()):
        terms = [name for name, value in (("CLM", clm), ("divergence", div)) if not math.isfinite(value)]
        if terms or not math.isfinite(loss):
            tokens = max(tokens, 1.0)
            bad.append(f"rank {rank}: {' and '.join(terms) or 'loss'} not finite (mean CLM {clm / tokens:.6g}, "
                       f"mean divergence {div / tokens:.6g} over {int(tokens)} tokens)")
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"gradient norm {grad_norm}")
    return f"step {step}: " + "; ".join(bad) if bad else None


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that alias another one (tied embeddings): a gathered state may omit them."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.update({name, seen[id(param)]})
        seen.setdefault(id(param), name)
    return aliases


def train_loop_per_worker(config: dict) -> None:
    """Ray Train V2 worker entry point; ``config`` = {"cfg": to_dict(Config), "teacher_mode", "step_hook",
    "datasets": names of the datasets given to the trainer}."""
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointConsistencyMode, CheckpointUploadMode

    from tailkd_ray.eval import write_eval_json
    from tailkd_ray.models import build_student, load_teacher

    worker_started = time.perf_counter()
    cfg = from_dict(config["cfg"])
    mode = config["teacher_mode"]
    step_hook: Optional[StepHook] = config.get("step_hook")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = Path(cfg.output_dir).resolve()

    teacher_model = None
    if mode == "colocated":
        teacher_model = load_teacher(cfg.teacher, device=device,
                                     dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    student = build_student(cfg, teacher_state=teacher_model.state_dict() if teacher_model is not None else None)
    strategy = STRATEGIES[cfg.train.strategy](student, cfg, device)
    torch.manual_seed(cfg.train.seed + 1000 * (rank + 1))  # per-rank stream (dropout); model init is shared

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    progress = Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress = load_checkpoint(strategy, directory, rank)
        finished = progress.step >= cfg.train.max_steps
        if _broadcast_flag(finished and rank == 0 and _outputs_complete(out_dir), device):
            return  # a relaunch of a finished run: nothing new
    log = RunLog(out_dir, enabled=rank == 0)
    if checkpoint is not None:
        log.write({"resumed_from_step": progress.step, "step": progress.step, "epoch": progress.epoch,
                   "batches_in_epoch": progress.batches_in_epoch}, prefix="run")

    train_shard = ray.train.get_dataset_shard("train")
    batches = micro_batches(train_shard, cfg.train.batch_size, progress, prefetch_batches=cfg.train.prefetch_batches)
    has_val = "val" in config.get("datasets", ())
    strategy.train(True)
    final: Optional[dict] = None  # the last step's validation metrics
    loop_started = time.perf_counter()
    # Fixed costs, as separate records: model build, sharding and restore before the first step; each
    # checkpoint's write and commit; the export. Short runs (Tune trials) are dominated by them.
    log.write({"step": progress.step, "setup_s": loop_started - worker_started}, prefix="run")
    skipped = 0  # non-finite steps skipped by this attempt (train.max_nonfinite_steps)
    first_step = progress.step
    while progress.step < cfg.train.max_steps:
        started = time.perf_counter()
        local = _train_step(strategy, batches, cfg, mode, teacher_model, device, autocast)
        data_wait = float(local[4])
        per_rank = _all_gather_rows(local.to(device))
        sums = per_rank.sum(0)
        optimizing = time.perf_counter()
        grad_norm = strategy.grad_norm()
        progress.step += 1
        problem = nonfinite_problem(progress.step, per_rank, grad_norm)
        if problem and skipped >= cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(f"non-finite training loss or gradient at {problem} (train.max_nonfinite_steps"
                                     f" = {cfg.train.max_nonfinite_steps}, {skipped} skipped before)")
        strategy.step(update=problem is None)
        lr = strategy.lr
        tokens = max(float(sums[3]), 1.0)
        finished_step = time.perf_counter()
        if problem:
            skipped += 1
            log.write({"kind": "nonfinite", "step": progress.step, "problem": problem, "skipped": skipped},
                      prefix="run")
        # Where the step went, on rank 0 (compute includes the loss all-reduce); data_wait_s is the mean over
        # workers, elapsed_s counts from the first step's start (evaluations and checkpoints included).
        record = {"step": progress.step, "loss": float(sums[0]) / tokens, "clm": float(sums[1]) / tokens,
                  "div": float(sums[2]) / tokens, "lr": lr, "grad_norm": grad_norm, "tokens": int(sums[3]),
                  "epoch": progress.epoch, "step_time_s": finished_step - started,
                  "data_wait_s": float(sums[4]) / context.get_world_size(),
                  "compute_s": optimizing - started - data_wait, "optimizer_s": finished_step - optimizing,
                  "elapsed_s": finished_step - loop_started, "peak_memory_mb": peak_memory_mb(device)}
        log.write(record)
        if rank == 0 and _progress_due(progress.step, cfg.train):
            print(progress_line(record, cfg.train.max_steps, steps_done=progress.step - first_step), flush=True)
        if step_hook is not None:
            step_hook(progress.step, rank)
        last = progress.step == cfg.train.max_steps
        metrics = {"step": progress.step}
        if has_val and (progress.step % cfg.train.eval_every == 0 or last):
            metrics.update(_evaluate(strategy, cfg, mode, teacher_model, device, autocast))
            log.write(metrics, prefix="val")
            final = metrics if last else None
        if progress.step % cfg.train.checkpoint_every == 0 or last:
            checkpoint_started = time.perf_counter()
            ray.train.report(metrics, checkpoint=save_checkpoint(strategy, progress, rank),
                             checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
            # Wait until the controller has registered it (it polls workers every ~2 s): a worker dying in
            # that window would otherwise lose this checkpoint too, i.e. more than one interval of work.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            log.write({"step": progress.step, "checkpoint_s": time.perf_counter() - checkpoint_started}, prefix="run")
        elif len(metrics) > 1:
            ray.train.report(metrics)

    if rank == 0:  # per-stage time of the input pipeline (read, teacher pool, ...) of this worker's shard
        (out_dir / "data_stats.txt").write_text(train_shard.stats() + "\n")
    # Final outputs (also made by a relaunch that finds the last checkpoint but not the outputs).
    if final is None:
        final = {"step": progress.step, **_evaluate(strategy, cfg, mode, teacher_model, device, autocast)} if has_val \
            else {"step": progress.step}
    export_started = time.perf_counter()
    _export(strategy, cfg, out_dir, rank)
    log.write({"step": progress.step, "export_s": time.perf_counter() - export_started}, prefix="run")
    if rank == 0:
        write_eval_json(final, out_dir / "eval.json")
    log.close()


def run_training(cfg: Config, train_ds, val_ds=None, teacher_mode: Optional[str] = None, *,
                 step_hook: Optional[StepHook] = None, callbacks: Optional[list] = None):
    """Train the student with Ray Train; returns the ``ray.train.Result``.

    ``teacher_mode`` is ``summary`` (rows carry summary columns), ``colocated`` (exact, teacher in every
    worker) or ``none`` (CLM only); None derives it from the config (``teacher_mode_for``). ``step_hook(step,
    rank)`` runs in every worker after each optimizer step (monitoring; fault injection in tests).
    ``callbacks`` go to the trainer's ``RunConfig`` (e.g. a Tune trial's ``TuneReportCallback``).
    Checkpoints and Ray's run state live in ``output_dir/ray_train/<train.run_name>``. Workers are placed by
    ``placement.train_worker_resources``; a cluster that cannot host ``train.num_workers`` of them fails here
    (``PlacementError``) instead of waiting forever, unless ``autoscaling`` is set.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tailkd_ray.models import student_config
    from tailkd_ray.placement import require_train_placement, train_worker_resources

    mode = teacher_mode or teacher_mode_for(cfg)
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
    if mode == "none" and cfg.loss.kind != "clm":
        raise ConfigError(f"loss.kind = {cfg.loss.kind} needs a teacher; teacher_mode none trains CLM only")
    require_train_placement(cfg.train, allow_autoscale=cfg.autoscaling)
    if cfg.student.model is None:
        student_config(cfg)  # a bad student.config fails here, by name, not inside a worker
    datasets = {"train": train_ds} if val_ds is None else {"train": train_ds, "val": val_ds}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "teacher_mode": mode, "step_hook": step_hook,
                           "datasets": sorted(datasets)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=train_worker_resources(cfg.train)),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=str(Path(cfg.output_dir).resolve() / "ray_train"),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks or []),
                             logging_config=train_logging_config()),
        datasets=datasets,
    )
    return trainer.fit()


def distill(cfg: Config, *, step_hook: Optional[StepHook] = None) -> dict:
    """``tailkd distill``: data -> teacher summaries (streamed or cached; skipped in co-located mode) ->
    Ray Train -> eval.json + student/. Returns the eval metrics. ``step_hook``: see ``run_training``."""
    from tailkd_ray.data import train_val_datasets

    train_ds, val_ds, report = train_val_datasets(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_data = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report
    (out_dir / "data_report.json").write_text(json.dumps(report_data, indent=2, default=str) + "\n")
    mode = teacher_mode_for(cfg)
    if mode == "summary":
        from tailkd_ray.cache import summaries_for_training

        if cfg.loss.kind != "clm":  # a CLM student needs summaries only for its evaluation
            train_ds = summaries_for_training(cfg, train_ds, split="train")
        if val_ds is not None:
            val_ds = summaries_for_training(cfg, val_ds, split="val")
    run_training(cfg, train_ds, val_ds, mode, step_hook=step_hook)
    return json.loads((out_dir / "eval.json").read_text())
