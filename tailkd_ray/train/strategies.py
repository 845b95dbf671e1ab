"""Strategies: one interface over FSDP2, DDP and DeepSpeed ZeRO-3 for the training loop (DESIGN §5).

A strategy wraps the student (``models.StudentWithHead``) for its parallelism and owns the optimizer (AdamW)
and the learning-rate schedule (``lr_scheduler``: ``train.lr_schedule``, built by transformers): the loop calls
``strategy(input_ids, head_fn, position_ids=None)``, ``sync_context``, ``backward``, ``grad_norm``, ``step``, and for
checkpoints ``save`` / ``load`` / ``full_state_dict``. FSDP2 and DDP checkpoint with ``torch.distributed.checkpoint``,
DeepSpeed with its own ZeRO-partitioned checkpoints, read back with ``torch.load(weights_only=True)``
(``weights_only_checkpoint_engine``). bf16 on GPU only (``mixed_precision``).

Before any wrapping, the student's decoder blocks get activation checkpointing and then regional compilation
(``train.activation_checkpointing``, ``train.compile``; ``models.prepare_decoder_blocks``); FSDP2 then shards each
prepared block as a unit, the order torchtitan uses (AC, compile, ``fully_shard`` per block, then the root).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import (get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup,
                          get_wsd_schedule)

from tailkd_ray.config import Config, TrainConfig
from tailkd_ray.models import StudentWithHead, prepare_decoder_blocks


def lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.lr_schedule`` as transformers builds it: linear warmup over ``warmup_steps`` (from 0; wsd and linear
    from min_lr_ratio · lr), then cosine or linear decay to ``min_lr_ratio`` · lr at ``max_steps``, constant, or
    warmup-stable-decay (a cosine decay over the last ``wsd_decay_steps``). Its state is checkpointed, so a resumed
    run continues the schedule where it stopped."""
    warmup, steps, ratio = train.warmup_steps, train.max_steps, train.min_lr_ratio
    if train.lr_schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, steps, min_lr_rate=ratio)
    if train.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    # linear: warmup-stable-decay without the stable phase (transformers' linear schedule has no floor).
    decay = train.wsd_decay_steps() if train.lr_schedule == "wsd" else max(steps - warmup, 1)
    return get_wsd_schedule(optimizer, warmup, decay, num_stable_steps=max(steps - warmup - decay, 0),
                            decay_type="cosine" if train.lr_schedule == "wsd" else "linear", min_lr_ratio=ratio)


class TorchStrategy:
    """FSDP2 or DDP with a torch AdamW, LambdaLR schedule and ``torch.distributed.checkpoint``."""

    def __init__(self, student: nn.Module, cfg: Config, device: torch.device):
        self.cfg = cfg
        blocks = _prepare_blocks(student, cfg)
        wrapper = StudentWithHead(student)
        if cfg.train.strategy == "fsdp":
            self.module = _fully_shard(wrapper, blocks, device, mixed_precision(cfg.train.use_gpu))
        else:
            # torch's DDP directly (what ray.train.torch.prepare_model wraps), so the strategy runs outside Ray too.
            self.module = DistributedDataParallel(wrapper.to(device),
                                                  device_ids=[device] if device.type == "cuda" else None)
        self.optimizer = _adamw(self.module, cfg, device)
        self.scheduler = lr_scheduler(self.optimizer, cfg.train)

    def __call__(self, input_ids, head_fn, position_ids=None):
        return self.module(input_ids, head_fn, position_ids=position_ids)

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
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
        return {"scheduler": self.scheduler.state_dict()}

    def load(self, directory: str, extra: dict) -> None:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(extra["scheduler"])

    def full_state_dict(self) -> Optional[dict]:
        """The full (unsharded) student state dict on CPU, on rank 0 only (None elsewhere)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        return _strip_wrapper(state) if dist.get_rank() == 0 else None


class DeepSpeedStrategy:
    """DeepSpeed ZeRO-3 with the same AdamW and schedule; DeepSpeed's own (ZeRO-partitioned) checkpoints."""

    def __init__(self, student: nn.Module, cfg: Config, device: torch.device):
        import deepspeed  # deferred: slow to import, and only this strategy needs it

        self.cfg = cfg
        _prepare_blocks(student, cfg)
        wrapper = StudentWithHead(student)
        wrapper.register_for_zero3()
        optimizer = _adamw(wrapper, cfg, device)  # DeepSpeed moves the parameters to device
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, lr_scheduler=lr_scheduler(optimizer, cfg.train),
            config=deepspeed_config(cfg, dist.get_world_size()))
        self.engine.checkpoint_engine = weights_only_checkpoint_engine(self.engine._config)

    def __call__(self, input_ids, head_fn, position_ids=None):
        return self.engine(input_ids, head_fn, position_ids=position_ids)

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
        import deepspeed  # deferred: slow to import, and only this strategy needs it

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if dist.get_rank() != 0:
                return None
            return _strip_wrapper({k: v.detach().cpu().clone() for k, v in module.state_dict().items()})


def weights_only_checkpoint_engine(config_params=None):
    """DeepSpeed's torch checkpoint engine, loading through ``torch.load(weights_only=True)`` (DeepSpeed 0.19
    hard-codes ``weights_only=False`` and offers no option): a checkpoint file can then hold only tensors,
    containers and the two DeepSpeed classes its ZeRO-3 state pickles, allowed by name: ``ZeroStageEnum`` and the
    static ``LossScaler`` (bf16 and fp32; fp16's ``DynamicLossScaler`` is not used here)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(config_params)


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


def adamw_implementation(device: torch.device) -> dict:
    """AdamW's kernel for parameters on ``device``: ``fused`` (one kernel for all parameters' updates) where torch
    has it for the device type (CUDA; CPU too since torch 2.4), else ``foreach`` (batched per-op kernels)."""
    # torch's own list of device types with fused optimizer kernels (what AdamW(fused=True) checks against).
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return {"fused": True} if device.type in _get_fused_kernels_supported_devices() else {"foreach": True}


def _adamw(module: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                             **adamw_implementation(device))


def _prepare_blocks(student: nn.Module, cfg: Config) -> list[nn.Module]:
    """The decoder blocks with AC / compilation applied (``models.prepare_decoder_blocks``), when FSDP2 shards
    them or either is on; DDP and DeepSpeed with both off need no blocks (any architecture)."""
    train = cfg.train
    if train.strategy != "fsdp" and not (train.activation_checkpointing or train.compile):
        return []
    return prepare_decoder_blocks(student, activation_checkpointing=train.activation_checkpointing,
                                  compile=train.compile)


def mixed_precision(use_gpu: bool) -> MixedPrecisionPolicy:
    """FSDP2's policy: on GPU, bf16 parameters for compute (the float32 shards stay the optimizer's) and gradients
    reduce-scattered in float32; on CPU, float32 throughout."""
    if use_gpu:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _fully_shard(wrapper: nn.Module, blocks: list[nn.Module], device: torch.device,
                 policy: MixedPrecisionPolicy) -> nn.Module:
    """FSDP2: each (prepared) decoder block is a unit, then the root (embeddings, final norm, LM head)."""
    wrapper.to(device)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(wrapper, mp_policy=policy)
    return wrapper


def _strip_wrapper(state: dict) -> dict:
    """``StudentWithHead`` state -> the HF model's own key names."""
    return {key.removeprefix("module.").removeprefix("model."): value for key, value in state.items()}


STRATEGIES = {"fsdp": TorchStrategy, "ddp": TorchStrategy, "deepspeed": DeepSpeedStrategy}
