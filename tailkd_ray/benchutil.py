"""Measurement tools for ``jobs/bench.py``: interleaved timing, peak extra memory, run metadata.

The benchmark machine is shared and noisy, so speed is reported as ratios of variants timed side by
side in one run: every repeat runs each variant once, in an order that alternates between repeats
(A B C, C B A, A B C, ...) so slow drifts of the machine hit every variant alike.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import sys
import time
import weakref
from typing import Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def run_metadata(argv: list[str], device: torch.device) -> dict:
    """What every result records: the command line, versions, device and date."""
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *argv]),
        "argv": list(argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int, device: torch.device,
                     progress: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Seconds per call of each step, ``repeats`` times, variants interleaved (order reversed every
    other repeat) after ``warmup`` untimed rounds. Returns name -> list of per-repeat seconds."""
    names = list(steps)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        timed = round_index >= warmup
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            seconds = time.perf_counter() - start
            if timed:
                timings[name].append(seconds)
        if timed:
            progress(f"  repeat {round_index - warmup + 1}/{repeats}: "
                     + "  ".join(f"{name}={timings[name][-1]:.3f}s" for name in names))
        else:
            progress(f"  warmup {round_index + 1}/{warmup} done")
    return timings


def paired_ratio(timings: Mapping[str, list[float]], numerator: str, denominator: str) -> dict:
    """Ratio numerator/denominator: the median of the per-repeat ratios (each pair ran back to back),
    and the ratio of the medians for comparison."""
    per_repeat = [a / b for a, b in zip(timings[numerator], timings[denominator])]
    return {
        "numerator": numerator,
        "denominator": denominator,
        "median_of_paired_ratios": statistics.median(per_repeat),
        "ratio_of_medians": statistics.median(timings[numerator]) / statistics.median(timings[denominator]),
        "paired_ratios": per_repeat,
    }


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ATen ops while the mode is active (CPU or any device).

    Each op output whose storage is new (not shared with an input of the op, i.e. not a view or an
    in-place result, and not already counted) adds its storage's nbytes; a ``weakref.finalize`` on the
    storage subtracts them when it is freed. Storages that existed before the mode (the inputs) are
    never counted. Backward ops are seen too: the autograd engine carries the mode to its thread.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage(), inputs)
        return out

    def _count(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key = storage._cdata
        if key in inputs or key in self._counted:
            return
        nbytes = storage.nbytes()
        self._counted.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``step()`` allocates beyond what was alive before it: ``torch.cuda.max_memory_allocated``
    delta on CUDA, ``LiveTensorBytes`` elsewhere (CPU has no allocator statistic)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as probe:
        step()
    return probe.peak


def summary_stats(values: list[float]) -> dict:
    """mean, std (population), min, max of a list of floats."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}
