"""``tailkd eval``: any Hugging Face student against the co-located teacher (exact KL) on the held-out data, its
task accuracy on prompts and lm-evaluation-harness tasks (DESIGN §7), in this process.

    _setup_models        the student and the teacher, on the GPU if there is one
    _token_metrics       the metrics of core.metrics on the val blocks (data.val, else the held-out share of
                         data.train)
    _generation_metrics  greedy completions of generation.data's prompts by the student (and the teacher, once per
                         teacher, prompts and settings: OUT/teacher_generations.json): core.generation's exact match
                         and ROUGE-L; every completion in <student>_generations.jsonl
    _lm_eval_results     EleutherAI's lm-evaluation-harness on the student's directory, for lm_eval.tasks
    evaluate_student     all of them -> <student>_eval.json beside the student

The metrics go beside the student evaluated (``runs/x/student`` -> ``runs/x/student_eval.json``), never to
``output_dir/eval.json``: pointed at a run's output_dir, an evaluation would otherwise overwrite that run's own
(summary-based) record of its last validation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from tailkd_ray.config import Config
from tailkd_ray.core.generation import greedy_decode, score_example, summarize_scores
from tailkd_ray.core.metrics import evaluate
from tailkd_ray.data.prompts import PromptSet, read_prompts
from tailkd_ray.data.samples import end_of_turn_ids
from tailkd_ray.data.splits import Corpora, data_tokenizer, validation_dataset, with_in_memory_data
from tailkd_ray.errors import ConfigError, DataError
from tailkd_ray.models import StudentWithHead, load_model, load_teacher, shared_vocab_size, teacher_logits
from tailkd_ray.runtime import init_ray
from tailkd_ray.teacher.cache import teacher_identity
from tailkd_ray.train.runlog import write_eval_json

log = logging.getLogger(__name__)

TEACHER_GENERATIONS = "teacher_generations.json"  # in output_dir: the teacher's completions, reused
_GENERATIONS_VERSION = 2  # bump when what decides the teacher's completions changes


def evaluate_student(cfg: Config, student_path: Union[str, Path], *, train_data: Any = None,
                     val_data: Any = None) -> dict:
    """Evaluate the student at ``student_path``; writes ``<student_path>_eval.json`` (``student_eval_path``) and
    returns the metrics, with ``eval_json``: where they were written. ``train_data`` / ``val_data``: a Hugging Face
    ``datasets.Dataset`` in place of data.train / data.val (``with_in_memory_data``), for the token metrics and, in
    a supervised format with generation.data null, the prompts."""
    cfg, corpora = with_in_memory_data(cfg, train_data, val_data)
    init_ray()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, teacher = _setup_models(cfg, student_path, device)
    token_data = cfg.data.val is not None or cfg.data.train is not None
    prompts = cfg.generation.records(cfg.data)
    if not token_data and prompts is None and not cfg.lm_eval.tasks:
        raise DataError("nothing to evaluate: set data.val (or data.train with data.val_fraction > 0) for the token "
                        "metrics, generation.data for task accuracy, or lm_eval.tasks")
    metrics = {"student": str(student_path)}
    if token_data:
        metrics.update(_token_metrics(cfg, corpora, student, teacher, device))
    if prompts is not None:
        metrics.update(_generation_metrics(cfg, prompts, corpora, student_path, student, teacher))
    if cfg.lm_eval.tasks:
        metrics["lm_eval"] = _lm_eval_results(cfg, student_path, device)
    target = student_eval_path(student_path)
    log.info("eval of %s written to %s", student_path, write_eval_json(metrics, target.parent, target.name))
    return {**metrics, "eval_json": str(target)}


def student_eval_path(student_path: Union[str, Path]) -> Path:
    """Where ``tailkd eval`` writes a student's metrics: beside its directory, ``<name>_eval.json``."""
    student = Path(student_path).absolute()
    return student.parent / f"{student.name}_eval.json"


def student_generations_path(student_path: Union[str, Path]) -> Path:
    """Where ``tailkd eval`` writes every prompt's completions: beside the student, ``<name>_generations.jsonl``."""
    student = Path(student_path).absolute()
    return student.parent / f"{student.name}_generations.jsonl"


def _setup_models(cfg: Config, student_path: Union[str, Path], device: str):
    """(student, teacher), both frozen Hugging Face causal LMs."""
    student = load_model(student_path, trust_remote_code=cfg.student.trust_remote_code, device=device)
    return student, load_teacher(cfg.teacher, device=device)


def _token_metrics(cfg: Config, corpora: Corpora, student, teacher, device: str) -> dict:
    """core.metrics on the val blocks, the student run chunk by chunk from its hidden states."""
    val_ds = validation_dataset(cfg, corpora)
    if val_ds is None:
        raise DataError("no validation data: set data.val, or data.val_fraction > 0 to hold out part of data.train")
    student = StudentWithHead(student)
    shared_vocab, student_rows = shared_vocab_size(cfg), student.head.weight.shape[0]
    metrics = evaluate(student, val_ds.iter_torch_batches(batch_size=cfg.train.batch_size),
                       teacher=lambda ids, positions: teacher_logits(teacher, ids, positions, shared_vocab=shared_vocab,
                                                                     student_rows=student_rows),
                       k=cfg.loss.k, chunk_tokens=cfg.loss.chunk_tokens, device=device)
    return {**metrics, "kl_source": "exact"}


def _generation_metrics(cfg: Config, records: str, corpora: Corpora, student_path: Union[str, Path], student,
                        teacher) -> dict:
    """``exact_match``, ``rouge_l`` (and ``teacher_exact_match``, ``teacher_rouge_l``) on the prompts of ``records``
    (``GenerationConfig.records``), with ``generation``: the counts behind them, the records skipped and where the
    completions went."""
    gen = cfg.generation
    tokenizer = data_tokenizer(cfg)
    prompts = read_prompts(records, tokenizer, cfg.data, limit=gen.examples, corpora=corpora)
    skipped = ", ".join(f"{n} {reason} (first: {prompts.first_skipped[reason]})"
                        for reason, n in prompts.skipped.items()) or "none"
    if not prompts.references:
        raise DataError(f"generation records {records} hold no usable one (skipped: {skipped}); check generation.data "
                        f"(null: data.val)")
    log.info("generation: %d prompts of %s (skipped: %s), greedy, at most %d new tokens", len(prompts.references),
             records, skipped, gen.max_new_tokens)
    pattern = re.compile(gen.answer_regex)
    student_run = _scored_completions(student, "student", prompts, tokenizer, cfg, pattern)
    runs = {"student": student_run}
    if gen.teacher:
        runs["teacher"] = _teacher_completions(cfg, teacher, prompts, tokenizer, pattern)
    generations = student_generations_path(student_path)
    _write_generations(generations, prompts, runs)
    metrics = {}
    for name, run in runs.items():
        prefix = "" if name == "student" else "teacher_"
        metrics.update({f"{prefix}exact_match": run["summary"]["exact_match"],
                        f"{prefix}rouge_l": run["summary"]["rouge_l"]})
    metrics["generation"] = {**{name: run["summary"] for name, run in runs.items()},
                             "skipped": dict(prompts.skipped), "first_skipped": prompts.first_skipped,
                             "max_new_tokens": gen.max_new_tokens, "answer_regex": gen.answer_regex,
                             "generations": str(generations)}
    return metrics


def _scored_completions(model, name: str, prompts: PromptSet, tokenizer, cfg: Config, pattern: re.Pattern) -> dict:
    """{completions (texts), scores (per example), summary} of ``model``'s greedy completions of ``prompts``."""
    gen = cfg.generation
    stops = stop_ids(model, tokenizer, cfg.data.format)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    progress = _Progress(name, len(prompts.prompt_ids), gen.log_every)
    completions = greedy_decode(model, prompts.prompt_ids, max_new_tokens=gen.max_new_tokens, eos_ids=stops,
                                pad_id=pad, batch_size=gen.batch_size, on_batch=progress)
    texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in completions]
    scores = [score_example(text, reference, pattern) for text, reference in zip(texts, prompts.references)]
    summary = summarize_scores(scores, completions)
    log.info("generation (%s): exact match %s over %d answers (%d without one), ROUGE-L %.4f, %d cut at "
             "max_new_tokens", name, _percent(summary["exact_match"]), summary["with_answer"], summary["no_answer"],
             summary["rouge_l"], summary["hit_max_new_tokens"])
    return {"completions": texts, "scores": scores, "summary": summary}


def stop_ids(model, tokenizer, data_format: str) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, the model's generation_config eos_token_id (an
    instruct model's end-of-turn tokens) and, for chat data, the chat template's end of turn (an exported student
    or a base tokenizer often names neither)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    turn_end = end_of_turn_ids(tokenizer) if data_format == "chat" else []
    return sorted({i for i in [tokenizer.eos_token_id, *configured, *turn_end] if i is not None})


def _teacher_completions(cfg: Config, teacher, prompts: PromptSet, tokenizer, pattern: re.Pattern) -> dict:
    """The teacher's ``_scored_completions``, read from OUT/teacher_generations.json when that file was written for
    this teacher (weights), these prompts (ids and references) and these settings; else decoded and written there."""
    identity = {"version": _GENERATIONS_VERSION, "teacher": teacher_identity(cfg.teacher.model),
                "prompts_sha256": hashlib.sha256(json.dumps([prompts.prompt_ids, prompts.references]).encode())
                .hexdigest(), "max_new_tokens": cfg.generation.max_new_tokens,
                "answer_regex": cfg.generation.answer_regex}
    path = Path(cfg.output_dir) / TEACHER_GENERATIONS
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("identity") == identity:
            log.info("generation (teacher): reusing %s", path)
            return stored["run"]
    run = _scored_completions(teacher, "teacher", prompts, tokenizer, cfg, pattern)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps({"identity": identity, "run": run}) + "\n")
    os.replace(partial, path)  # atomic: a reader sees the old file or the whole new one
    return run


def _write_generations(path: Path, prompts: PromptSet, runs: dict) -> None:
    """One JSON line per prompt: where it came from, the prompt, the reference, each model's completion and
    scores."""
    with path.open("w") as f:
        for i, (source, prompt, reference) in enumerate(zip(prompts.sources, prompts.prompts, prompts.references)):
            line = {"source": source, "prompt": prompt, "reference": reference}
            for name, run in runs.items():
                line[name] = {"completion": run["completions"][i], **run["scores"][i]}
            f.write(json.dumps(line) + "\n")


def _lm_eval_results(cfg: Config, student_path: Union[str, Path], device: str) -> dict:
    """Task -> its metrics (``name,filter`` keys, as the harness reports them) from ``lm_eval.simple_evaluate`` on the
    student's directory; a task the harness does not know is a ConfigError naming it."""
    import lm_eval  # deferred: an optional extra, slow to import, needed by this path only
    from lm_eval.tasks import TaskManager

    settings = cfg.lm_eval
    # Indexing the harness's own ~14,700 task YAMLs takes a minute: skipped when include_path holds every task.
    tasks = TaskManager(include_path=settings.include_path, include_defaults=False) if settings.include_path else None
    if tasks is None or any(task not in tasks.all_tasks for task in settings.tasks):
        tasks = TaskManager(include_path=settings.include_path)
    unknown = [task for task in settings.tasks if task not in tasks.all_tasks]
    if unknown:
        where = f" nor in lm_eval.include_path {settings.include_path}" if settings.include_path else ""
        raise ConfigError(f"lm_eval.tasks: {', '.join(unknown)} is not a task of the harness{where}; "
                          f"`lm-eval ls tasks` lists them, or set lm_eval.include_path to a directory of task YAMLs")
    log.info("lm-eval: %s on %s", ", ".join(settings.tasks), student_path)
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(student_path), "dtype": "float32",
                                "trust_remote_code": cfg.student.trust_remote_code},
        tasks=list(settings.tasks), task_manager=tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
        batch_size=settings.batch_size, device=device, log_samples=False)
    return results["results"]


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


class _Progress:
    """``greedy_decode``'s ``on_batch``: a line every ``every`` examples (and at the end) with the rate and ETA."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, every
        self.done, self.start = 0, time.monotonic()

    def __call__(self, finished: int) -> None:
        before, self.done = self.done, self.done + finished
        if self.done // self.every == before // self.every and self.done < self.total:
            return
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        log.info("generation (%s): %d/%d examples, %.2f examples/s, ETA %.0f s", self.name, self.done, self.total,
                 rate, (self.total - self.done) / rate)
