"""Strategies in one process (a world of one on gloo): activation checkpointing and compiled blocks train to the
same losses, AdamW's kernel follows the device, FSDP2's mixed-precision policy, HF parameter names kept."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tailkd_ray.config import Config, ConfigError, from_dict
from tailkd_ray.train.strategies import STRATEGIES, adamw_implementation, mixed_precision

STEPS, BATCH, SEQ_LEN = 3, 2, 32


@pytest.fixture(scope="module")
def world_of_one():
    """A one-process gloo group (what the strategies need) and the launcher variables DeepSpeed reads, both gone
    after this module."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", str(port))):
            env.setenv(name, value)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def clm_head(targets: torch.Tensor):
    """A ``StudentWithHead`` head_fn: next-token cross-entropy from the hidden states and the LM head."""
    def head_fn(hidden, weight, bias):
        logits = F.linear(hidden, weight, bias)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return head_fn


def train_losses(model_dir, strategy: str, **train) -> tuple[list[float], dict, list[str]]:
    """Losses of ``STEPS`` optimizer steps of the tiny Llama under ``strategy``, its final full state dict and the
    class names of its modules."""
    cfg = from_dict({"train": {"strategy": strategy, "max_steps": STEPS, "warmup_steps": 0, "lr": 3e-3,
                               "batch_size": BATCH, **train}})
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    runner = STRATEGIES[strategy](student, cfg, torch.device("cpu"))
    runner.train(True)
    tokens = torch.randint(0, student.config.vocab_size, (STEPS, BATCH, SEQ_LEN + 1),
                           generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(STEPS):
        inputs, targets = tokens[step, :, :-1], tokens[step, :, 1:]
        with runner.sync_context(True):
            loss = runner(inputs, clm_head(targets))
            runner.backward(loss)
        runner.grad_norm()
        runner.step()
        losses.append(loss.item())
    model = runner.engine.module if strategy == "deepspeed" else runner.module
    return losses, runner.full_state_dict(), [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "deepspeed"])
def test_activation_checkpointing_trains_to_the_same_losses(world_of_one, tiny_llama_dir, strategy):
    plain, plain_state, plain_modules = train_losses(tiny_llama_dir, strategy)
    checkpointed, state, modules = train_losses(tiny_llama_dir, strategy, activation_checkpointing=True)
    assert plain[-1] < plain[0]  # it trains
    assert "CheckpointWrapper" not in " ".join(plain_modules)
    assert sum("CheckpointWrapper" in name for name in modules) == 2  # each of the two decoder blocks
    assert checkpointed == pytest.approx(plain, rel=1e-6, abs=0)
    assert state.keys() == plain_state.keys()  # the HF names, without the checkpoint wrapper's prefix
    for name, value in plain_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.compile
def test_compiled_blocks_train_to_the_same_losses(world_of_one, tiny_llama_dir):
    """Regional compilation (each block compiled on its own) on top of activation checkpointing, under FSDP2."""
    plain, plain_state, _ = train_losses(tiny_llama_dir, "fsdp")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, state, _ = train_losses(tiny_llama_dir, "fsdp", activation_checkpointing=True, compile=True)
    # The blocks really ran compiled: one graph shared by both blocks, no graph break falling back to eager.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert compiled == pytest.approx(plain, rel=1e-5, abs=0)
    assert state.keys() == plain_state.keys()
    for name, value in plain_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_refused_with_deepspeed():
    with pytest.raises(ConfigError, match="train.compile needs train.strategy fsdp or ddp"):
        from_dict({"train": {"strategy": "deepspeed", "compile": True}})


def test_adamw_kernel_follows_the_device():
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    assert adamw_implementation(torch.device("cpu")) == {"fused": True}  # torch >= 2.4 has fused AdamW on CPU
    assert adamw_implementation(torch.device("cuda")) == {"fused": True}
    assert adamw_implementation(torch.device("meta")) == {"foreach": True}
    assert "meta" not in _get_fused_kernels_supported_devices()
    # The chosen kernel runs, and updates as the plain (per-parameter loop) AdamW does.
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    updated = {}
    for name, kernel in (("plain", {"foreach": False}), ("chosen", adamw_implementation(torch.device("cpu")))):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kernel)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        updated[name] = [p.detach() for p in params]
    for chosen, plain in zip(updated["chosen"], updated["plain"]):
        torch.testing.assert_close(chosen, plain, rtol=1e-6, atol=1e-7)


def test_fsdp_mixed_precision_policy():
    gpu = mixed_precision(use_gpu=True)
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert gpu.output_dtype is None and gpu.cast_forward_inputs
    cpu = mixed_precision(use_gpu=False)
    assert (cpu.param_dtype, cpu.reduce_dtype) == (None, None)  # float32 throughout
