"""``teacher``: tokens/s of the teacher actor pool (Ray Data) vs the same scorer in a bare in-process loop.

Tokens/s of ``score_dataset`` (the Ray Data teacher actor pool, consumed to the end in the driver)
vs the same ``TeacherScorer`` called in a bare in-process loop on the same random packed blocks with the same
batch size and the same CPU budget (the bare loop gets as many torch threads as the pool's actors together),
on a random-weight Llama built here. Variants interleaved over repeats on a local Ray. Reported end to end
(the pool is created per execution: actor start-up and model load included) and steady state (tokens after
the first batch over the time from the first batch to the last), with the time to the first batch. Goal:
pool / bare ≥ 0.9. A third variant, ``pool_ordered``, consumes the pool in input order (``preserve_order``, what the
training workers' streams ask for: ``train.loop.ingest_options``) to measure what that order costs with several
actors (``--actors 2``): a batch that finishes early waits for the ones before it.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch
from transformers import AutoConfig

from tailkd_ray.config import from_dict
from tailkd_ray.teacher.pool import TeacherScorer, score_dataset, scorer_kwargs

from .measure import (add_peak_tflops_argument, build_random_llama, log, mfu, model_flops_per_token, peak_tflops,
                      probe_ray_worker, start_bench_ray, time_interleaved)

NAME = "teacher"
HELP = "teacher tokens/s: Ray Data actor pool vs a bare in-process loop"
TEACHER_RATIO_GOAL = 0.9

# Sizes: the default run and --quick. Any flag given on the command line wins.
SIZES = {
    "default": dict(blocks=128, seq_len=256, batch_size=8, vocab=8192, layers=4, width=256, top_m=64, tail_samples=16,
                    actors=1, repeats=4),
    "quick": dict(blocks=8, seq_len=32, batch_size=4, vocab=512, layers=1, width=64, top_m=16, tail_samples=4,
                  actors=1, repeats=2),
}


def add_arguments(parser) -> None:
    """The ``teacher`` flags: every size of ``SIZES``."""
    for name, text in (("blocks", "packed blocks scored per run"), ("seq_len", "tokens per block (+1 packed)"),
                       ("batch_size", "teacher.batch_size of both variants"), ("vocab", "teacher vocabulary"),
                       ("layers", "teacher layers"), ("width", "teacher hidden size"), ("top_m", "summary M"),
                       ("tail_samples", "summary S"), ("actors", "teacher actors (bare loop: this many × an actor's torch threads)"),
                       ("repeats", "interleaved repeats per variant")):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"{text} (default {SIZES['default'][name]})")
    add_peak_tflops_argument(parser)


def teacher_bench_config(args, model_dir: Path):
    """The run config both variants score with: the teacher in ``model_dir`` and the sizes of ``args``."""
    return from_dict({"teacher": {"model": str(model_dir), "batch_size": args.batch_size, "min_actors": args.actors,
                                  "max_actors": args.actors,
                                  "num_gpus": 1.0 if torch.device(args.device).type == "cuda" else 0.0},
                      "data": {"seq_len": args.seq_len},
                      "summary": {"top_m": args.top_m, "tail_samples": args.tail_samples},
                      "loss": {"k": min(10, args.top_m)},
                      "train": {"seed": args.seed}})


@dataclass
class ScoringRun:
    """One pass over all blocks: seconds from the start to each batch's arrival (checks before it excluded)."""
    checks_seconds: float = 0.0
    batch_arrivals: list[float] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)

    def steady_tokens_per_second(self, seq_len: int) -> float:
        """Median over batches 2..n of (batch tokens / time since the previous batch arrived). The median, not
        the span first-to-last: Ray Data sometimes hands two finished batches to the driver at once."""
        rates = [rows * seq_len / gap if gap > 0 else math.inf for rows, gap in
                 zip(self.batch_rows[1:], np.diff(self.batch_arrivals))]
        return float(statistics.median(rates)) if rates else math.nan


def pool_step(cfg, blocks_dataset, runs: list, *, ordered: bool):
    """``score_dataset`` (start-up checks, then a fresh actor pool) consumed to the end in the driver, in input order
    when ``ordered``, else as batches finish."""

    def step():
        start = time.perf_counter()
        scored = score_dataset(blocks_dataset, cfg)
        scored.context.execution_options.preserve_order = ordered
        run = ScoringRun(checks_seconds=time.perf_counter() - start)
        start = time.perf_counter()
        # Whole output blocks as Arrow tables: counting rows costs the driver nothing.
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            run.batch_arrivals.append(time.perf_counter() - start)
            run.batch_rows.append(table.num_rows)
        runs.append(run)

    return step


def bare_step(scorer, blocks: np.ndarray, batch_size: int, threads: int, runs: list):
    """The same ``TeacherScorer`` called in this process on the same blocks, ``batch_size`` rows at a time,
    with ``threads`` torch threads (the CPUs the pool's actors get)."""

    def step():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        run = ScoringRun()
        start = time.perf_counter()
        for first in range(0, len(blocks), batch_size):
            out = scorer({"input_ids": blocks[first:first + batch_size]})
            run.batch_arrivals.append(time.perf_counter() - start)
            run.batch_rows.append(len(out["input_ids"]))
        torch.set_num_threads(previous)
        runs.append(run)

    return step


def run(args) -> dict:
    """Build a random teacher, then time the actor pool and the bare loop interleaved; the ``teacher`` result."""
    with tempfile.TemporaryDirectory(prefix="bench_teacher_") as root:
        model_dir = build_random_llama(Path(root) / "teacher", layers=args.layers, width=args.width, vocab=args.vocab,
                                       seq_len=args.seq_len, seed=args.seed, label=NAME)
        cfg = teacher_bench_config(args, model_dir)
        flops_per_token = model_flops_per_token(AutoConfig.from_pretrained(model_dir), args.seq_len, training=False)
        blocks = np.random.default_rng(args.seed).integers(0, args.vocab, (args.blocks, args.seq_len + 1), dtype=np.int32)
        start_bench_ray(torch.device(args.device))
        try:
            worker = probe_ray_worker()
            threads = worker["torch_threads"] * args.actors
            # One input block per teacher batch, as a streaming read delivers them: every batch is its own task.
            dataset = ray.data.from_items([{"input_ids": row} for row in blocks],
                                          override_num_blocks=math.ceil(args.blocks / args.batch_size))
            start = time.perf_counter()
            scorer = TeacherScorer(**scorer_kwargs(cfg))
            bare_load_seconds = time.perf_counter() - start
            scorer({"input_ids": blocks[: args.batch_size]})  # untimed: first-call allocations of the bare loop
            runs = {"pool": [], "pool_ordered": [], "bare": []}
            steps = {"pool": pool_step(cfg, dataset, runs["pool"], ordered=False),
                     "pool_ordered": pool_step(cfg, dataset, runs["pool_ordered"], ordered=True),
                     "bare": bare_step(scorer, blocks, args.batch_size, threads, runs["bare"])}
            log(f"[teacher] {args.blocks} blocks × {args.seq_len} tokens, batch {args.batch_size}, {args.actors} actor(s); "
                f"bare loop with {threads} torch thread(s); {args.repeats} interleaved repeats")
            device = torch.device(args.device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timings = time_interleaved(steps, repeats=args.repeats, warmup=0, device=device, progress=log)
            # The bare loop's GPU peak (the pool's actors are other processes); on CPU not reported.
            bare_peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        finally:
            ray.shutdown()
    result = teacher_result(args, timings, runs, threads, bare_load_seconds, worker)
    peak = peak_tflops(torch.device(args.device), args.peak_tflops)
    result.update(model_flops_per_token=flops_per_token, peak_tflops=peak, bare_peak_memory_mb=bare_peak_mb)
    for entry in result["variants"].values():
        entry["mfu"] = mfu(flops_per_token, entry["steady_tokens_per_second"]["median"], peak)
    return result


def teacher_result(args, timings: dict, runs: dict, threads: int, bare_load_seconds: float, worker: dict) -> dict:
    tokens = args.blocks * args.seq_len
    for name, variant_runs in runs.items():
        for run in variant_runs:
            if sum(run.batch_rows) != args.blocks:
                raise SystemExit(f"{name} scored {sum(run.batch_rows)} rows, expected --blocks {args.blocks}")
    end_to_end = {name: [tokens / s for s in ts] for name, ts in timings.items()}
    steady = {name: [run.steady_tokens_per_second(args.seq_len) for run in variant_runs]
              for name, variant_runs in runs.items()}
    first_batch = {name: [run.batch_arrivals[0] for run in variant_runs] for name, variant_runs in runs.items()}
    ratios, order_cost = {}, {}
    for kind, per_run in (("end_to_end", end_to_end), ("steady_state", steady)):
        paired = [p / b for p, b in zip(per_run["pool"], per_run["bare"])]
        ratios[kind] = {"median_of_paired_ratios": statistics.median(paired), "paired_ratios": paired,
                        "goal": TEACHER_RATIO_GOAL, "meets_goal": statistics.median(paired) >= TEACHER_RATIO_GOAL}
        paired = [o / p for o, p in zip(per_run["pool_ordered"], per_run["pool"])]
        order_cost[kind] = {"median_of_paired_ratios": statistics.median(paired), "paired_ratios": paired}
    return {
        "config": {name: getattr(args, name) for name in ("blocks", "seq_len", "batch_size", "vocab", "layers", "width",
                                                           "top_m", "tail_samples", "actors", "repeats", "seed")},
        "tokens_per_run": tokens,
        "bare_torch_threads": threads,
        "bare_model_load_seconds": bare_load_seconds,
        "ray_worker_probe": worker,
        "variants": {name: {
            "seconds": {"median": statistics.median(timings[name]), "raw": timings[name]},
            "tokens_per_second": {"median": statistics.median(end_to_end[name]), "raw": end_to_end[name]},
            "steady_tokens_per_second": {"median": statistics.median(steady[name]), "raw": steady[name]},
            "first_batch_seconds": {"median": statistics.median(first_batch[name]), "raw": first_batch[name]},
            "batch_arrivals": [run.batch_arrivals for run in runs[name]],
            "checks_seconds": [run.checks_seconds for run in runs[name]],
        } for name in timings},
        "ratios_pool_over_bare": ratios,
        "ratios_ordered_over_pool": order_cost,
    }


def print_table(result: dict) -> None:
    """Tokens/s per variant, start-up parts and the pool / bare ratios of a ``teacher`` result."""
    c, v = result["config"], result["variants"]
    log(f"\nteacher tokens/s ({c['layers']}×{c['width']} Llama, V={c['vocab']}, {c['blocks']} blocks × {c['seq_len']} "
        f"tokens, batch {c['batch_size']}, M={c['top_m']} S={c['tail_samples']}, {c['actors']} actor(s), bare loop on "
        f"{result['bare_torch_threads']} thread(s); median of {c['repeats']} repeats)")
    log("  variant       end-to-end tok/s  steady tok/s  first batch s  total s  MFU (steady)")
    for name, e in v.items():
        steady_mfu = "-" if e["mfu"] is None else f"{100 * e['mfu']:.1f} %"
        log(f"  {name:12s} {e['tokens_per_second']['median']:16.0f} {e['steady_tokens_per_second']['median']:13.0f} "
            f"{e['first_batch_seconds']['median']:14.2f} {e['seconds']['median']:8.2f} {steady_mfu:>13s}")
    if result["bare_peak_memory_mb"] is not None:
        log(f"  bare loop peak GPU memory {result['bare_peak_memory_mb']:.0f} MiB")
    log(f"  model FLOPs/token (forward) {result['model_flops_per_token']:.3g}; MFU against "
        + (f"{result['peak_tflops']:g} TFLOP/s" if result["peak_tflops"] else "no known peak (CPU: not reported)"))
    probe = result["ray_worker_probe"]
    log(f"  start-up parts: score_dataset checks {statistics.median(v['pool']['checks_seconds']):.2f} s; model load in a "
        f"warm process {result['bare_model_load_seconds']:.2f} s; import torch + transformers in a Ray worker "
        f"{probe['import_seconds']:.2f} s (first task round trip {probe['task_round_trip_seconds']:.2f} s)")
    log("  steady tok/s: median over batches 2..n of batch tokens / time since the previous batch arrived")
    log("\nratio pool / bare tokens/s   median(paired)  goal   met")
    for kind, r in result["ratios_pool_over_bare"].items():
        log(f"  {kind:26s} {r['median_of_paired_ratios']:14.3f}  ≥{r['goal']:g}  {'yes' if r['meets_goal'] else 'NO'}")
    log("ratio pool_ordered / pool tokens/s (the cost of input order)")
    for kind, r in result["ratios_ordered_over_pool"].items():
        log(f"  {kind:26s} {r['median_of_paired_ratios']:14.3f}")
