"""``summary``: bytes per token and fidelity of ``tad_loss_from_summary`` against the exact ``tad_loss``.

Bytes per token of the summary vs bf16 logits (2·V bytes), and the loss relative error and
gradient cosine (w.r.t. the student logits) of ``tad_loss_from_summary`` vs the exact ``tad_loss`` over a
grid of (M, S) and several sampling seeds, on a small teacher trained here on the built-in corpus (cached
under ``runs/bench_teacher/``) and on a synthetic heavy-tailed 32k-vocabulary teacher. Goal at the default
(M, S) = (64, 16): ≥ 100× fewer bytes than bf16 logits at V = 32k, relative error ≤ 1% and gradient
cosine ≥ 0.99 on the trained teacher (worst seed).

Also the lean teacher's memory: peak extra memory of summarising a teacher batch (default 2 × 1024 tokens, width
896, V = 151,936, the default (M, S)) from its final hidden states chunk by chunk (``summarize_hidden``) vs from
its full logits (LM head, then ``summarize``: today's path for models that post-process their logits), in the
teacher's dtype on ``--device``; both must give the same summary ids.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tailkd_ray.config import TrainConfig
from tailkd_ray.core.losses import tad_loss, tad_loss_from_summary
from tailkd_ray.core.summary import bytes_per_position, default_chunk_tokens, summarize, summarize_hidden
from tailkd_ray.data.corpus import train_bpe_tokenizer, write_builtin_corpus
from tailkd_ray.train.strategies import lr_scheduler

from tailkd_ray.models import inference_dtype

from .measure import log, peak_extra_bytes, small_llama_config, summary_stats

NAME = "summary"
HELP = "summary bytes and loss/gradient fidelity vs the exact loss"
BYTES_RATIO_GOAL = 100.0
REL_ERROR_GOAL = 0.01
COSINE_GOAL = 0.99
GOAL_VOCAB = 32768
DEFAULT_SUMMARY = (64, 16)
SUMMARY_GRID = ((16, 0), (32, 0), (32, 16), (64, 16), (128, 32))
LOSS_SETTINGS = ((10, 1.0), (5, 2.0))  # (K, β); normalize=True (the paper's final loss)

# Sizes: the default run and --quick. Any flag given on the command line wins.
SIZES = {
    "default": dict(seeds=5, synthetic_vocab=32768, synthetic_batch=8, synthetic_seq=128, corpus_bytes=3_000_000,
                    tokenizer_vocab=512, layers=4, width=128, seq_len=128, train_batch=16, train_steps=800,
                    train_seconds=180.0, eval_sequences=16, lean_vocab=151_936, lean_width=896, lean_batch=2,
                    lean_seq=1024, lean_chunk_tokens=None),
    "quick": dict(seeds=2, synthetic_vocab=2048, synthetic_batch=2, synthetic_seq=32, corpus_bytes=150_000,
                  tokenizer_vocab=300, layers=1, width=32, seq_len=32, train_batch=4, train_steps=10,
                  train_seconds=60.0, eval_sequences=2, lean_vocab=4096, lean_width=32, lean_batch=2, lean_seq=64,
                  lean_chunk_tokens=16),
}


def add_arguments(parser) -> None:
    """The ``summary`` flags: which teachers, the trained teacher's cache, and the sizes of ``SIZES``."""
    parser.add_argument("--teacher", choices=("both", "trained", "synthetic"), default="both")
    parser.add_argument("--teacher-dir", default="runs/bench_teacher", help="cache of the trained teacher (reused if present)")
    parser.add_argument("--seeds", type=int, help="tail-sampling seeds (default 5)")
    parser.add_argument("--synthetic-vocab", type=int, help="synthetic teacher vocabulary (default 32768)")
    parser.add_argument("--synthetic-batch", type=int, help="synthetic sequences (default 8)")
    parser.add_argument("--synthetic-seq", type=int, help="synthetic sequence length (default 128)")
    parser.add_argument("--train-steps", type=int, help="teacher training steps (default 800; student = step/5)")
    parser.add_argument("--train-seconds", type=float, help="stop the teacher training loop after this many seconds (default 180)")
    parser.add_argument("--eval-sequences", type=int, help="held-out sequences scored (default 16)")
    for name in ("corpus_bytes", "tokenizer_vocab", "layers", "width", "seq_len", "train_batch"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"teacher training (default {SIZES['default'][name]})")
    for name, what in (("lean_vocab", "vocabulary"), ("lean_width", "hidden width"), ("lean_batch", "sequences"),
                       ("lean_seq", "sequence length")):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            help=f"lean-teacher memory: {what} (default {SIZES['default'][name]})")
    parser.add_argument("--lean-chunk-tokens", type=int, help="lean-teacher memory: positions per summary chunk "
                                                              "(default: the library's, 441 at V = 151,936)")


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
    started = time.perf_counter()
    train_dir, val_dir = write_builtin_corpus(root / "corpus", max_bytes=args.corpus_bytes)
    tokenizer = train_bpe_tokenizer(sorted(train_dir.glob("*.txt")), args.tokenizer_vocab, root / "tokenizer")
    train_ids, val_ids = (tokenize_dir(tokenizer, d) for d in (train_dir, val_dir))
    torch.save(val_ids, root / "val_ids.pt")
    log(f"[summary] training a teacher: {train_ids.numel()} train / {val_ids.numel()} val tokens, "
        f"vocab {len(tokenizer)}, {args.layers}×{args.width}, seq {args.seq_len}, {args.train_steps} steps")

    torch.manual_seed(args.seed)
    config = small_llama_config(vocab=len(tokenizer), layers=args.layers, width=args.width, seq_len=args.seq_len,
                                eos=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, args.train_steps // 20)
    # the trainer's default schedule: warmup + cosine decay to 0
    schedule = lr_scheduler(optimizer, TrainConfig(warmup_steps=warmup, max_steps=args.train_steps))
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


def run(args) -> dict:
    """Fidelity rows on each requested teacher; the ``summary`` result."""
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
        "lean_teacher": lean_teacher_memory(args),
    }


def lean_teacher_memory(args) -> dict:
    """Peak extra bytes of one teacher batch's summary from its final hidden states (``summarize_hidden``) vs from
    its full logits (the LM head's output, then ``summarize``), random hidden states and LM head in the teacher's
    dtype on ``args.device``, the same uniforms; and whether the two summaries' ids agree."""
    device = torch.device(args.device)
    dtype = inference_dtype(device)
    generator = torch.Generator().manual_seed(args.seed)
    batch, seq, width, vocab = args.lean_batch, args.lean_seq, args.lean_width, args.lean_vocab
    top_m, tail_samples = DEFAULT_SUMMARY
    chunk_tokens = args.lean_chunk_tokens or default_chunk_tokens(vocab)
    hidden = torch.randn(batch, seq, width, generator=generator).to(device, dtype)
    weight = (torch.randn(vocab, width, generator=generator) * (3 / width**0.5)).to(device, dtype)
    summary_args = dict(top_m=top_m, tail_samples=tail_samples,
                        uniforms=torch.rand(batch, seq, tail_samples, generator=generator))
    summaries = {}
    steps = {"full_logits": lambda: summarize(F.linear(hidden, weight), **summary_args),
             "hidden_states": lambda: summarize_hidden(hidden, weight, chunk_tokens=chunk_tokens, **summary_args)}
    peaks = {}
    for name, step in steps.items():
        peaks[name] = peak_extra_bytes(lambda: summaries.update({name: step()}), device)
        log(f"[summary] lean teacher: summary from {name.replace('_', ' ')}: peak extra {peaks[name] / 2**20:.1f} MiB")
    same = all(torch.equal(getattr(summaries["full_logits"], name), getattr(summaries["hidden_states"], name))
               for name in ("top_ids", "tail_ids"))
    return {"vocab": vocab, "width": width, "batch": batch, "seq_len": seq, "chunk_tokens": chunk_tokens, "top_m": top_m,
            "tail_samples": tail_samples, "dtype": str(dtype).removeprefix("torch."),
            "logits_bytes": batch * seq * vocab * dtype.itemsize, "peak_extra_bytes": peaks,
            "full_over_hidden": peaks["full_logits"] / peaks["hidden_states"], "same_ids": same}


def tail_mass(logits: torch.Tensor, k: int) -> float:
    """Mean teacher probability mass beyond the top k."""
    probs = torch.softmax(logits.float(), dim=-1)
    return (1 - probs.topk(k, dim=-1).values.sum(-1)).mean().item()


def print_table(result: dict) -> None:
    """The fidelity table of a ``summary`` result and which (M, S) meet the goal."""
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
    lean = result["lean_teacher"]
    peaks = {name: f"{peak / 2**20:.1f} MiB" for name, peak in lean["peak_extra_bytes"].items()}
    log(f"\nlean teacher ({lean['batch']} × {lean['seq_len']} tokens, width {lean['width']}, V = {lean['vocab']}, "
        f"{lean['dtype']}, chunks of {lean['chunk_tokens']} positions): peak extra memory of the summary from hidden states {peaks['hidden_states']} vs from full "
        f"logits {peaks['full_logits']} ({lean['full_over_hidden']:.2f}x; the logits alone "
        f"{lean['logits_bytes'] / 2**20:.1f} MiB); same ids: {'yes' if lean['same_ids'] else 'NO'}")
