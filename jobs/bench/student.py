"""``student``: the student's forward + backward with and without activation checkpointing (and compiled blocks).

One student (``StudentWithHead`` around a random Llama, ``--layers`` × ``--width``, vocabulary ``--vocab``) trains on
``--batch`` sequences of ``--seq-len`` tokens, its decoder blocks prepared as the strategies prepare them
(``models.prepare_decoder_blocks``; no sharding, one process): ``plain``, ``ac`` (``train.activation_checkpointing``)
and, with ``--compile``, ``compile`` and ``ac_compile`` (``train.compile``; compiled during the warm-up rounds).
The head is next-token cross-entropy on full logits, the same in every variant, so the differences are the
decoder's. Reported: the peak memory one step allocates beyond the weights (``measure.peak_extra_bytes``: CUDA's
allocator peak, on CPU the live ATen tensors), and seconds per step, interleaved, each variant over ``plain`` as
the median of paired ratios; on a GPU also tokens/s and MFU (training model FLOPs, recomputation not counted, over
the bf16 peak). float32 on CPU, bf16 weights on CUDA.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tailkd_ray.models import StudentWithHead, prepare_decoder_blocks

from .measure import (add_peak_tflops_argument, log, mfu, model_flops_per_token, paired_ratio, peak_extra_bytes,
                      peak_tflops, small_llama_config, time_interleaved)

NAME = "student"
HELP = "student forward + backward: peak memory and step time with / without activation checkpointing (and compile)"
SIZES = {
    "default": dict(layers=8, width=512, vocab=8192, seq_len=2048, batch=1, repeats=5, warmup=1),
    "quick": dict(layers=2, width=64, vocab=256, seq_len=64, batch=2, repeats=2, warmup=1),
}
VARIANTS = {"plain": dict(activation_checkpointing=False, compile=False),
            "ac": dict(activation_checkpointing=True, compile=False),
            "compile": dict(activation_checkpointing=False, compile=True),
            "ac_compile": dict(activation_checkpointing=True, compile=True)}


def add_arguments(parser) -> None:
    for name, text in (("layers", "student decoder layers"), ("width", "student hidden size"),
                       ("vocab", "vocabulary"), ("seq_len", "tokens per sequence"), ("batch", "sequences per step"),
                       ("repeats", "interleaved timed repeats"), ("warmup", "untimed rounds first (compilation)")):
        defaults = f"default {SIZES['default'][name]}; --quick {SIZES['quick'][name]}"
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"{text} ({defaults})")
    parser.add_argument("--compile", action="store_true",
                        help="also time compiled blocks (compile, ac_compile): minutes of compilation on CPU")
    add_peak_tflops_argument(parser)


def student_config(args):
    return small_llama_config(vocab=args.vocab, layers=args.layers, width=args.width, seq_len=args.seq_len, eos=0)


def build_variant(args, prepare: dict, device: torch.device) -> StudentWithHead:
    """The seeded random student with its blocks prepared as ``prepare`` says, on ``device`` (bf16 on CUDA)."""
    config = student_config(args)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prepare_decoder_blocks(model, **prepare)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return StudentWithHead(model).to(device=device, dtype=dtype).train()


def run(args) -> dict:
    device = torch.device(args.device)
    names = [name for name in VARIANTS if args.compile or not VARIANTS[name]["compile"]]
    students = {name: build_variant(args, VARIANTS[name], device) for name in names}
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device,
                           generator=torch.Generator(device).manual_seed(args.seed))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def clm(hidden, weight, bias):
        return F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, 1).float(), targets.flatten())

    def step(student):
        def call():
            loss = student(inputs, clm)
            loss.backward()
            student.zero_grad(set_to_none=True)
            return loss.item()
        return call

    steps = {name: step(student) for name, student in students.items()}
    parameters = sum(p.numel() for p in students["plain"].parameters())
    log(f"[student] {args.layers}×{args.width} Llama ({parameters / 1e6:.1f}M parameters), vocab {args.vocab}, "
        f"{args.batch} × {args.seq_len} tokens on {device}; variants {', '.join(names)}")
    losses = {name: call() for name, call in steps.items()}  # also compiles, before any timing or memory probe
    timings = time_interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device, progress=log)
    peak = {name: peak_extra_bytes(call, device) for name, call in steps.items()}
    tokens_per_second = {name: args.batch * args.seq_len / statistics.median(seconds)
                         for name, seconds in timings.items()}
    flops = model_flops_per_token(student_config(args), args.seq_len, training=True)
    peak_flops = peak_tflops(device, args.peak_tflops)
    return {"config": {name: getattr(args, name) for name in SIZES["default"]} | {"seed": args.seed,
                                                                                  "compile": args.compile},
            "parameters": parameters, "first_loss": losses, "peak_extra_bytes": peak,
            "tokens_per_second": tokens_per_second,
            "mfu": {name: mfu(flops, rate, peak_flops) for name, rate in tokens_per_second.items()},
            "ac_saves_bytes": peak["plain"] - peak["ac"], "ac_peak_fraction": peak["ac"] / peak["plain"],
            "seconds": timings, "ratios": {name: paired_ratio(timings, name, "plain") for name in names[1:]}}


def print_table(result: dict) -> None:
    config = result["config"]
    log(f"\nstudent {config['layers']}×{config['width']}, {config['batch']} × {config['seq_len']} tokens, "
        f"vocab {config['vocab']}: one forward + backward (median of {config['repeats']} repeats)")
    log(f"  {'variant':11s} {'seconds':>8s} {'/ plain':>8s} {'peak MiB':>9s} {'tokens/s':>9s} {'MFU':>6s}")
    for name, seconds in result["seconds"].items():
        ratio = result["ratios"][name]["median_of_paired_ratios"] if name in result["ratios"] else 1.0
        utilisation = result["mfu"][name]
        log(f"  {name:11s} {statistics.median(seconds):8.3f} {ratio:8.3f} {result['peak_extra_bytes'][name] / 2**20:9.1f} "
            f"{result['tokens_per_second'][name]:9.0f} {'-' if utilisation is None else f'{utilisation:.1%}':>6s}")
    log(f"\nactivation checkpointing saves {result['ac_saves_bytes'] / 2**20:.1f} MiB of peak memory "
        f"(peak {result['ac_peak_fraction']:.3f} of plain's)")
