"""``loss``: step time of the chunked objective, TAD vs baselines; peak memory vs a naive full-logit path.

Forward+backward of ``distill_objective`` (the chunked training path) for TAD vs vanilla KD on
the same full teacher logits, and TAD-from-summary vs top-K KD on the same summary, timed side by side
(variants interleaved, order alternating, median of paired ratios after a warmup). Then the peak extra
memory of the chunked loss vs a naive full-logit KD (``hidden @ W.T`` + ``F.kl_div``) at several token
counts. Goals (issue 16): TAD / KD ≤ 1.05 and TAD-from-summary / top-K-from-summary ≤ 1.03 (``TIME_PAIRS``),
memory ≥ 8× lower and flat as the token count grows.

``--baseline-rev REV`` also times every variant with ``losses.py`` as it was at git revision REV, interleaved
with today's, and reports today / REV per variant (e.g. the cost of a numerics fix, or a speed-up).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tailkd_ray.core.losses import distill_objective
from tailkd_ray.core.summary import TeacherSummary, summarize

from .measure import log, paired_ratio, peak_extra_bytes, time_interleaved

NAME = "loss"
HELP = "step time ratios and peak memory of the chunked loss"
MEMORY_RATIO_GOAL = 8.0
MEMORY_FLAT_GOAL = 1.25  # chunked peak at the largest token count / at the smallest

# Sizes: the default run and --quick. Any flag given on the command line wins.
SIZES = {
    "default": dict(tokens=8192, batch=4, vocab=32768, dim=512, chunk_tokens=512, top_m=64, tail_samples=16,
                    repeats=5, warmup=1, memory_tokens="2048,4096,8192"),
    "quick": dict(tokens=512, batch=2, vocab=2048, dim=64, chunk_tokens=128, top_m=32, tail_samples=8,
                  repeats=3, warmup=1, memory_tokens="256,512"),
}


def add_arguments(parser) -> None:
    """The ``loss`` flags: every size of ``SIZES`` (its help names both defaults), K, β and --profile."""
    for name, text, kind in (("tokens", "B·T tokens per step", int), ("batch", "B", int), ("vocab", "V", int),
                             ("dim", "hidden size d", int), ("chunk_tokens", "tokens per chunk of distill_objective", int),
                             ("top_m", "summary M", int), ("tail_samples", "summary S", int),
                             ("repeats", "timed repeats per variant", int), ("warmup", "untimed rounds first", int),
                             ("memory_tokens", "comma-separated token counts for the memory table", str)):
        defaults = f"default {SIZES['default'][name]}; --quick {SIZES['quick'][name]}"
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=f"{text} ({defaults})")
    parser.add_argument("--k", type=int, default=10, help="TAD / top-K K (default 10)")
    parser.add_argument("--beta", type=float, default=1.0, help="TAD β (default 1)")
    parser.add_argument("--profile", action="store_true", help="also torch.profiler one step of each variant")
    parser.add_argument("--baseline-rev", help="also time losses.py at this git revision, side by side (today / REV)")


@dataclass
class LossInputs:
    hidden: torch.Tensor  # [B, T, d], requires grad
    weight: torch.Tensor  # [V, d], requires grad
    targets: torch.Tensor  # [B, T]
    teacher_logits: torch.Tensor  # [B, T, V] float32
    summary: TeacherSummary

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_loss_inputs(args, tokens: int) -> LossInputs:
    """Random student hidden states / LM head and teacher logits (std 2) for ``tokens`` = B·T tokens."""
    if tokens % args.batch:
        raise SystemExit(f"--tokens/--memory-tokens value {tokens} is not a multiple of --batch {args.batch}")
    generator = torch.Generator().manual_seed(args.seed)
    b, t = args.batch, tokens // args.batch
    device = torch.device(args.device)
    hidden = torch.randn(b, t, args.dim, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, generator=generator) / math.sqrt(args.dim)).to(device).requires_grad_()
    targets = torch.randint(0, args.vocab, (b, t), generator=generator).to(device)
    teacher_logits = (2.0 * torch.randn(b, t, args.vocab, generator=generator)).to(device)
    summary = summarize(teacher_logits, top_m=args.top_m, tail_samples=args.tail_samples,
                        generator=torch.Generator(device=device).manual_seed(args.seed))
    return LossInputs(hidden, weight, targets, teacher_logits, summary)


def load_losses_at(rev: str) -> types.ModuleType:
    """The losses module as it was at git revision ``rev`` (``tailkd_ray/core/losses.py``, before the core package
    ``tailkd_ray/losses.py``), imported as a module of its own over today's ``TeacherSummary``."""
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=Path(__file__).parent, capture_output=True,
                          text=True, check=True).stdout.strip()
    for path in ("tailkd_ray/core/losses.py", "tailkd_ray/losses.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"--baseline-rev {rev}: git cannot show the losses module there: {shown.stderr.strip()}")
    # Old revisions import the summary from its old home; the benchmark's inputs are today's TeacherSummary.
    source = shown.stdout.replace("from tailkd_ray.summary import", "from tailkd_ray.core.summary import")
    module = types.ModuleType(f"losses_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up here
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def chunked_step(inputs: LossInputs, kind: str, teacher: str, args, objective=distill_objective):
    """One forward+backward of ``objective`` (CLM + divergence ``kind``), teacher = "logits" | "summary"."""
    source = inputs.teacher_logits if teacher == "logits" else inputs.summary

    def step():
        inputs.clear_grads()
        out = objective(inputs.hidden, inputs.weight, inputs.targets, source, kind=kind, k=args.k,
                                beta=args.beta, chunk_tokens=args.chunk_tokens)
        out.loss.backward()
        return out.loss.detach()

    return step


def naive_kd_step(inputs: LossInputs):
    """The same objective (CLM + forward KL, mean over tokens) with full [B·T, V] logits, the usual way."""

    def step():
        inputs.clear_grads()
        vocab = inputs.weight.shape[0]
        logits = inputs.hidden.reshape(-1, inputs.hidden.shape[-1]) @ inputs.weight.T
        logq = F.log_softmax(logits.float(), dim=-1)
        logp = F.log_softmax(inputs.teacher_logits.reshape(-1, vocab).float(), dim=-1)
        kd = F.kl_div(logq, logp, log_target=True, reduction="batchmean")
        loss = F.nll_loss(logq, inputs.targets.reshape(-1)) + kd
        loss.backward()
        return loss.detach()

    return step


# Timed variants: name -> (divergence kind, teacher source). The pairs are the ratios with goals.
TIMED_VARIANTS = {"kd": ("kd", "logits"), "tad": ("tad", "logits"),
                  "topk_summary": ("topk", "summary"), "tad_summary": ("tad", "summary")}
# (numerator, denominator, goal): the most numerator / denominator may be, as a median of paired ratios.
TIME_PAIRS = (("tad", "kd", 1.05), ("tad_summary", "topk_summary", 1.03))
MEMORY_VARIANTS = {"chunked_kd": ("kd", "logits"), "chunked_tad": ("tad", "logits"),
                   "chunked_tad_summary": ("tad", "summary")}


def run(args) -> dict:
    """Time the chunked variants side by side, then measure peak memory; the ``loss`` result."""
    device = torch.device(args.device)
    log(f"[loss] inputs: B·T={args.tokens} (B={args.batch}), V={args.vocab}, d={args.dim}, chunk={args.chunk_tokens}, "
        f"K={args.k}, β={args.beta}, summary M={args.top_m} S={args.tail_samples}, device={device}")
    inputs = make_loss_inputs(args, args.tokens)
    steps = {name: chunked_step(inputs, kind, teacher, args) for name, (kind, teacher) in TIMED_VARIANTS.items()}
    if args.baseline_rev:
        baseline = load_losses_at(args.baseline_rev).distill_objective
        steps.update({f"{name}@{args.baseline_rev}": chunked_step(inputs, kind, teacher, args, baseline)
                      for name, (kind, teacher) in TIMED_VARIANTS.items()})
    log(f"[loss] timing {', '.join(steps)}: {args.warmup} warmup + {args.repeats} interleaved repeats")
    timings = time_interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device, progress=log)
    ratios = [dict(paired_ratio(timings, a, b), goal=goal) for a, b, goal in TIME_PAIRS]
    for ratio in ratios:
        ratio["meets_goal"] = ratio["median_of_paired_ratios"] <= ratio["goal"]
    versus_baseline = ([paired_ratio(timings, name, f"{name}@{args.baseline_rev}") for name in TIMED_VARIANTS]
                       if args.baseline_rev else [])
    profiles = profile_pairs(inputs, args) if args.profile else None
    del inputs, steps
    memory = bench_memory(args, device)
    return {
        "config": {name: getattr(args, name) for name in ("tokens", "batch", "vocab", "dim", "chunk_tokens", "k", "beta",
                                                           "top_m", "tail_samples", "repeats", "warmup", "seed")},
        "step_seconds": {name: {"median": statistics.median(ts), "raw": ts} for name, ts in timings.items()},
        "time_ratios": ratios,
        "versus_baseline": versus_baseline,
        "memory": memory,
        "profiles": profiles,
    }


def bench_memory(args, device: torch.device) -> dict:
    """Peak extra bytes of each chunked variant and of the naive path, at each token count."""
    token_counts = [int(n) for n in args.memory_tokens.split(",")]
    rows = []
    for tokens in token_counts:
        inputs = make_loss_inputs(args, tokens)
        variants = {name: chunked_step(inputs, kind, teacher, args) for name, (kind, teacher) in MEMORY_VARIANTS.items()}
        variants["naive_kd"] = naive_kd_step(inputs)
        peaks = {}
        for name, step in variants.items():
            inputs.clear_grads()
            peaks[name] = peak_extra_bytes(step, device)
        ratios = {name: peaks["naive_kd"] / peaks[name] for name in MEMORY_VARIANTS}
        rows.append({"tokens": tokens, "peak_bytes": peaks, "naive_over_chunked": ratios})
        log(f"[loss] memory at {tokens} tokens: " + "  ".join(f"{n}={b / 2**20:.1f} MiB" for n, b in peaks.items()))
        del inputs, variants
    growth = {name: rows[-1]["peak_bytes"][name] / rows[0]["peak_bytes"][name] for name in [*MEMORY_VARIANTS, "naive_kd"]}
    at_largest = rows[-1]["naive_over_chunked"]
    return {
        "method": "torch.cuda.max_memory_allocated delta" if device.type == "cuda" else
                  "peak live bytes of storages created by ATen ops (TorchDispatchMode + weakref.finalize), inputs excluded",
        "rows": rows,
        "growth_largest_over_smallest": growth,
        "token_growth": token_counts[-1] / token_counts[0],
        "goals": {"naive_over_chunked_min": MEMORY_RATIO_GOAL, "chunked_growth_max": MEMORY_FLAT_GOAL},
        "meets_goal": {name: at_largest[name] >= MEMORY_RATIO_GOAL and growth[name] <= MEMORY_FLAT_GOAL
                       for name in MEMORY_VARIANTS},
    }


def profile_pairs(inputs: LossInputs, args, top: int = 15) -> dict:
    """torch.profiler of one step of each timed variant: the ops with the largest self time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if inputs.hidden.is_cuda else [])
    sort_key = "self_device_time_total" if inputs.hidden.is_cuda else "self_cpu_time_total"
    tables = {}
    for name, (kind, teacher) in TIMED_VARIANTS.items():
        step = chunked_step(inputs, kind, teacher, args)
        with profile(activities=activities) as prof:
            step()
        averages = sorted(prof.key_averages(), key=lambda e: getattr(e, sort_key), reverse=True)[:top]
        tables[name] = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, sort_key) / 1e3} for e in averages]
        log(f"[loss] profile {name}:\n" + "\n".join(f"    {r['self_ms']:9.1f} ms  {r['calls']:5d}×  {r['op']}"
                                                   for r in tables[name]))
    return tables


def print_table(result: dict) -> None:
    """Step times, time ratios and the memory table of a ``loss`` result."""
    log("\nstep time (forward+backward of distill_objective, median of repeats)")
    for name, entry in result["step_seconds"].items():
        log(f"  {name:14s} {entry['median']:8.3f} s  {result['config']['tokens'] / entry['median']:12.0f} tokens/s")
    log("\nratio                       median(paired)  ratio(medians)  goal     met")
    for r in result["time_ratios"]:
        log(f"  {r['numerator'] + ' / ' + r['denominator']:26s} {r['median_of_paired_ratios']:10.3f}  "
            f"{r['ratio_of_medians']:14.3f}  ≤ {r['goal']:.2f}  {'yes' if r['meets_goal'] else 'NO'}")
    for r in result["versus_baseline"]:
        log(f"  {r['numerator'] + ' / ' + r['denominator']:26s} {r['median_of_paired_ratios']:10.3f}  "
            f"{r['ratio_of_medians']:14.3f}")
    memory = result["memory"]
    names = list(memory["rows"][0]["peak_bytes"])
    log(f"\npeak extra memory, MiB ({memory['method']})")
    log("  tokens  " + "".join(f"{n:>22s}" for n in names) + "   naive/chunked (kd, tad, tad_summary)")
    for row in memory["rows"]:
        log(f"  {row['tokens']:6d}  " + "".join(f"{row['peak_bytes'][n] / 2**20:22.1f}" for n in names) + "   "
            + ", ".join(f"{v:.1f}×" for v in row["naive_over_chunked"].values()))
    log(f"  growth over {memory['token_growth']:.0f}× tokens: "
        + ", ".join(f"{n}={g:.2f}×" for n, g in memory["growth_largest_over_smallest"].items()))
    log("  goal (naive/chunked ≥ 8× at the largest size and chunked growth ≤ 1.25×): "
        + ", ".join(f"{n}={'yes' if ok else 'NO'}" for n, ok in memory["meets_goal"].items()))
