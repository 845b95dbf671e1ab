"""Shared parts of the benchmarks run by ``jobs/bench.py``: interleaved timing, peak extra memory, run
metadata, progress lines, a local Ray with a worker probe, small random-weight Llamas (``models.llama_config``
at the benchmarks' proportions), and model FLOPs for MFU estimates.

The benchmark machine is shared and noisy, so speed is reported as ratios of variants timed side by
side in one run: every repeat runs each variant once, in an order that alternates between repeats
(A B C, C B A, A B C, ...) so slow drifts of the machine hit every variant alike.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable, Mapping, Optional

import ray
import ray.data
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from tailkd_ray.data.corpus import train_bpe_tokenizer, write_builtin_corpus
from tailkd_ray.models import llama_config, save_random_model


def run_metadata(argv: list[str], device: torch.device) -> dict:
    """What every result records: the command line, versions, device, date and git commit."""
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *argv]),
        "argv": list(argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def git_commit() -> Optional[str]:
    """The checkout's commit (``+dirty`` with uncommitted changes), so results compare across commits; None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


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


def log(message: str) -> None:
    """Print a progress or table line at once (the benchmarks run for minutes; output must not sit in a buffer)."""
    print(message, flush=True)


def llama_heads(width: int) -> int:
    """Attention heads of a benchmark Llama ``width`` wide: max(4, ``width`` // 64), heads of 64 at real widths."""
    return max(4, width // 64)


def small_llama_config(*, vocab: int, layers: int, width: int, seq_len: int, eos: int):
    """The ``LlamaConfig`` of the benchmarks' Llamas: heads of size ``width`` / max(4, ``width`` // 64) (64 for
    realistic widths), MLP 3 × ``width``, untied head, eos as bos and pad."""
    return llama_config(vocab=vocab, layers=layers, width=width, heads=llama_heads(width), intermediate=3 * width,
                        max_positions=seq_len, eos_id=eos)


def build_random_llama(model_dir: Path, *, layers: int, width: int, vocab: int, seq_len: int, seed: int,
                       label: str = "bench") -> Path:
    """A random-weight Llama (``layers`` × ``width``, vocabulary ``vocab``) saved in ``model_dir`` with a BPE
    tokenizer trained on the built-in corpus; returns ``model_dir``. ``label`` prefixes the progress line."""
    # The corpus only trains the tokenizer: it does not outlive this call.
    with tempfile.TemporaryDirectory(prefix="bench_corpus_") as corpus:
        train_dir, _ = write_builtin_corpus(Path(corpus), max_bytes=300_000)
        tokenizer = train_bpe_tokenizer(sorted(train_dir.glob("*.txt")), vocab, model_dir)
    # vocab_size = vocab even if BPE learnt fewer merges: a padded vocabulary, as real teachers have.
    config = small_llama_config(vocab=vocab, layers=layers, width=width, seq_len=seq_len, eos=tokenizer.eos_token_id)
    save_random_model(config, model_dir, seed=seed)
    log(f"[{label}] built a {layers}×{width} Llama, vocab {vocab} (tokenizer {len(tokenizer)}), in {model_dir}")
    return model_dir


def start_bench_ray(device: torch.device) -> None:
    """Start a local Ray for one benchmark run: max(8, CPU count) logical CPUs, on a GPU the GPUs torch sees (not
    Ray's own detection, which can miss them in VMs and then leaves GPU actors pending forever), no dashboard,
    worker output not forwarded to the driver, Ray Data progress bars off. The caller shuts it down."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus == 0:
        raise SystemExit(f"--device {device}: torch sees no CUDA GPU here; run on a GPU machine or use --device cpu")
    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), num_gpus=gpus, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def probe_ray_worker() -> dict:
    """What a 1-CPU Ray worker, as a teacher actor, starts with: torch's thread count (Ray sets OMP_NUM_THREADS
    from num_cpus) and the seconds to import torch + transformers there; plus the round trip of that task."""

    @ray.remote(num_cpus=1)
    def probe() -> dict:
        started = time.perf_counter()
        # Imported here on purpose: their import time in a fresh worker is what this task measures.
        import torch
        from transformers import AutoModelForCausalLM  # noqa: F401  (the scorer's import)

        return {"torch_threads": torch.get_num_threads(), "import_seconds": time.perf_counter() - started}

    started = time.perf_counter()
    result = ray.get(probe.remote())
    return {**result, "task_round_trip_seconds": time.perf_counter() - started}


# Dense bf16 tensor-core peak of one GPU, TFLOP/s, by a substring of its name (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("L4", 121.0))


def peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """The peak used for MFU: ``override`` if given, else the table entry of this GPU; None on CPU or an unknown GPU."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def model_flops_per_token(config, seq_len: int, *, training: bool) -> float:
    """Model FLOPs per token of a decoder LM (PaLM, arXiv 2204.02311, app. B): 2·N + 4·L·d·T forward, three times
    that for training, where N counts the weights used in matmuls (all but a separate input embedding, whose
    lookup costs none). Recomputation (the chunked loss re-runs the LM head in backward) is not counted: MFU,
    not hardware utilisation."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    matmul_weights = sum(p.numel() for p in model.parameters())  # a tied embedding is counted once, as the head
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        matmul_weights -= embedding.numel()
    forward = 2 * matmul_weights + 4 * config.num_hidden_layers * config.hidden_size * seq_len
    return 3 * forward if training else forward


def add_peak_tflops_argument(parser) -> None:
    """The ``--peak-tflops`` flag of the benchmarks that report MFU."""
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: the table in "
                                                          "jobs/bench/measure.py for known GPUs; none on CPU)")


def mfu(flops_per_token: float, tokens_per_second: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved model FLOP/s over ``peak`` TFLOP/s (None when the peak is unknown)."""
    return None if peak is None else flops_per_token * tokens_per_second / (peak * 1e12)
