"""Benchmarks of the TAD loss, the teacher summary (issue 2) and the teacher actor pool (issue 3). Speed
targets live here, not in tests.

    python jobs/bench.py loss --json runs/bench_loss.json          # step time ratios, peak memory
    python jobs/bench.py summary --json runs/bench_summary.json    # summary bytes, loss/grad fidelity
    python jobs/bench.py teacher --json runs/bench_teacher.json    # actor pool vs bare loop tokens/s
    python jobs/bench.py loss --quick --json /tmp/l.json           # small sizes (seconds)

``loss``: forward+backward of ``distill_objective`` (the chunked training path) for TAD vs vanilla KD on
the same full teacher logits, and TAD-from-summary vs top-K KD on the same summary, timed side by side
(variants interleaved, order alternating, median of paired ratios after a warmup). Then the peak extra
memory of the chunked loss vs a naive full-logit KD (``hidden @ W.T`` + ``F.kl_div``) at several token
counts. Goals: time ratios ≤ 1.03, memory ≥ 8× lower and flat as the token count grows.

``summary``: bytes per token of the summary vs bf16 logits (2·V bytes), and the loss relative error and
gradient cosine (w.r.t. the student logits) of ``tad_loss_from_summary`` vs the exact ``tad_loss`` over a
grid of (M, S) and several sampling seeds, on a small teacher trained here on the built-in corpus (cached
under ``runs/bench_teacher/``) and on a synthetic heavy-tailed 32k-vocabulary teacher. Goal at the default
(M, S) = (64, 16): ≥ 100× fewer bytes than bf16 logits at V = 32k, relative error ≤ 1% and gradient
cosine ≥ 0.99 on the trained teacher (worst seed).

``teacher``: tokens/s of ``score_dataset`` (the Ray Data teacher actor pool, consumed to the end in the driver)
vs the same ``TeacherScorer`` called in a bare in-process loop on the same random packed blocks with the same
batch size and the same CPU budget (the bare loop gets as many torch threads as the pool's actors together),
on a random-weight Llama built here. Variants interleaved over repeats on a local Ray. Reported end to end
(the pool is created per execution: actor start-up and model load included) and steady state (tokens after
the first batch over the time from the first batch to the last), with the time to the first batch. Goal:
pool / bare ≥ 0.9.

Every result records the command line, torch version, device, date and the raw per-repeat numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Keep every Ray process on 127.0.0.1 (DESIGN §5); read when ray is imported (lazily, by the teacher benchmark).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import torch
import torch.nn.functional as F

from tailkd_ray.benchutil import paired_ratio, peak_extra_bytes, run_metadata, summary_stats, time_interleaved
from tailkd_ray.losses import distill_objective, tad_loss, tad_loss_from_summary
from tailkd_ray.summary import TeacherSummary, bytes_per_position, summarize

TIME_RATIO_GOAL = 1.03
MEMORY_RATIO_GOAL = 8.0
MEMORY_FLAT_GOAL = 1.25  # chunked peak at the largest token count / at the smallest
BYTES_RATIO_GOAL = 100.0
REL_ERROR_GOAL = 0.01
COSINE_GOAL = 0.99
TEACHER_RATIO_GOAL = 0.9
GOAL_VOCAB = 32768
DEFAULT_SUMMARY = (64, 16)
SUMMARY_GRID = ((16, 0), (32, 0), (32, 16), (64, 16), (128, 32))
LOSS_SETTINGS = ((10, 1.0), (5, 2.0))  # (K, β); normalize=True (the paper's final loss)

# Sizes per subcommand: the default run and --quick. Any flag given on the command line wins.
LOSS_SIZES = {
    "default": dict(tokens=8192, batch=4, vocab=32768, dim=512, chunk_tokens=512, top_m=64, tail_samples=16,
                    repeats=5, warmup=1, memory_tokens="2048,4096,8192"),
    "quick": dict(tokens=512, batch=2, vocab=2048, dim=64, chunk_tokens=128, top_m=32, tail_samples=8,
                  repeats=3, warmup=1, memory_tokens="256,512"),
}
SUMMARY_SIZES = {
    "default": dict(seeds=5, synthetic_vocab=32768, synthetic_batch=8, synthetic_seq=128, corpus_bytes=3_000_000,
                    tokenizer_vocab=512, layers=4, width=128, seq_len=128, train_batch=16, train_steps=800,
                    train_seconds=180.0, eval_sequences=16),
    "quick": dict(seeds=2, synthetic_vocab=2048, synthetic_batch=2, synthetic_seq=32, corpus_bytes=150_000,
                  tokenizer_vocab=300, layers=1, width=32, seq_len=32, train_batch=4, train_steps=10,
                  train_seconds=60.0, eval_sequences=2),
}
TEACHER_SIZES = {
    "default": dict(blocks=128, seq_len=256, batch_size=8, vocab=8192, layers=4, width=256, top_m=64, tail_samples=16,
                    actors=1, repeats=4),
    "quick": dict(blocks=8, seq_len=32, batch_size=4, vocab=512, layers=1, width=64, top_m=16, tail_samples=4,
                  actors=1, repeats=2),
}


def log(message: str) -> None:
    print(message, flush=True)


# ==================================================================================================
# loss: step time of the chunked objective, TAD vs baselines; peak memory vs a naive full-logit path
# ==================================================================================================
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


def chunked_step(inputs: LossInputs, kind: str, teacher: str, args):
    """One forward+backward of ``distill_objective`` (CLM + divergence ``kind``), teacher = "logits" | "summary"."""
    source = inputs.teacher_logits if teacher == "logits" else inputs.summary

    def step():
        inputs.clear_grads()
        out = distill_objective(inputs.hidden, inputs.weight, inputs.targets, source, kind=kind, k=args.k,
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
TIME_PAIRS = (("tad", "kd"), ("tad_summary", "topk_summary"))
MEMORY_VARIANTS = {"chunked_kd": ("kd", "logits"), "chunked_tad": ("tad", "logits"),
                   "chunked_tad_summary": ("tad", "summary")}


def bench_loss(args) -> dict:
    device = torch.device(args.device)
    log(f"[loss] inputs: B·T={args.tokens} (B={args.batch}), V={args.vocab}, d={args.dim}, chunk={args.chunk_tokens}, "
        f"K={args.k}, β={args.beta}, summary M={args.top_m} S={args.tail_samples}, device={device}")
    inputs = make_loss_inputs(args, args.tokens)
    steps = {name: chunked_step(inputs, kind, teacher, args) for name, (kind, teacher) in TIMED_VARIANTS.items()}
    log(f"[loss] timing {', '.join(steps)}: {args.warmup} warmup + {args.repeats} interleaved repeats")
    timings = time_interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device, progress=log)
    ratios = [dict(paired_ratio(timings, a, b), goal=TIME_RATIO_GOAL) for a, b in TIME_PAIRS]
    for ratio in ratios:
        ratio["meets_goal"] = ratio["median_of_paired_ratios"] <= TIME_RATIO_GOAL
    profiles = profile_pairs(inputs, args) if args.profile else None
    del inputs, steps
    memory = bench_memory(args, device)
    return {
        "config": {name: getattr(args, name) for name in ("tokens", "batch", "vocab", "dim", "chunk_tokens", "k", "beta",
                                                           "top_m", "tail_samples", "repeats", "warmup", "seed")},
        "step_seconds": {name: {"median": statistics.median(ts), "raw": ts} for name, ts in timings.items()},
        "time_ratios": ratios,
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
    from torch.profiler import ProfilerActivity, profile

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


def print_loss_table(result: dict) -> None:
    log("\nstep time (forward+backward of distill_objective, median of repeats)")
    for name, entry in result["step_seconds"].items():
        log(f"  {name:14s} {entry['median']:8.3f} s")
    log("\nratio                       median(paired)  ratio(medians)  goal     met")
    for r in result["time_ratios"]:
        log(f"  {r['numerator'] + ' / ' + r['denominator']:26s} {r['median_of_paired_ratios']:10.3f}  "
            f"{r['ratio_of_medians']:14.3f}  ≤ {r['goal']:.2f}  {'yes' if r['meets_goal'] else 'NO'}")
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


# ==================================================================================================
# summary: bytes per token and fidelity of tad_loss_from_summary against the exact tad_loss
# ==================================================================================================
def synthetic_distributions(args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Zipf-like teacher logits −a·log(rank) + noise, ranks randomly permuted per position; the student
    is the teacher plus independent noise. Returns (teacher, student) logits [B, T, V] and the recipe."""
    generator = torch.Generator().manual_seed(args.seed)
    b, t, vocab = args.synthetic_batch, args.synthetic_seq, args.synthetic_vocab
    exponent, noise, student_noise = 1.1, 1.0, 1.0
    by_rank = -exponent * torch.arange(1, vocab + 1, dtype=torch.float32).log()
    logits = by_rank + noise * torch.randn(b * t, vocab, generator=generator)
    permutation = torch.rand(b * t, vocab, generator=generator).argsort(-1)
    teacher = torch.empty_like(logits).scatter_(-1, permutation, logits).reshape(b, t, vocab)
    student = teacher + student_noise * torch.randn(b, t, vocab, generator=generator)
    recipe = {"kind": "synthetic", "vocab": vocab, "positions": b * t, "zipf_exponent": exponent, "teacher_noise": noise,
              "student_noise": student_noise}
    return teacher, student, recipe


def trained_distributions(args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Teacher and early-snapshot student logits on held-out text, from the cached small teacher
    (trained here if ``args.teacher_dir`` has none)."""
    from transformers import AutoModelForCausalLM

    root = Path(args.teacher_dir)
    if not (root / "teacher" / "model.safetensors").exists() or not (root / "student" / "model.safetensors").exists():
        train_small_teacher(args, root)
    info = json.loads((root / "train_info.json").read_text())
    log(f"[summary] using the cached teacher in {root} ({info['steps']} steps, final train loss {info['final_loss']:.3f}; "
        f"student = snapshot at step {info['student_step']})")
    val_ids = torch.load(root / "val_ids.pt", weights_only=True)
    seq_len = info["seq_len"]
    blocks = val_ids[: (val_ids.numel() // seq_len) * seq_len].reshape(-1, seq_len)[: args.eval_sequences]
    outputs = []
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(root / name).eval()
        with torch.no_grad():
            outputs.append(model(input_ids=blocks).logits.float())
    recipe = {"kind": "trained", "dir": str(root), "vocab": outputs[0].shape[-1], "positions": blocks.numel(), **info}
    return outputs[0], outputs[1], recipe


def train_small_teacher(args, root: Path) -> None:
    """Train a small Llama on the built-in corpus with a plain AdamW loop; save the final model as the
    teacher and the snapshot at 1/5 of training as the student (safetensors), plus the val token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailkd_ray.corpus import train_bpe_tokenizer, write_builtin_corpus

    started = time.perf_counter()
    train_dir, val_dir = write_builtin_corpus(root / "corpus", max_bytes=args.corpus_bytes)
    tokenizer = train_bpe_tokenizer(sorted(train_dir.glob("*.txt")), args.tokenizer_vocab, root / "tokenizer")
    train_ids, val_ids = (tokenize_dir(tokenizer, d) for d in (train_dir, val_dir))
    torch.save(val_ids, root / "val_ids.pt")
    log(f"[summary] training a teacher: {train_ids.numel()} train / {val_ids.numel()} val tokens, "
        f"vocab {len(tokenizer)}, {args.layers}×{args.width}, seq {args.seq_len}, {args.train_steps} steps")

    torch.manual_seed(args.seed)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.width, intermediate_size=3 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, args.train_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                                 (1 + math.cos(math.pi * min(1.0, s / args.train_steps))))
    blocks = train_ids[: (train_ids.numel() // args.seq_len) * args.seq_len].reshape(-1, args.seq_len)
    generator = torch.Generator().manual_seed(args.seed)
    student_step = max(1, args.train_steps // 5)
    loop_started = time.perf_counter()
    for step in range(1, args.train_steps + 1):
        batch = blocks[torch.randint(0, blocks.shape[0], (args.train_batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss  # HF shifts the labels by one itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step == student_step:
            model.save_pretrained(root / "student", safe_serialization=True)
        if step % 50 == 0 or step == args.train_steps:
            log(f"  step {step}/{args.train_steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
        if time.perf_counter() - loop_started > args.train_seconds:
            log(f"  stopping after step {step}: --train-seconds {args.train_seconds:g} reached")
            break
    if step < student_step:
        raise SystemExit(f"teacher training stopped at step {step}, before the student snapshot at step {student_step}: "
                         f"raise --train-seconds or lower --train-steps")
    model.save_pretrained(root / "teacher", safe_serialization=True)
    info = {"steps": step, "requested_steps": args.train_steps, "student_step": student_step, "final_loss": loss.item(), "seq_len": args.seq_len,
            "layers": args.layers, "width": args.width, "train_batch": args.train_batch,
            "corpus_bytes": args.corpus_bytes, "train_seconds": time.perf_counter() - started}
    (root / "train_info.json").write_text(json.dumps(info, indent=2))


def tokenize_dir(tokenizer, directory: Path) -> torch.Tensor:
    """All documents of ``directory`` tokenized and joined with eos, as one 1-D int64 tensor."""
    ids = []
    for path in sorted(directory.glob("*.txt")):
        ids.extend(tokenizer(path.read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def fidelity_rows(teacher: torch.Tensor, student: torch.Tensor, recipe: dict, seeds: int) -> list[dict]:
    """For each (K, β) and (M, S): relative loss error and gradient cosine of the summary loss vs the exact
    loss over ``seeds`` tail-sampling seeds, and the summary's bytes per token."""
    vocab = teacher.shape[-1]
    rows = []
    for k, beta in LOSS_SETTINGS:
        exact_logits = student.clone().requires_grad_()
        exact = tad_loss(exact_logits, teacher, k=k, beta=beta)
        (exact_grad,) = torch.autograd.grad(exact, exact_logits)
        for top_m, tail_samples in SUMMARY_GRID:
            signed, cosines = [], []
            for seed in range(seeds):
                summary = summarize(teacher, top_m=top_m, tail_samples=tail_samples,
                                    generator=torch.Generator().manual_seed(seed))
                logits = student.clone().requires_grad_()
                loss = tad_loss_from_summary(logits, summary, k=k, beta=beta)
                (grad,) = torch.autograd.grad(loss, logits)
                signed.append(((loss - exact) / exact.abs()).item())
                cosines.append(F.cosine_similarity(grad.flatten(), exact_grad.flatten(), dim=0).item())
            row = summary_row(recipe["kind"], vocab, k, beta, top_m, tail_samples, exact.item(), signed, cosines)
            rows.append(row)
            log(f"  {recipe['kind']:9s} K={k:2d} β={beta:g} M={top_m:3d} S={tail_samples:2d}: "
                f"|rel err| {row['abs_rel_error']['mean']:.2e} (max {row['abs_rel_error']['max']:.2e})  "
                f"cos {row['grad_cosine']['mean']:.5f} (min {row['grad_cosine']['min']:.5f})")
    return rows


def summary_row(teacher_kind: str, vocab: int, k: int, beta: float, top_m: int, tail_samples: int, exact_loss: float,
                signed: list[float], cosines: list[float]) -> dict:
    per_token = bytes_per_position(top_m, tail_samples)
    row = {
        "teacher": teacher_kind, "k": k, "beta": beta, "normalize": True, "top_m": top_m, "tail_samples": tail_samples,
        "summary_bytes_per_token": per_token,
        "bf16_bytes_per_token": 2 * vocab, "bytes_ratio": 2 * vocab / per_token,
        "bf16_bytes_per_token_at_32k": 2 * GOAL_VOCAB, "bytes_ratio_at_32k": 2 * GOAL_VOCAB / per_token,
        "exact_loss": exact_loss,
        "signed_rel_error": summary_stats(signed), "abs_rel_error": summary_stats([abs(e) for e in signed]),
        "grad_cosine": summary_stats(cosines), "raw": {"signed_rel_error": signed, "grad_cosine": cosines},
    }
    # The goal is judged on the worst seed, not the average one.
    row["meets_goal"] = (row["bytes_ratio_at_32k"] >= BYTES_RATIO_GOAL and row["abs_rel_error"]["max"] <= REL_ERROR_GOAL
                         and row["grad_cosine"]["min"] >= COSINE_GOAL)
    return row


def bench_summary(args) -> dict:
    sources = {"trained": trained_distributions, "synthetic": synthetic_distributions}
    kinds = list(sources) if args.teacher == "both" else [args.teacher]
    teachers, rows = [], []
    for kind in kinds:
        teacher, student, recipe = sources[kind](args)
        log(f"[summary] {kind} teacher: {recipe['positions']} positions, V={recipe['vocab']}, {args.seeds} seeds")
        teachers.append({**recipe, "mean_tail_mass_beyond_k": {
            str(k): tail_mass(teacher, k) for k, _ in LOSS_SETTINGS} | {str(m): tail_mass(teacher, m) for m, _ in SUMMARY_GRID}})
        rows.extend(fidelity_rows(teacher, student, recipe, args.seeds))
    default = [r for r in rows if (r["top_m"], r["tail_samples"]) == DEFAULT_SUMMARY and r["teacher"] == "trained"
               and (r["k"], r["beta"]) == LOSS_SETTINGS[0]]
    return {
        "config": {"seeds": args.seeds, "grid": SUMMARY_GRID, "loss_settings": LOSS_SETTINGS, "default_summary": DEFAULT_SUMMARY,
                   "goals": {"bytes_ratio_at_32k_min": BYTES_RATIO_GOAL, "abs_rel_error_max": REL_ERROR_GOAL,
                             "grad_cosine_min": COSINE_GOAL}},
        "teachers": teachers,
        "rows": rows,
        "default_meets_goal": default[0]["meets_goal"] if default else None,
    }


def tail_mass(logits: torch.Tensor, k: int) -> float:
    """Mean teacher probability mass beyond the top k."""
    probs = torch.softmax(logits.float(), dim=-1)
    return (1 - probs.topk(k, dim=-1).values.sum(-1)).mean().item()


def print_summary_table(result: dict) -> None:
    log("\nsummary fidelity vs exact tad_loss (normalize=True); |rel err| and cosine over seeds: mean ± std [worst]")
    log("  teacher    K  β    M   S  bytes/tok  ×bf16(V)  ×bf16(32k)   |rel err|                  signed rel err   "
        "grad cosine                   goal")
    for r in result["rows"]:
        e, s, c = r["abs_rel_error"], r["signed_rel_error"], r["grad_cosine"]
        log(f"  {r['teacher']:9s} {r['k']:2d} {r['beta']:g} {r['top_m']:4d} {r['tail_samples']:3d} {r['summary_bytes_per_token']:9d} "
            f"{r['bytes_ratio']:9.1f} {r['bytes_ratio_at_32k']:10.1f}   {e['mean']:.2e} ± {e['std']:.1e} [{e['max']:.1e}]  "
            f"{s['mean']:+.2e}        {c['mean']:.5f} ± {c['std']:.1e} [{c['min']:.5f}]  {'yes' if r['meets_goal'] else 'no'}")
    for teacher in {r["teacher"] for r in result["rows"]}:
        met = sorted({(r["top_m"], r["tail_samples"]) for r in result["rows"]
                      if r["teacher"] == teacher and r["meets_goal"] and (r["k"], r["beta"]) == LOSS_SETTINGS[0]})
        log(f"  (M, S) meeting the goal on the {teacher} teacher at K={LOSS_SETTINGS[0][0]}, β={LOSS_SETTINGS[0][1]:g}: "
            f"{met or 'none'}")
    if result["default_meets_goal"] is not None:
        log(f"  default (M, S) = {DEFAULT_SUMMARY} meets the goal on the trained teacher: "
            f"{'yes' if result['default_meets_goal'] else 'NO'}")


# ==================================================================================================
# teacher: tokens/s of the teacher actor pool (Ray Data) vs the same scorer in a bare in-process loop
# ==================================================================================================
def build_bench_teacher(args, root: Path) -> Path:
    """A random-weight Llama (``--layers`` × ``--width``, vocabulary ``--vocab``) saved with a BPE tokenizer
    trained on the built-in corpus; returns its directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailkd_ray.corpus import train_bpe_tokenizer, write_builtin_corpus

    train_dir, _ = write_builtin_corpus(root / "corpus", max_bytes=300_000)
    model_dir = root / "teacher"
    tokenizer = train_bpe_tokenizer(sorted(train_dir.glob("*.txt")), args.vocab, model_dir)
    eos = tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    # vocab_size = --vocab even if BPE learnt fewer merges: a padded vocabulary, as real teachers have.
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=3 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    log(f"[teacher] built a {args.layers}×{args.width} Llama, vocab {args.vocab} (tokenizer {len(tokenizer)}), in {model_dir}")
    return model_dir


def teacher_bench_config(args, model_dir: Path):
    from tailkd_ray.config import from_dict

    return from_dict({"teacher": {"model": str(model_dir), "batch_size": args.batch_size, "min_actors": args.actors,
                                  "max_actors": args.actors,
                                  "num_gpus": 1.0 if torch.device(args.device).type == "cuda" else 0.0},
                      "data": {"seq_len": args.seq_len},
                      "summary": {"top_m": args.top_m, "tail_samples": args.tail_samples},
                      "loss": {"k": min(10, args.top_m)},
                      "train": {"seed": args.seed}})


def start_bench_ray() -> None:
    import ray
    import ray.data

    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def probe_ray_worker() -> dict:
    """What a 1-CPU Ray worker, as a teacher actor, starts with: torch's thread count (Ray sets OMP_NUM_THREADS
    from num_cpus) and the seconds to import torch + transformers there; plus the round trip of that task."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> dict:
        started = time.perf_counter()
        import torch
        from transformers import AutoModelForCausalLM  # noqa: F401  (the scorer's import)

        return {"torch_threads": torch.get_num_threads(), "import_seconds": time.perf_counter() - started}

    started = time.perf_counter()
    result = ray.get(probe.remote())
    return {**result, "task_round_trip_seconds": time.perf_counter() - started}


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


def pool_step(cfg, blocks_dataset, runs: list):
    """``score_dataset`` (start-up checks, then a fresh actor pool) consumed to the end in the driver."""
    from tailkd_ray.teacher import score_dataset

    def step():
        start = time.perf_counter()
        scored = score_dataset(blocks_dataset, cfg)
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


def bench_teacher(args) -> dict:
    import tempfile

    import ray
    import ray.data

    from tailkd_ray.teacher import TeacherScorer, scorer_kwargs

    with tempfile.TemporaryDirectory(prefix="bench_teacher_") as root:
        cfg = teacher_bench_config(args, build_bench_teacher(args, Path(root)))
        blocks = np.random.default_rng(args.seed).integers(0, args.vocab, (args.blocks, args.seq_len + 1), dtype=np.int32)
        start_bench_ray()
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
            runs = {"pool": [], "bare": []}
            steps = {"pool": pool_step(cfg, dataset, runs["pool"]),
                     "bare": bare_step(scorer, blocks, args.batch_size, threads, runs["bare"])}
            log(f"[teacher] {args.blocks} blocks × {args.seq_len} tokens, batch {args.batch_size}, {args.actors} actor(s); "
                f"bare loop with {threads} torch thread(s); {args.repeats} interleaved repeats")
            timings = time_interleaved(steps, repeats=args.repeats, warmup=0, device=torch.device(args.device), progress=log)
        finally:
            ray.shutdown()
    return teacher_result(args, timings, runs, threads, bare_load_seconds, worker)


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
    ratios = {}
    for kind, per_run in (("end_to_end", end_to_end), ("steady_state", steady)):
        paired = [p / b for p, b in zip(per_run["pool"], per_run["bare"])]
        ratios[kind] = {"median_of_paired_ratios": statistics.median(paired), "paired_ratios": paired,
                        "goal": TEACHER_RATIO_GOAL, "meets_goal": statistics.median(paired) >= TEACHER_RATIO_GOAL}
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
    }


def print_teacher_table(result: dict) -> None:
    c, v = result["config"], result["variants"]
    log(f"\nteacher tokens/s ({c['layers']}×{c['width']} Llama, V={c['vocab']}, {c['blocks']} blocks × {c['seq_len']} "
        f"tokens, batch {c['batch_size']}, M={c['top_m']} S={c['tail_samples']}, {c['actors']} actor(s), bare loop on "
        f"{result['bare_torch_threads']} thread(s); median of {c['repeats']} repeats)")
    log("  variant   end-to-end tok/s  steady tok/s  first batch s  total s")
    for name, e in v.items():
        log(f"  {name:8s} {e['tokens_per_second']['median']:16.0f} {e['steady_tokens_per_second']['median']:13.0f} "
            f"{e['first_batch_seconds']['median']:14.2f} {e['seconds']['median']:8.2f}")
    probe = result["ray_worker_probe"]
    log(f"  start-up parts: score_dataset checks {statistics.median(v['pool']['checks_seconds']):.2f} s; model load in a "
        f"warm process {result['bare_model_load_seconds']:.2f} s; import torch + transformers in a Ray worker "
        f"{probe['import_seconds']:.2f} s (first task round trip {probe['task_round_trip_seconds']:.2f} s)")
    log("  steady tok/s: median over batches 2..n of batch tokens / time since the previous batch arrived")
    log("\nratio pool / bare tokens/s   median(paired)  goal   met")
    for kind, r in result["ratios_pool_over_bare"].items():
        log(f"  {kind:26s} {r['median_of_paired_ratios']:14.3f}  ≥{r['goal']:g}  {'yes' if r['meets_goal'] else 'NO'}")


# ==================================================================================================
# Command line
# ==================================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    loss = commands.add_parser("loss", help="step time ratios and peak memory of the chunked loss")
    for name, text, kind in (("tokens", "B·T tokens per step", int), ("batch", "B", int), ("vocab", "V", int),
                             ("dim", "hidden size d", int), ("chunk_tokens", "tokens per chunk of distill_objective", int),
                             ("top_m", "summary M", int), ("tail_samples", "summary S", int),
                             ("repeats", "timed repeats per variant", int), ("warmup", "untimed rounds first", int),
                             ("memory_tokens", "comma-separated token counts for the memory table", str)):
        defaults = f"default {LOSS_SIZES['default'][name]}; --quick {LOSS_SIZES['quick'][name]}"
        loss.add_argument("--" + name.replace("_", "-"), type=kind, help=f"{text} ({defaults})")
    loss.add_argument("--k", type=int, default=10, help="TAD / top-K K (default 10)")
    loss.add_argument("--beta", type=float, default=1.0, help="TAD β (default 1)")
    loss.add_argument("--profile", action="store_true", help="also torch.profiler one step of each variant")

    summary = commands.add_parser("summary", help="summary bytes and loss/gradient fidelity vs the exact loss")
    summary.add_argument("--teacher", choices=("both", "trained", "synthetic"), default="both")
    summary.add_argument("--teacher-dir", default="runs/bench_teacher", help="cache of the trained teacher (reused if present)")
    summary.add_argument("--seeds", type=int, help="tail-sampling seeds (default 5)")
    summary.add_argument("--synthetic-vocab", type=int, help="synthetic teacher vocabulary (default 32768)")
    summary.add_argument("--synthetic-batch", type=int, help="synthetic sequences (default 8)")
    summary.add_argument("--synthetic-seq", type=int, help="synthetic sequence length (default 128)")
    summary.add_argument("--train-steps", type=int, help="teacher training steps (default 800; student = step/5)")
    summary.add_argument("--train-seconds", type=float, help="stop the teacher training loop after this many seconds (default 180)")
    summary.add_argument("--eval-sequences", type=int, help="held-out sequences scored (default 16)")
    for name in ("corpus_bytes", "tokenizer_vocab", "layers", "width", "seq_len", "train_batch"):
        summary.add_argument("--" + name.replace("_", "-"), type=int, help=f"teacher training (default {SUMMARY_SIZES['default'][name]})")

    teacher = commands.add_parser("teacher", help="teacher tokens/s: Ray Data actor pool vs a bare in-process loop")
    for name, text in (("blocks", "packed blocks scored per run"), ("seq_len", "tokens per block (+1 packed)"),
                       ("batch_size", "teacher.batch_size of both variants"), ("vocab", "teacher vocabulary"),
                       ("layers", "teacher layers"), ("width", "teacher hidden size"), ("top_m", "summary M"),
                       ("tail_samples", "summary S"), ("actors", "teacher actors (bare loop: this many × an actor's torch threads)"),
                       ("repeats", "interleaved repeats per variant")):
        teacher.add_argument("--" + name.replace("_", "-"), type=int, help=f"{text} (default {TEACHER_SIZES['default'][name]})")

    for command in (loss, summary, teacher):
        command.add_argument("--json", required=True, help="write the results here (JSON)")
        command.add_argument("--quick", action="store_true", help="small sizes: seconds, for tests")
        command.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
        command.add_argument("--seed", type=int, default=0)
    return parser


def resolve_sizes(args, sizes: dict) -> None:
    """Fill every size flag not given on the command line from the default or --quick table."""
    for name, value in sizes["quick" if args.quick else "default"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    bench, printer, sizes = {"loss": (bench_loss, print_loss_table, LOSS_SIZES),
                             "summary": (bench_summary, print_summary_table, SUMMARY_SIZES),
                             "teacher": (bench_teacher, print_teacher_table, TEACHER_SIZES)}[args.command]
    resolve_sizes(args, sizes)
    started = time.perf_counter()
    result = {"benchmark": args.command, "meta": run_metadata(["jobs/bench.py", *argv], torch.device(args.device)),
              **bench(args)}
    result["meta"]["seconds"] = time.perf_counter() - started
    printer(result)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"\nwrote {out} ({result['meta']['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
