"""The embedded default (``tailkd demo``): no downloads, local Ray, a meaningful result in minutes (DESIGN §6).

Two tasks share every stage: ``pretrain`` (the default) and ``math`` (``tailkd demo --task math``: supervised
distillation on seeded arithmetic word problems, ``data.format: prompt_completion``, losses on completions only).

    _setup_corpus_and_tokenizer   pretrain: the running Python's own documentation and standard-library sources;
                                  math: data/math_problems.py's problems as train/val jsonl; a byte-level BPE
                                  tokenizer trained on them (HF ``tokenizers``)
    _pretrain_teacher             a small random Llama trained with CLM (math: on the completions): itself a distill
                                  run (OUT/teacher)
    _train_students               students of equal size and budget (CLM only, vanilla KD, TAD K = 10, β = 2),
                                  each a distill run on the same teacher summaries (one cache)
    _task_accuracy                math only: ``tailkd eval``'s generation metrics of each student (greedy decoding
                                  of the val prompts: exact match on ``#### N``, ROUGE-L; the teacher's once)
    report                        OUT/report.md (side-by-side table), OUT/curves.png (validation loss vs step; math:
                                  and exact match per model); the students in HF format under OUT/students/<name>/student

Every stage is reused by a rerun with the same settings (``OUT/settings.json``). The corpus is tokenized once, for
every run; each run prints a progress line at each validation (``train.log_every`` = ``eval_every``) and the
validation's line: a few lines per run, the whole demo under a hundred.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from tailkd_ray.config import ConfigError, apply_overrides, build_dataclass, from_dict
from tailkd_ray.data.corpus import train_bpe_tokenizer, write_builtin_corpus
from tailkd_ray.data.math_problems import write_math_problems
from tailkd_ray.data.splits import Ingest, train_val_datasets
from tailkd_ray.models import llama_config, load_tokenizer, save_random_model
from tailkd_ray.pipelines.distill import distill
from tailkd_ray.pipelines.evaluate import evaluate_student
from tailkd_ray.runtime import init_ray
from tailkd_ray.train.runlog import read_records

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("val_loss", "val_ppl", "kl_to_teacher", "top1_agreement", "full_ece",
                  "tail_mass_student", "tail_mass_teacher")
TASK_COLUMNS = ("exact_match", "rouge_l")  # the math task's generation metrics, after METRIC_COLUMNS
STUDENT_ARCHITECTURE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads")  # the student.config overrides that size a demo student


@dataclass
class DemoSettings:
    """What ``tailkd demo`` builds; each field is a ``key=value`` override."""

    task: Literal["pretrain", "math"] = "pretrain"  # pretrain: built-in text; math: arithmetic word problems
    corpus_bytes: int = 1_500_000  # built-in text used (documentation first, then stdlib sources)
    vocab_size: int = 1024  # BPE vocabulary
    seq_len: int = 128  # tokens per training sequence
    teacher_layers: int = 4
    teacher_width: int = 128  # heads of 32 dims
    teacher_steps: int = 300  # CLM pretraining steps
    student_layers: int = 2
    student_width: int = 64  # heads of 32 dims
    student_steps: int = 200  # per student: the same budget for all
    batch_size: int = 8  # sequences per worker per step
    num_workers: int = 2  # Ray Train workers
    eval_every: int = 50  # steps between validation runs (the curves' resolution)
    students: dict = field(default_factory=lambda: {  # students to compare: name -> config overrides
        "clm": {"loss.kind": "clm"}, "kd": {"loss.kind": "kd"},
        "tad": {"loss.kind": "tad", "loss.k": 10, "loss.beta": 2.0}})
    seed: int = 0  # seed of everything
    problems: int = 4000  # math: training problems
    val_problems: int = 200  # math: validation problems (val loss, KL and the prompts decoded for exact match)
    max_new_tokens: int = 40  # math: tokens decoded per prompt at most (a worked answer takes ~10-25)


def demo_settings(overrides: list[str]) -> DemoSettings:
    """Demo settings with ``key=value`` overrides (e.g. ``student_steps=50``)."""
    return build_dataclass(DemoSettings, apply_overrides({}, overrides))


def run_demo(out_dir: str = "runs/demo", overrides: Optional[list[str]] = None) -> dict:
    """The whole demo; returns {student name: eval metrics}."""
    settings = demo_settings(list(overrides or []))
    out = Path(out_dir).absolute()  # Ray workers do not run in this directory
    _claim_output_dir(out, settings)
    started = time.time()
    init_ray()
    train_dir, val_dir, tokenizer = _setup_corpus_and_tokenizer(out, settings)
    base = _base_config(settings, train_dir, val_dir, tokenizer)
    ingest = train_val_datasets(from_dict(base))  # every run reads the same data and seed
    teacher = _pretrain_teacher(out, settings, base, ingest)
    results = _train_students(out, settings, base, teacher, ingest)
    teacher_accuracy = _task_accuracy(out, settings, base, teacher, results) if settings.task == "math" else None
    plot_curves({name: read_curve(out / "students" / name) for name in results}, out / "curves.png",
                exact_match=teacher_accuracy and {"teacher": teacher_accuracy["exact_match"],
                                                  **{name: m["exact_match"] for name, m in results.items()}})
    report = _write_report(out, settings, results, time.time() - started, teacher_accuracy)
    print(results_table(results))
    print(f"report: {report}\ncurves: {out / 'curves.png'}")
    return results


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


def _setup_corpus_and_tokenizer(out: Path, settings: DemoSettings) -> tuple[Path, Path, Path]:
    """Write the built-in corpus (pretrain) or problems (math) and train the tokenizer once (reused on later runs)."""
    corpus, tokenizer = out / "corpus", out / "tokenizer"
    if not (corpus / "done").exists():
        if settings.task == "math":
            write_math_problems(corpus, settings.problems, settings.val_problems, seed=settings.seed)
        else:
            write_builtin_corpus(corpus, max_bytes=settings.corpus_bytes)
        (corpus / "done").write_text(settings.task)
    if not (tokenizer / "tokenizer.json").exists():
        train_bpe_tokenizer(sorted((corpus / "train").glob("*.*")), settings.vocab_size, tokenizer)
    size = len(load_tokenizer(tokenizer))  # BPE stops early when the corpus has fewer merges to learn
    short = f" (vocab_size={settings.vocab_size} asked; the corpus gave no more)" if size < settings.vocab_size else ""
    log.info("built-in %s in %s (train/, val/), BPE tokenizer of %d tokens%s in %s",
             "math problems" if settings.task == "math" else "corpus", corpus, size, short, tokenizer)
    return corpus / "train", corpus / "val", tokenizer


def _base_config(settings: DemoSettings, train_dir: Path, val_dir: Path, tokenizer: Path) -> dict:
    """The config values every demo run shares."""
    data_format = {"format": "prompt_completion"} if settings.task == "math" else {"format": "text",
                                                                                    "text_document": "file"}
    return {
        "data": {"train": str(train_dir), "val": str(val_dir), **data_format, "tokenizer": str(tokenizer),
                 "seq_len": settings.seq_len},
        "train": {"num_workers": settings.num_workers, "strategy": "ddp", "batch_size": settings.batch_size,
                  "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 20, "eval_every": settings.eval_every,
                  "log_every": settings.eval_every, "checkpoint_every": 10_000, "seed": settings.seed},
        "summary": {"top_m": 64, "tail_samples": 16},
    }


def _llama(settings: DemoSettings, layers: int, width: int):
    """A demo Llama's config: heads of 32 dims, MLP 4 × width."""
    if width % 32:
        raise ConfigError(f"demo widths must be multiples of 32 (heads of 32 dims), got {width}")
    return llama_config(vocab=settings.vocab_size, layers=layers, width=width, heads=width // 32,
                        intermediate=4 * width, max_positions=settings.seq_len + 1)


def _pretrain_teacher(out: Path, settings: DemoSettings, base: dict, ingest: Ingest) -> Path:
    """A CLM-only distill run from a random Llama; the exported model becomes the teacher."""
    teacher_dir = out / "teacher"
    if (teacher_dir / "student" / "model.safetensors").exists():
        log.info("reusing the pretrained teacher in %s", teacher_dir / "student")
        return teacher_dir / "student"
    init_dir = save_random_model(_llama(settings, settings.teacher_layers, settings.teacher_width),
                                 out / "teacher_init", seed=settings.seed, tokenizer=base["data"]["tokenizer"])
    raw = copy.deepcopy(base)
    raw.update(output_dir=str(teacher_dir), student={"model": str(init_dir)}, loss={"kind": "clm"},
               summary={"top_m": None})
    raw["train"].update(max_steps=settings.teacher_steps, run_name="teacher")
    distill(from_dict(raw), ingest=ingest)
    return teacher_dir / "student"


def _train_students(out: Path, settings: DemoSettings, base: dict, teacher: Path, ingest: Ingest) -> dict[str, dict]:
    """One distill run per student of ``settings.students``, all on one summary cache (one teacher pass)."""
    architecture = _llama(settings, settings.student_layers, settings.student_width)
    sized = {key: getattr(architecture, key) for key in STUDENT_ARCHITECTURE}
    results = {}
    for name, student_overrides in settings.students.items():
        raw = copy.deepcopy(base)
        raw.update(output_dir=str(out / "students" / name), teacher={"model": str(teacher)},
                   student={"config": sized, "init": "random"})
        raw["summary"]["cache_dir"] = str(out / "summary_cache")
        raw["train"].update(max_steps=settings.student_steps, run_name=name)
        config = from_dict(apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in student_overrides.items()]))
        results[name] = distill(config, ingest=ingest)
    return results


def _task_accuracy(out: Path, settings: DemoSettings, base: dict, teacher: Path, results: dict[str, dict]) -> dict:
    """``tailkd eval``'s generation metrics on the val prompts: each student's exact match and ROUGE-L merged into
    ``results``; returns the teacher's (decoded once: OUT/teacher_generations.json)."""
    raw = copy.deepcopy(base)
    raw.update(output_dir=str(out), teacher={"model": str(teacher)},
               generation={"examples": settings.val_problems, "max_new_tokens": settings.max_new_tokens})
    config = from_dict(raw)
    teacher_metrics = {}
    for name, metrics in results.items():
        evaluated = evaluate_student(config, out / "students" / name / "student")
        metrics.update({key: evaluated[key] for key in TASK_COLUMNS})
        teacher_metrics = {key: evaluated[f"teacher_{key}"] for key in TASK_COLUMNS}
    return teacher_metrics


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def read_curve(run_dir: Path, key: str = "val_loss") -> list[tuple[int, float]]:
    """(step, value) pairs of the eval metric ``key`` from a run's metrics.jsonl."""
    return [(int(r["step"]), float(r[key])) for r in read_records(run_dir, "eval") if key in r]


def results_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per student, the eval metrics side by side (and the math task's generation metrics
    when the students have them)."""
    columns = METRIC_COLUMNS + tuple(c for c in TASK_COLUMNS if any(c in m for m in results.values()))
    header = "| student | " + " | ".join(columns) + " |"
    rows = [header, "|" + "---|" * (len(columns) + 1)]
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4g}" if isinstance(metrics.get(c), (int, float)) else "—" for c in columns]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path,
                exact_match: Optional[dict[str, float]] = None) -> Path:
    """Validation loss vs step, one line per student, as a PNG; with ``exact_match`` (model -> accuracy), a bar
    chart of it beside."""
    # Deferred: matplotlib takes ~1 s to import and only this last step needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10 if exact_match else 6, 4))
    FigureCanvasAgg(fig)
    ax, *accuracy_ax = fig.subplots(1, 2 if exact_match else 1, squeeze=False)[0]
    for name, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("tailkd demo: students of equal size and budget")
    ax.legend()
    if exact_match:
        names = list(exact_match)
        accuracy_ax[0].bar(names, [100 * exact_match[n] for n in names])
        accuracy_ax[0].set_ylabel("exact match on #### N (%)")
        accuracy_ax[0].set_title("greedy answers to the val prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _write_report(out: Path, settings: DemoSettings, results: dict[str, dict], seconds: float,
                  teacher_accuracy: Optional[dict] = None) -> Path:
    table = results_table(results)
    if settings.task == "math":
        data = (f"Arithmetic word problems ({settings.problems:,} train, {settings.val_problems} val, seed "
                f"{settings.seed}; losses and token metrics on the completions only)")
        higher_better = "top1_agreement, exact_match and rouge_l"
        reference = (f"Teacher (the reference line): exact match {teacher_accuracy['exact_match']:.4g}, ROUGE-L "
                     f"{teacher_accuracy['rouge_l']:.4g}; greedy decoding of the {settings.val_problems} val prompts, "
                     f"at most {settings.max_new_tokens} new tokens, the answer after `####` compared.\n\n")
    else:
        data = f"Built-in corpus ({settings.corpus_bytes:,} bytes of Python docs and stdlib sources)"
        higher_better, reference = "top1_agreement", ""
    text = (f"# tailkd demo report\n\n{data}, BPE vocabulary {settings.vocab_size}, sequences of {settings.seq_len} "
            f"tokens.\nTeacher: {settings.teacher_layers} layers × {settings.teacher_width} wide, "
            f"{settings.teacher_steps} CLM steps. Students: {settings.student_layers} layers × "
            f"{settings.student_width} wide, {settings.student_steps} steps each, {settings.num_workers} workers × "
            f"{settings.batch_size} sequences.\n\n"
            f"Held-out metrics (validation split; lower is better except {higher_better}):\n\n{table}\n{reference}"
            f"![validation loss](curves.png)\n\nWall time: {seconds:.0f} s.\n")
    path = out / "report.md"
    path.write_text(text)
    return path
