"""``pipeline``: student training tokens/s of the distributed pipeline against a single-process loop.

Three ways to train the same student (random-weight Llamas built here, same init, same blocks, same batch,
AdamW, CLM + TAD) on local Ray:

- ``stream``: packed blocks -> the teacher actor pool (``teacher.pool.score_dataset``) -> Ray Train, the summaries
  crossing the object store (``summary.cache_dir: null``);
- ``cache``: Ray Train reading the Parquet summary cache (``teacher.cache.open_cache``), scored once beforehand (that
  teacher pass is timed separately and reported, not charged to training);
- ``plain``: one Python process, no Ray: the teacher in the same process computes full logits, the student
  takes the exact TAD loss (``core.losses.distill_objective``, the chunked path) and steps AdamW. It gets as
  many torch threads as one trainer worker.

Training tokens/s is measured in steady state (tokens of the steps after ``--warmup-steps`` over their
wall time, from ``metrics.jsonl``'s ``elapsed_s``) and end to end (all tokens over the whole call:
worker and actor start-up, model load, export). Variants run interleaved over ``--repeats`` (order
alternating). Ratios: stream / cache (goal ≥ 0.9 when the pool keeps up) and cache / plain.

Where time goes: per step, the trainer's ``data_wait_s`` (waiting on the input pipeline: the teacher pool
in ``stream``), ``compute_s`` (forward, loss, backward) and ``optimizer_s``; Ray Data's per-stage report of
the input pipeline (``data_stats.txt``); and for ``plain``, the split into teacher forward, student
forward + loss, backward and optimizer step.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch
from transformers import AutoConfig

from tailkd_ray.config import from_dict
from tailkd_ray.core.losses import distill_objective
from tailkd_ray.models import StudentWithHead, build_student, inference_dtype, load_teacher, student_config
from tailkd_ray.teacher.cache import open_cache, score_to_cache, teacher_identity
from tailkd_ray.teacher.pool import score_dataset
from tailkd_ray.train.loop import peak_memory_mb, run_training
from tailkd_ray.train.runlog import read_records

from .measure import (add_peak_tflops_argument, build_random_llama, llama_heads, log, mfu, model_flops_per_token,
                      peak_tflops, probe_ray_worker, start_bench_ray, synchronize, time_interleaved)

NAME = "pipeline"
HELP = "student training tokens/s: teacher pool streaming vs Parquet cache vs a single-process loop"
STREAM_OVER_CACHE_GOAL = 0.9
VARIANTS = ("stream", "cache", "plain")
SIZES = {
    "default": dict(steps=30, warmup_steps=6, batch=8, seq_len=256, vocab=8192, teacher_layers=4, teacher_width=256,
                    student_layers=2, student_width=128, top_m=64, tail_samples=16, teacher_batch=8, actors=1,
                    prefetch_batches=1, repeats=2),
    "quick": dict(steps=5, warmup_steps=2, batch=2, seq_len=32, vocab=512, teacher_layers=1, teacher_width=64,
                  student_layers=1, student_width=32, top_m=16, tail_samples=4, teacher_batch=2, actors=1,
                  prefetch_batches=1, repeats=1),
}
FLAGS = (("steps", "optimizer steps per run"), ("warmup_steps", "steps left out of the steady-state window"),
         ("batch", "sequences per step (train.batch_size)"), ("seq_len", "tokens per sequence"),
         ("vocab", "vocabulary of teacher and student"), ("teacher_layers", "teacher decoder layers"),
         ("teacher_width", "teacher hidden size"), ("student_layers", "student decoder layers"),
         ("student_width", "student hidden size"), ("top_m", "summary M"), ("tail_samples", "summary S"),
         ("teacher_batch", "teacher.batch_size"), ("actors", "teacher actors"),
         ("prefetch_batches", "train.prefetch_batches"), ("repeats", "interleaved repeats per variant"))


def add_arguments(parser) -> None:
    for name, text in FLAGS:
        defaults = f"default {SIZES['default'][name]}; --quick {SIZES['quick'][name]}"
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"{text} ({defaults})")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    add_peak_tflops_argument(parser)


# --------------------------------------------------------------------------------------------------
# Setup: models, blocks, config
# --------------------------------------------------------------------------------------------------
def pipeline_config(args, root: Path, teacher_dir: Path, variant: str, run: int):
    """The distill config of one run; ``variant`` decides where summaries come from."""
    width = args.student_width
    gpu = args.device.startswith("cuda")
    return from_dict({
        "output_dir": str(root / "runs" / f"{variant}_{run}"),
        "teacher": {"model": str(teacher_dir), "batch_size": args.teacher_batch, "min_actors": args.actors,
                    "max_actors": args.actors, "num_gpus": 0.5 if gpu else 0.0},  # one GPU: teacher and student share it
        # Heads set, not inherited: the teacher's count need not divide the student's width.
        "student": {"config": {"num_hidden_layers": args.student_layers, "hidden_size": width,
                               "intermediate_size": 3 * width, "num_attention_heads": llama_heads(width),
                               "num_key_value_heads": llama_heads(width)}, "init": "random"},
        "data": {"seq_len": args.seq_len},
        "summary": {"top_m": args.top_m, "tail_samples": args.tail_samples,
                    "cache_dir": str(root / "cache") if variant == "cache" else None},
        "loss": {"kind": "tad", "k": min(10, args.top_m), "beta": 1.0},
        "train": {"num_workers": 1, "use_gpu": gpu, "resources_per_worker": {"GPU": 0.5} if gpu else {}, "strategy": "ddp",
                  "max_steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "warmup_steps": 1,
                  "checkpoint_every": args.steps, "eval_every": args.steps, "prefetch_batches": args.prefetch_batches,
                  "seed": args.seed, "run_name": f"{variant}_{run}"},
    })


def random_blocks(args) -> np.ndarray:
    """Random packed blocks, enough for every step without starting a second epoch."""
    rows = (args.steps + 2) * args.batch
    return np.random.default_rng(args.seed).integers(0, args.vocab, (rows, args.seq_len + 1), dtype=np.int32)


def blocks_dataset(blocks: np.ndarray, rows_per_block: int):
    return ray.data.from_items([{"input_ids": row} for row in blocks],
                               override_num_blocks=math.ceil(len(blocks) / rows_per_block))


# --------------------------------------------------------------------------------------------------
# The three variants
# --------------------------------------------------------------------------------------------------
def steady_window(steps: list[dict], warmup_steps: int) -> dict:
    """Tokens/s over the steps (metrics.jsonl ``step`` records) after ``warmup_steps`` and the mean per-step time
    split there."""
    if len(steps) <= warmup_steps + 1:
        raise SystemExit(f"{len(steps)} steps recorded: --steps must exceed --warmup-steps + 1")
    window = steps[warmup_steps:]
    seconds = window[-1]["elapsed_s"] - steps[warmup_steps - 1]["elapsed_s"] if warmup_steps else window[-1]["elapsed_s"]
    tokens = sum(r["tokens"] for r in window)
    split = {key: statistics.mean(r[key] for r in window) for key in ("step_time_s", "data_wait_s", "compute_s",
                                                                       "optimizer_s")}
    return {"tokens_per_second": tokens / seconds, "steps": len(window), "mean_seconds": split}


def fixed_costs(records: list[dict], seconds: float) -> dict:
    """Where a Ray run's end-to-end ``seconds`` go besides training steps, from its metrics.jsonl: the workers'
    setup (model build, sharding), the first step's wait for data (teacher actor start or Parquet listing; part of
    the training loop's time), the final checkpoint, the export, and the rest outside the worker loop (worker
    group start, dataset planning, shutdown)."""
    steps = [r for r in records if r["kind"] == "step"]
    found = {kind: [r[f"{kind}_s"] for r in records if r["kind"] == kind] for kind in ("setup", "checkpoint", "export")}
    parts = {"worker_setup_s": sum(found["setup"]), "first_batch_wait_s": steps[0]["data_wait_s"],
             "final_checkpoint_s": found["checkpoint"][-1], "export_s": sum(found["export"])}
    in_workers = parts["worker_setup_s"] + steps[-1]["elapsed_s"] + parts["final_checkpoint_s"] + parts["export_s"]
    return {**parts, "training_loop_s": steps[-1]["elapsed_s"], "outside_workers_s": seconds - in_workers}


def ray_variant(args, root: Path, teacher_dir: Path, blocks: np.ndarray, variant: str, results: list):
    """One Ray Train run whose summaries are streamed from the pool or read from the cache."""

    def step():
        started = time.perf_counter()
        cfg = pipeline_config(args, root, teacher_dir, variant, len(results))
        train_ds = (score_dataset(blocks_dataset(blocks, args.teacher_batch), cfg) if variant == "stream"
                    else open_cache(cfg, split="train"))
        run_training(cfg, train_ds, None, "summary")
        seconds = time.perf_counter() - started
        out = Path(cfg.output_dir)
        records = read_records(out)
        steps = [r for r in records if r["kind"] == "step"]
        results.append({"seconds": seconds, "end_to_end_tokens_per_second": sum(r["tokens"] for r in steps) / seconds,
                        **steady_window(steps, args.warmup_steps),
                        "fixed_seconds": fixed_costs(records, seconds),
                        "peak_memory_mb": max(r["peak_memory_mb"] for r in steps),
                        "data_stats": (out / "data_stats.txt").read_text()})

    return step


def plain_variant(args, root: Path, teacher_dir: Path, blocks: np.ndarray, threads: int, results: list):
    """The single-process loop: teacher logits and exact TAD in this process, no Ray, ``threads`` threads."""

    def step():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        started = time.perf_counter()
        cfg = pipeline_config(args, root, teacher_dir, "plain", len(results))
        device = torch.device(args.device)
        gpu = device.type == "cuda"
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        # As the trainer and the teacher actors: bf16 on GPU, float32 on CPU.
        teacher = load_teacher(cfg.teacher, device=device, dtype=inference_dtype(device))
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else nullcontext
        torch.manual_seed(cfg.train.seed)
        student = StudentWithHead(build_student(cfg)).to(device).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        parts = {"teacher_forward_s": [], "student_forward_and_loss_s": [], "backward_s": [], "optimizer_s": []}
        records, tokens = [], 0  # shaped like the trainer's metrics.jsonl step records
        loop_started = time.perf_counter()
        for index in range(args.steps):
            ids = torch.from_numpy(blocks[index * args.batch:(index + 1) * args.batch]).to(device).long()
            inputs, targets = ids[:, :-1], ids[:, 1:]
            marks = [now(device)]
            with torch.no_grad():
                teacher_logits = teacher(input_ids=inputs).logits
            marks.append(now(device))
            with autocast():
                out = student(inputs, lambda hidden, weight, bias: distill_objective(
                    hidden, weight, targets, teacher_logits, kind="tad", k=cfg.loss.k, beta=cfg.loss.beta,
                    chunk_tokens=cfg.loss.chunk_tokens, lm_head_bias=bias))
            marks.append(now(device))
            out.loss.backward()
            marks.append(now(device))
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = out.loss.item()  # as the trainer does: the step's loss reaches the host
            marks.append(now(device))
            for name, (a, b) in zip(parts, zip(marks, marks[1:])):
                parts[name].append(b - a)
            tokens += out.tokens
            records.append({"loss": loss, "tokens": out.tokens, "elapsed_s": marks[-1] - loop_started,
                            "step_time_s": marks[-1] - marks[0], "data_wait_s": 0.0,
                            "compute_s": marks[3] - marks[0], "optimizer_s": marks[4] - marks[3]})
        seconds = time.perf_counter() - started
        torch.set_num_threads(previous)
        window = steady_window(records, args.warmup_steps)
        window["mean_seconds"].update({name: statistics.mean(values[args.warmup_steps:]) for name, values in parts.items()})
        results.append({"seconds": seconds, "end_to_end_tokens_per_second": tokens / seconds, **window,
                        "peak_memory_mb": peak_memory_mb(device)})

    return step


def now(device: torch.device) -> float:
    """Wall time after the device's queued work (section timings of the plain loop on a GPU)."""
    synchronize(device)
    return time.perf_counter()


def run(args) -> dict:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"--variants {args.variants!r}: unknown {unknown or 'empty'}; choose from {','.join(VARIANTS)}")
    if args.warmup_steps + 2 > args.steps:
        raise SystemExit(f"--steps {args.steps} must be at least --warmup-steps {args.warmup_steps} + 2")
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        root = Path(tmp)
        teacher_dir = build_random_llama(root / "teacher", layers=args.teacher_layers, width=args.teacher_width,
                                         vocab=args.vocab, seq_len=args.seq_len, seed=args.seed, label=NAME)
        blocks = random_blocks(args)
        scored_tokens = len(blocks) * args.seq_len  # the teacher scores seq_len positions of each packed block
        flops = {"student_training": model_flops_per_token(
                     student_config(pipeline_config(args, root, teacher_dir, "plain", 0)), args.seq_len, training=True),
                 "teacher_forward": model_flops_per_token(AutoConfig.from_pretrained(teacher_dir), args.seq_len,
                                                          training=False)}
        start_bench_ray(torch.device(args.device))
        try:
            worker = probe_ray_worker()
            cache_seconds = None
            if "cache" in variants:
                started = time.perf_counter()
                cfg = pipeline_config(args, root, teacher_dir, "cache", 0)
                score_to_cache(cfg, blocks_dataset(blocks, args.teacher_batch),
                               teacher_id=teacher_identity(cfg.teacher.model), split="train")
                cache_seconds = time.perf_counter() - started
                log(f"[pipeline] cache scored: {scored_tokens} tokens in {cache_seconds:.1f} s")
            results = {name: [] for name in variants}
            steps = {}
            for name in variants:
                steps[name] = (plain_variant(args, root, teacher_dir, blocks, worker["torch_threads"], results[name])
                               if name == "plain" else ray_variant(args, root, teacher_dir, blocks, name, results[name]))
            log(f"[pipeline] {args.steps} steps × {args.batch} × {args.seq_len} tokens; teacher "
                f"{args.teacher_layers}×{args.teacher_width}, student {args.student_layers}×{args.student_width}, "
                f"V={args.vocab}; {args.repeats} interleaved repeats of {', '.join(variants)}")
            time_interleaved(steps, repeats=args.repeats, warmup=0, device=torch.device(args.device), progress=log)
        finally:
            ray.shutdown()
    return pipeline_result(args, results, worker, cache_seconds, scored_tokens, flops)


def pipeline_result(args, results: dict, worker: dict, cache_seconds, scored_tokens: int, flops: dict) -> dict:
    peak = peak_tflops(torch.device(args.device), args.peak_tflops)
    steady = {name: [r["tokens_per_second"] for r in runs] for name, runs in results.items()}
    end_to_end = {name: [r["end_to_end_tokens_per_second"] for r in runs] for name, runs in results.items()}
    ratios = {}
    for numerator, denominator, goal in (("stream", "cache", STREAM_OVER_CACHE_GOAL), ("cache", "plain", None)):
        if numerator not in results or denominator not in results:
            continue
        for kind, per_run in (("steady_state", steady), ("end_to_end", end_to_end)):
            paired = [a / b for a, b in zip(per_run[numerator], per_run[denominator])]
            entry = {"numerator": numerator, "denominator": denominator, "kind": kind,
                     "median_of_paired_ratios": statistics.median(paired), "paired_ratios": paired}
            if goal is not None and kind == "steady_state":
                entry.update(goal=goal, meets_goal=entry["median_of_paired_ratios"] >= goal)
            ratios[f"{numerator}/{denominator} {kind}"] = entry
    return {
        "config": {name: getattr(args, name) for name, _ in FLAGS} | {"seed": args.seed, "variants": list(results)},
        "ray_worker_probe": worker,
        "model_flops_per_token": flops,
        "peak_tflops": peak,
        "cache_scoring": None if cache_seconds is None else {
            "seconds": cache_seconds, "tokens": scored_tokens, "tokens_per_second": scored_tokens / cache_seconds},
        "variants": {name: {
            "tokens_per_second": {"median": statistics.median(steady[name]), "raw": steady[name]},
            "end_to_end_tokens_per_second": {"median": statistics.median(end_to_end[name]), "raw": end_to_end[name]},
            # Student training FLOPs only (the plain loop's teacher forward is not counted): comparable across variants.
            "student_mfu": mfu(flops["student_training"], statistics.median(steady[name]), peak),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
            # The mean over repeats keeps the split additive (data wait + compute + optimizer = step).
            "mean_seconds_per_step": {key: statistics.mean(r["mean_seconds"][key] for r in runs)
                                      for key in runs[0]["mean_seconds"]},
            "mean_fixed_seconds": {key: statistics.mean(r["fixed_seconds"][key] for r in runs)
                                   for key in runs[0].get("fixed_seconds", {})},
            "runs": runs,
        } for name, runs in results.items()},
        "ratios": ratios,
    }


def print_table(result: dict) -> None:
    c = result["config"]
    log(f"\nstudent training tokens/s ({c['student_layers']}×{c['student_width']} student, {c['teacher_layers']}×"
        f"{c['teacher_width']} teacher, V={c['vocab']}, {c['batch']}×{c['seq_len']} tokens/step, M={c['top_m']} "
        f"S={c['tail_samples']}, {c['actors']} teacher actor(s); median of {c['repeats']} repeats)")
    log("  variant  steady tok/s  end-to-end tok/s  student MFU  peak MiB   per step: total  data wait   compute  optimizer")
    for name, v in result["variants"].items():
        s = v["mean_seconds_per_step"]
        student_mfu = "-" if v["student_mfu"] is None else f"{100 * v['student_mfu']:.1f} %"
        log(f"  {name:7s} {v['tokens_per_second']['median']:13.0f} {v['end_to_end_tokens_per_second']['median']:17.0f}"
            f" {student_mfu:>12s} {v['peak_memory_mb']:9.0f}   {s['step_time_s']:13.3f} s {s['data_wait_s']:8.3f} s "
            f"{s['compute_s']:7.3f} s {s['optimizer_s']:8.3f} s")
    log(f"  model FLOPs/token: student training {result['model_flops_per_token']['student_training']:.3g}, teacher "
        f"forward {result['model_flops_per_token']['teacher_forward']:.3g}; MFU against "
        + (f"{result['peak_tflops']:g} TFLOP/s" if result["peak_tflops"] else "no known peak (CPU: not reported)")
        + "; peak MiB: GPU memory allocated, on CPU the process's resident set")
    if "plain" in result["variants"]:
        s = result["variants"]["plain"]["mean_seconds_per_step"]
        log("  plain step: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {s[k]:.3f} s" for k in
                                         ("teacher_forward_s", "student_forward_and_loss_s", "backward_s", "optimizer_s")))
    for name, v in result["variants"].items():
        if v["mean_fixed_seconds"]:
            seconds = statistics.mean(r["seconds"] for r in v["runs"])
            log(f"  {name} run of {seconds:.1f} s (mean over runs): " + ", ".join(
                f"{k.removesuffix('_s').replace('_', ' ')} {t:.1f} s" for k, t in v["mean_fixed_seconds"].items()))
    if result["cache_scoring"]:
        cs = result["cache_scoring"]
        log(f"  teacher pass into the cache (once, not charged to cache): {cs['tokens']} tokens in {cs['seconds']:.1f} s "
            f"= {cs['tokens_per_second']:.0f} tok/s")
    log("\nratio                              median(paired)  goal   met")
    for name, r in result["ratios"].items():
        goal = f"≥{r['goal']:g}" if "goal" in r else "  -"
        met = ("yes" if r["meets_goal"] else "NO") if "goal" in r else "-"
        log(f"  {name:33s} {r['median_of_paired_ratios']:12.3f}  {goal:5s}  {met}")
    for name in ("stream", "cache"):
        if name in result["variants"]:
            log(f"\nRay Data stages, {name} (last run):\n" + result["variants"][name]["runs"][-1]["data_stats"].rstrip())
