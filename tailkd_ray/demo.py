"""The embedded default (``tailkd demo``): no downloads, local Ray, a meaningful result in minutes.

1. corpus: the running Python's own documentation and standard-library sources (DESIGN §6);
2. a byte-level BPE tokenizer trained on it (HF ``tokenizers``);
3. a small teacher pretrained on it with CLM — itself a Ray Train run, cached in ``OUT/teacher``;
4. three students of equal size and budget — CLM only, vanilla KD, TAD (K = 10, β = 2) — trained from
   the same teacher summaries and evaluated on held-out text;
5. ``OUT/report.md`` (side-by-side table), ``OUT/curves.png`` (validation loss vs step), the students in
   HF format under ``OUT/students/<name>/student``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from tailkd_ray.config import ConfigError, _build, apply_overrides, doc, from_dict
from tailkd_ray.runtime import init_ray

log = logging.getLogger("tailkd.demo")

METRIC_COLUMNS = ("val_loss", "val_ppl", "kl_to_teacher", "top1_agreement", "full_ece",
                  "tail_mass_student", "tail_mass_teacher")


@dataclass
class DemoSettings:
    corpus_bytes: int = doc(1_500_000, "Bytes of built-in text used (documentation first, then stdlib sources).")
    vocab_size: int = doc(1024, "BPE vocabulary size.")
    seq_len: int = doc(128, "Tokens per training sequence.")
    teacher_layers: int = doc(4, "Teacher decoder layers.")
    teacher_width: int = doc(128, "Teacher hidden size (heads of 32 dims).")
    teacher_steps: int = doc(300, "Teacher pretraining steps.")
    student_layers: int = doc(2, "Student decoder layers.")
    student_width: int = doc(64, "Student hidden size (heads of 32 dims).")
    student_steps: int = doc(200, "Steps per student (the same budget for all three).")
    batch_size: int = doc(8, "Sequences per worker per step.")
    num_workers: int = doc(2, "Ray Train workers.")
    eval_every: int = doc(50, "Steps between validation runs (the curves' resolution).")
    students: dict = doc({"clm": {"loss.kind": "clm"}, "kd": {"loss.kind": "kd"},
                          "tad": {"loss.kind": "tad", "loss.k": 10, "loss.beta": 2.0}},
                         "Students to compare: name -> config overrides.")
    seed: int = doc(0, "Seed of everything.")


def demo_settings(overrides: list[str]) -> DemoSettings:
    """Demo settings with ``key=value`` overrides (e.g. ``student_steps=50``)."""
    return _build(DemoSettings, apply_overrides({}, overrides), "")


def _llama_config(layers: int, width: int, vocab: int, seq_len: int) -> dict:
    if width % 32:
        raise ConfigError(f"demo widths must be multiples of 32 (heads of 32 dims), got {width}")
    return dict(model_type="llama", vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                num_hidden_layers=layers, num_attention_heads=width // 32, num_key_value_heads=width // 32,
                max_position_embeddings=seq_len + 1, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=0, pad_token_id=0)


def prepare_corpus_and_tokenizer(out: Path, settings: DemoSettings) -> tuple[Path, Path, Path]:
    """Write the built-in corpus and train the tokenizer once (reused on later runs)."""
    from tailkd_ray.corpus import train_bpe_tokenizer, write_builtin_corpus

    corpus, tokenizer = out / "corpus", out / "tokenizer"
    if not (corpus / "done").exists():
        write_builtin_corpus(corpus, max_bytes=settings.corpus_bytes)
        (corpus / "done").write_text(str(settings.corpus_bytes))
    if not (tokenizer / "tokenizer.json").exists():
        train_bpe_tokenizer(sorted((corpus / "train").glob("*.txt")), settings.vocab_size, tokenizer)
    return corpus / "train", corpus / "val", tokenizer


def base_config(out: Path, settings: DemoSettings, train_dir: Path, val_dir: Path, tokenizer: Path) -> dict:
    return {
        "data": {"train": str(train_dir), "val": str(val_dir), "format": "text", "text_document": "file",
                 "tokenizer": str(tokenizer), "seq_len": settings.seq_len},
        "train": {"num_workers": settings.num_workers, "strategy": "ddp", "batch_size": settings.batch_size,
                  "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 20, "eval_every": settings.eval_every,
                  "checkpoint_every": 10_000, "seed": settings.seed},
        "summary": {"top_m": 64, "tail_samples": 16},
    }


def pretrain_teacher(out: Path, settings: DemoSettings, base: dict) -> Path:
    """A CLM-only Ray Train run from a random Llama; the exported model becomes the teacher."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tailkd_ray.train import distill

    teacher_dir = out / "teacher"
    if (teacher_dir / "student" / "model.safetensors").exists():
        log.info("reusing the pretrained teacher in %s", teacher_dir / "student")
        return teacher_dir / "student"
    init_dir = out / "teacher_init"
    import torch

    torch.manual_seed(settings.seed)
    config = _llama_config(settings.teacher_layers, settings.teacher_width, settings.vocab_size, settings.seq_len)
    config.pop("model_type")
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(init_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base["data"]["tokenizer"]).save_pretrained(init_dir)
    raw = json.loads(json.dumps(base))
    raw.update(output_dir=str(teacher_dir), student={"model": str(init_dir)}, loss={"kind": "clm"},
               summary={"top_m": None})
    raw["train"].update(max_steps=settings.teacher_steps, run_name="teacher")
    distill(from_dict(raw))
    return teacher_dir / "student"


def train_students(out: Path, settings: DemoSettings, base: dict, teacher: Path) -> dict[str, dict]:
    from tailkd_ray.train import distill

    student_arch = _llama_config(settings.student_layers, settings.student_width, settings.vocab_size, settings.seq_len)
    overrides = {k: v for k, v in student_arch.items() if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                 "num_attention_heads", "num_key_value_heads")}
    results = {}
    for name, student_overrides in settings.students.items():
        raw = json.loads(json.dumps(base))
        raw.update(output_dir=str(out / "students" / name), teacher={"model": str(teacher)},
                   student={"config": overrides, "init": "random"})
        raw["summary"]["cache_dir"] = str(out / "summary_cache")  # one teacher pass serves every student
        raw["train"].update(max_steps=settings.student_steps, run_name=name)
        config = from_dict(apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in student_overrides.items()]))
        log.info("training student %s (%s)", name, student_overrides)
        results[name] = distill(config)
    return results


def read_curve(metrics_jsonl: Path, key: str = "val_loss") -> list[tuple[int, float]]:
    """(step, value) pairs of ``key`` from a run's metrics.jsonl."""
    points = []
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        if key in record and "step" in record:
            points.append((int(record["step"]), float(record[key])))
    return points


def results_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per student, the eval metrics side by side."""
    header = "| student | " + " | ".join(METRIC_COLUMNS) + " |"
    rows = [header, "|" + "---|" * (len(METRIC_COLUMNS) + 1)]
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4g}" if isinstance(metrics.get(c), (int, float)) else "—" for c in METRIC_COLUMNS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("tailkd demo: students of equal size and budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, settings: DemoSettings, results: dict[str, dict], seconds: float) -> Path:
    table = results_table(results)
    text = (f"# tailkd demo report\n\nBuilt-in corpus ({settings.corpus_bytes:,} bytes of Python docs and stdlib "
            f"sources), BPE vocabulary {settings.vocab_size}, sequences of {settings.seq_len} tokens.\n"
            f"Teacher: {settings.teacher_layers} layers × {settings.teacher_width} wide, {settings.teacher_steps} "
            f"CLM steps. Students: {settings.student_layers} layers × {settings.student_width} wide, "
            f"{settings.student_steps} steps each, {settings.num_workers} workers × {settings.batch_size} sequences.\n\n"
            f"Held-out metrics (validation split; lower is better except top1_agreement):\n\n{table}\n"
            f"![validation loss](curves.png)\n\nWall time: {seconds:.0f} s.\n")
    path = out / "report.md"
    path.write_text(text)
    return path


def _claim_output_dir(out: Path, settings: DemoSettings) -> None:
    """Record the settings in OUT/settings.json; a rerun reuses finished work only with the same settings."""
    out.mkdir(parents=True, exist_ok=True)
    record, wanted = out / "settings.json", asdict(settings)
    if record.exists() and json.loads(record.read_text()) != wanted:
        before = json.loads(record.read_text())
        changed = sorted(k for k in wanted if before.get(k) != wanted[k])
        raise ConfigError(f"{out} holds a demo made with other settings ({', '.join(changed)} differ); "
                          f"use another --out, or delete {out} to start over")
    record.write_text(json.dumps(wanted, indent=2) + "\n")


def run_demo(out_dir: str = "runs/demo", overrides: Optional[list[str]] = None) -> dict:
    """The whole demo; returns {student name: eval metrics}."""
    settings = demo_settings(list(overrides or []))
    out = Path(out_dir).absolute()  # Ray workers do not run in this directory
    _claim_output_dir(out, settings)
    start = time.time()
    init_ray()
    train_dir, val_dir, tokenizer = prepare_corpus_and_tokenizer(out, settings)
    base = base_config(out, settings, train_dir, val_dir, tokenizer)
    teacher = pretrain_teacher(out, settings, base)
    results = train_students(out, settings, base, teacher)
    curves = {name: read_curve(out / "students" / name / "metrics.jsonl") for name in results}
    plot_curves(curves, out / "curves.png")
    report = write_report(out, settings, results, time.time() - start)
    print(results_table(results))
    print(f"report: {report}\ncurves: {out / 'curves.png'}")
    return results

