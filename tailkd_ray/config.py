"""Typed configuration: one dataclass per YAML section, every field documented and validated early.

A config file is YAML with the sections below; any field can be overridden on the command line with a
dotted ``section.key=value`` (the value is parsed as YAML, so ``loss.beta=2``, ``tune.k=[5,10]`` and
``summary.cache_dir=null`` all work). Unknown keys and bad values raise ``ConfigError`` naming the key and
what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from tailkd_ray.errors import ConfigError  # re-exported: callers import it from here too

log = logging.getLogger(__name__)


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a documentation string (used for errors and the generated reference)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _positive(section: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name} must be {bound}, got {value!r}")


@dataclass
class TeacherConfig:
    model: Optional[str] = doc(None, "Teacher: any AutoModelForCausalLM path or hub id (local files only here).")
    batch_size: int = doc(8, "Packed sequences per teacher forward pass (unless teacher.tokens_per_batch is set).")
    tokens_per_batch: Optional[int] = doc(
        None, "Teacher batch size in tokens: each forward pass scores tokens_per_batch // data.seq_len packed "
              "sequences, so one setting fits the teacher's memory whatever data.seq_len (must be >= "
              "data.seq_len). null = teacher.batch_size sequences.")
    min_actors: int = doc(1, "Minimum size of the teacher actor pool.")
    max_actors: int = doc(1, "Maximum size of the teacher actor pool (autoscales between min and max).")
    num_gpus: float = doc(0.0, "GPUs per teacher actor (0 = CPU).")
    resources: dict = doc({}, "Custom Ray resources per teacher actor, e.g. {tailkd_inference: 1}, to pin "
                              "actors to inference nodes.")
    trust_remote_code: bool = doc(False, "Allow the teacher repo's own Python code. Off: only enable for code you trust.")

    def validate(self) -> None:
        for name in ("batch_size", "min_actors", "max_actors"):
            _positive("teacher", name, getattr(self, name))
        if self.tokens_per_batch is not None:
            _positive("teacher", "tokens_per_batch", self.tokens_per_batch)
        _positive("teacher", "num_gpus", self.num_gpus, allow_zero=True)
        if self.max_actors < self.min_actors:
            raise ConfigError(f"teacher.max_actors ({self.max_actors}) must be >= teacher.min_actors "
                              f"({self.min_actors})")
        _check_resources("teacher.resources", self.resources)

    def sequences_per_batch(self, seq_len: int) -> int:
        """Packed sequences per teacher forward pass: tokens_per_batch // seq_len when set, else batch_size."""
        return self.batch_size if self.tokens_per_batch is None else self.tokens_per_batch // seq_len


@dataclass
class StudentConfig:
    model: Optional[str] = doc(None, "Student: an AutoModelForCausalLM path. Leave null to derive the "
                                     "student from the teacher's config with `student.config` overrides.")
    config: dict = doc({}, "HF config overrides applied to the teacher's config, e.g. {num_hidden_layers: 4}.")
    init: Literal["random", "truncate"] = doc(
        "random", "`random` initialisation, or `truncate`: teacher weights truncated to the student's dims "
                  "and first layers (as in the paper).")
    trust_remote_code: bool = doc(False, "Allow the `student.model` repo's own Python code (a student derived from "
                                         "the teacher's config follows teacher.trust_remote_code).")

    def validate(self) -> None:
        if self.model is not None and self.config:
            raise ConfigError("set either student.model or student.config, not both")


SUPERVISED_FORMATS = ("chat", "prompt_completion")  # samples with a prompt and a completion


@dataclass
class DataConfig:
    train: Optional[str] = doc(None, "Training corpus: a path, directory or glob (any pyarrow filesystem URI). "
                                     "Null when a datasets.Dataset is passed as train_data (Python API).")
    val: Optional[str] = doc(None, "Validation corpus (or a datasets.Dataset as val_data, Python API); null = hold "
                                   "out `data.val_fraction` of the train blocks.")
    format: Literal["text", "jsonl", "parquet", "tokens", "chat", "prompt_completion"] = doc(
        "text", "`text` files, `jsonl` / `parquet` with a text column, `tokens` (pre-tokenized ids), `chat` (jsonl or "
                "parquet with a `messages` column: lists of {role, content}, rendered with the data tokenizer's chat "
                "template) or `prompt_completion` (jsonl or parquet with `prompt` and `completion` text columns).")
    train_on: Optional[Literal["completion", "all"]] = doc(
        None, "Which tokens of a `chat` / `prompt_completion` sample the losses and metrics cover: `completion` (the "
              "assistant turns, or the completion and the EOS after it) or `all`. null = completion for those "
              "formats, all for the others (which have no completion).")
    text_document: Literal["line", "file"] = doc(
        "file", "For `text`: is a document one line or one whole file?")
    text_column: str = doc("text", "Text column of jsonl / parquet corpora.")
    tokens_column: str = doc("input_ids", "Token-id list column of `tokens` corpora (parquet or jsonl).")
    tokenizer: Optional[str] = doc(None, "Tokenizer path; null = the teacher's.")
    add_bos: Optional[bool] = doc(None, "Start every document with the tokenizer's BOS token (each is followed by "
                                        "EOS either way). null = what the tokenizer does with add_special_tokens=True "
                                        "(Llama 3: BOS; Qwen2.5, GPT-2: none); `tokens` corpora are kept as given "
                                        "unless this is true.")
    seq_len: int = doc(512, "Tokens per training sequence (blocks are packed with seq_len + 1 tokens).")
    packing: bool = doc(True, "Pack documents into blocks of seq_len + 1 tokens, several per block. Text formats: one "
                              "after the other (a document may span blocks; attention is causal over the whole "
                              "block). chat / prompt_completion: whole samples, a sample that does not fit starting "
                              "the next block (the rest padded, masked), position ids restarting at each sample so "
                              "that attention stays within it (transformers' packed-sequence mask). false: one sample "
                              "per block, right-padded, the padding masked out of losses and metrics (more padding "
                              "to compute).")
    overlong: Literal["truncate", "drop"] = doc(
        "truncate", "A sample longer than seq_len + 1 tokens (BOS and EOS included) that must fit in one block "
                    "(chat / prompt_completion, or data.packing false) is cut to its first seq_len + 1 (`truncate`) "
                    "or skipped (`drop`); both counted in data_report.json (truncated, skipped.overlong).")
    val_fraction: float = doc(0.02, "Fraction of packed blocks held out when `data.val` is null.")
    tokenizer_actors: int = doc(4, "Maximum tokenizer actors (1 CPU each); the pool autoscales from 1.")
    shuffle: bool = doc(True, "Shuffle the training blocks: one permutation seeded by train.seed on the driver, "
                              "before the teacher (a summary cache holds its rows in that order), then each epoch a "
                              "local shuffle buffer of train.shuffle_buffer rows per worker seeded by (train.seed, "
                              "epoch, rank). false = corpus order (sorted files) every epoch. Validation data is "
                              "never shuffled.")

    def validate(self) -> None:
        _positive("data", "seq_len", self.seq_len)
        _positive("data", "tokenizer_actors", self.tokenizer_actors)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.train_on == "completion" and self.format not in SUPERVISED_FORMATS:
            raise ConfigError(f"data.train_on = completion needs data.format chat or prompt_completion (a {self.format} "
                              f"corpus has no completion): set data.train_on to all or null")

    def completion_mask(self) -> bool:
        """Whether the losses and metrics cover the completion tokens only."""
        return self.format in SUPERVISED_FORMATS and self.train_on != "all"

    def whole_samples(self) -> bool:
        """Whether every sample lies whole in one block, padded (DESIGN §1): supervised samples, or no packing. Such
        blocks carry a ``loss_mask`` (the padding, and with train_on: completion the prompts, masked)."""
        return self.format in SUPERVISED_FORMATS or not self.packing


@dataclass
class SummaryConfig:
    top_m: Optional[int] = doc(64, "Teacher top-M ids/log-probs kept per token. null = co-located teacher "
                                    "in each training worker, exact loss on full logits.")
    tail_samples: int = doc(16, "S far-tail ids sampled per token from the teacher beyond the top M "
                                "(unbiased tail estimate; 0 drops the far-tail KL term).")
    cache_dir: Optional[str] = doc(None, "Parquet summary cache directory; null = stream summaries straight "
                                         "into training, no disk.")
    logp_dtype: Literal["float16", "float32"] = doc("float16", "Storage dtype of the teacher log-probs.")

    def validate(self) -> None:
        if self.top_m is not None:
            _positive("summary", "top_m", self.top_m)
        _positive("summary", "tail_samples", self.tail_samples, allow_zero=True)


@dataclass
class LossConfig:
    kind: Literal["tad", "kd", "rkl", "topk", "clm"] = doc(
        "tad", "Divergence: `tad` (tail-aware), `kd` (forward KL), `rkl` (reverse KL), `topk` (top-K "
               "renormalised KL, tail dropped) or `clm` (no teacher term).")
    k: int = doc(10, "K: teacher top-K set of TAD and `topk` (must be <= summary.top_m).")
    beta: float = doc(1.0, "β: weight of TAD's tail term (>= 0; 0 = top-K + residual bucket only).")
    normalize: bool = doc(True, "Sequence-normalised β(X) = β / mean tail mass (the paper's final loss). "
                                "false = two-term form, where β = 1 is forward KL.")
    temperature: float = doc(1.0, "τ applied to both teacher and student logits (no τ² rescaling).")
    weight: float = doc(1.0, "λ: objective = CLM + λ · divergence.")
    chunk_tokens: int = doc(512, "Tokens per loss chunk: peak loss memory is O(chunk_tokens × vocab), about 8 "
                                 "float32 [chunk, V] tensors.")

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"loss.k must be >= 1, got {self.k!r}")
        _positive("loss", "beta", self.beta, allow_zero=True)
        _positive("loss", "temperature", self.temperature)
        _positive("loss", "weight", self.weight, allow_zero=True)
        _positive("loss", "chunk_tokens", self.chunk_tokens)


@dataclass
class TrainConfig:
    num_workers: int = doc(2, "Ray Train workers (one per GPU on a GPU cluster).")
    use_gpu: bool = doc(False, "Train on GPUs.")
    strategy: Literal["fsdp", "ddp", "deepspeed"] = doc(
        "fsdp", "FSDP2, DDP or DeepSpeed ZeRO-3. With use_gpu, FSDP2 computes in bf16 parameters and reduce-scatters "
                "gradients in float32 (MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)) while "
                "AdamW updates the float32 shards; DeepSpeed runs its bf16 mode; DDP and CPU runs stay float32. "
                "AdamW is fused where torch has the kernel for the device (CUDA, CPU), else foreach.")
    max_steps: int = doc(100, "Optimizer steps.")
    batch_size: int = doc(8, "Sequences per worker per micro-step.")
    grad_accum: int = doc(1, "Micro-steps accumulated per optimizer step.")
    lr: float = doc(1e-4, "Peak AdamW learning rate (paper default 1e-4).")
    weight_decay: float = doc(0.1, "AdamW weight decay (paper default 0.1).")
    warmup_steps: int = doc(10, "Linear warmup steps at the start of the learning-rate schedule.")
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = doc(
        "cosine", "Learning rate after the warmup (transformers' schedules): `cosine` decay to min_lr_ratio · lr at "
                  "max_steps, `linear` decay to it, `constant`, or `wsd` (warmup-stable-decay: constant, then a "
                  "cosine decay to min_lr_ratio · lr over the last wsd_decay_fraction of max_steps). The schedule "
                  "can change which loss wins (README).")
    min_lr_ratio: float = doc(0.0, "Final learning rate as a fraction of train.lr, in [0, 1] (cosine, linear, wsd; "
                                   "0 with constant).")
    wsd_decay_fraction: float = doc(0.1, "wsd: fraction of train.max_steps spent in the final decay, in (0, 1]; "
                                         "warmup_steps plus the decay must fit in max_steps.")
    grad_clip: float = doc(1.0, "Gradient-norm clip (0 = off).")
    checkpoint_every: int = doc(50, "Steps between distributed checkpoints (at most this much work is lost).")
    eval_every: int = doc(50, "Steps between validation runs.")
    max_failures: int = doc(0, "Worker-group restarts allowed before the run fails.")
    max_nonfinite_steps: int = doc(0, "Optimizer steps whose loss or gradient norm is NaN/inf that may be skipped "
                                      "(no update; each logged in metrics.jsonl as kind nonfinite) before the run "
                                      "stops. 0: the first one stops the run. fsdp and ddp only.")
    activation_checkpointing: bool = doc(False, "Recompute each decoder block's activations in backward instead of "
                                                "keeping them (non-reentrant checkpoint per block, applied before "
                                                "FSDP2 shards it; every strategy): less activation memory for about "
                                                "one more forward of the blocks per step.")
    compile: bool = doc(False, "torch.compile each decoder block on its own (regional compilation, after "
                               "activation checkpointing, before FSDP2 sharding); fsdp and ddp only. Off until "
                               "measured faster on GPU; the first steps pay the compilation.")
    seed: int = doc(0, "Seed of model init, data order and tail sampling.")
    run_name: str = doc("distill", "Ray Train run name; relaunching with the same name resumes.")
    resources_per_worker: dict = doc({}, "Custom Ray resources per trainer worker, e.g. {tailkd_training: 1}.")
    log_every: int = doc(0, "Steps between the progress lines rank 0 prints (step, losses, tokens/s, data wait, "
                            "ETA; `ray job logs` shows them). 0: max_steps // 20, about 20 lines per run.")
    loggers: list = doc(["tensorboard"], "Experiment trackers rank 0 feeds with every record's numbers, the resolved "
                                         "config and the final eval: any of tensorboard (OUT/tensorboard), wandb "
                                         "(offline under OUT/wandb unless WANDB_MODE is set), mlflow "
                                         "(MLFLOW_TRACKING_URI, else the file store OUT/mlruns). [] = none.")
    prefetch_batches: int = doc(1, "Micro-batches each worker's Ray Data iterator prepares ahead of the step "
                                   "(0 = none). Raising it can help when metrics.jsonl shows data_wait_s > 0, but "
                                   "workers then request blocks out of step, so which worker trains on which block "
                                   "(and a resume's skipped rows) varies more between runs.")
    shuffle_buffer: int = doc(128, "Rows in each worker's local shuffle buffer, reseeded every epoch so that epochs "
                                   "differ (with data.shuffle). Memory: that many rows, summaries included "
                                   "(~250 KB a row at seq_len 512, top_m 64, tail_samples 16).")

    def validate(self) -> None:
        for name in ("num_workers", "max_steps", "batch_size", "grad_accum", "checkpoint_every", "eval_every",
                     "shuffle_buffer"):
            _positive("train", name, getattr(self, name))
        for name in ("lr", "weight_decay", "warmup_steps", "grad_clip", "max_failures", "prefetch_batches",
                     "max_nonfinite_steps", "log_every"):
            _positive("train", name, getattr(self, name), allow_zero=name != "lr")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1] (a fraction of train.lr), got {self.min_lr_ratio!r}")
        if self.lr_schedule == "constant" and self.min_lr_ratio:
            raise ConfigError(f"train.min_lr_ratio = {self.min_lr_ratio} has no effect with train.lr_schedule = constant "
                              f"(the learning rate stays train.lr): set it to 0 or pick cosine, linear or wsd")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(f"train.wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction!r}")
        if self.lr_schedule == "wsd" and self.warmup_steps + self.wsd_decay_steps() > self.max_steps:
            raise ConfigError(f"train.lr_schedule = wsd: train.warmup_steps ({self.warmup_steps}) plus the decay "
                              f"({self.wsd_decay_steps()} steps: wsd_decay_fraction {self.wsd_decay_fraction} of "
                              f"max_steps {self.max_steps}) exceed train.max_steps; lower one of them")
        if self.max_nonfinite_steps and self.strategy == "deepspeed":
            raise ConfigError("train.max_nonfinite_steps needs train.strategy fsdp or ddp: DeepSpeed applies its "
                              "optimizer step inside backward, before the step could be skipped")
        if self.compile and self.strategy == "deepspeed":
            raise ConfigError("train.compile needs train.strategy fsdp or ddp: ZeRO-3 gathers each layer's "
                              "parameters in hooks inside the blocks, which a compiled block would trace")
        _check_resources("train.resources_per_worker", self.resources_per_worker)
        _check_loggers(self.loggers)

    def wsd_decay_steps(self) -> int:
        """Steps of the wsd schedule's final decay (at least 1)."""
        return max(1, round(self.wsd_decay_fraction * self.max_steps))


# Validation metrics a K/β search can minimise: comparable across K (tail masses are not) and lower = better.
TUNE_METRICS = ("val_loss", "val_ppl", "kl_to_teacher", "full_ece")


@dataclass
class TuneConfig:
    k: list = doc([5, 10, 20], "K values to search (each <= summary.top_m); `random` search draws integers "
                               "between their min and max.")
    beta: list = doc([0.5, 1.0, 2.0], "β values to search; `random` search draws log-uniformly between their "
                                      "min and max (> 0).")
    max_concurrent: int = doc(1, "Trials running at once (lowered to what the cluster fits, see tailkd_ray/pipelines/tune.py).")
    metric: str = doc("val_loss", f"Validation metric the search minimises: one of {', '.join(TUNE_METRICS)}.")
    search: Literal["grid", "random"] = doc("grid", "`grid`: every (K, β) pair of tune.k × tune.beta once; "
                                                    "`random`: tune.num_samples draws from their ranges.")
    num_samples: int = doc(8, "Trials drawn by the `random` search (unused by `grid`).")
    asha: bool = doc(True, "ASHA early stopping on tune.metric, judged at every validation (train.eval_every).")
    grace_period: Optional[int] = doc(None, "ASHA: optimizer steps every trial trains before it can be stopped; "
                                            "null = train.eval_every (the first validation).")
    reduction_factor: float = doc(3.0, "ASHA: at each rung only the best 1/reduction_factor of trials go on (> 1).")

    def validate(self) -> None:
        if not self.k or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.k):
            raise ConfigError(f"tune.k must be a non-empty list of integers >= 1, got {self.k!r}")
        if not self.beta or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in self.beta):
            raise ConfigError(f"tune.beta must be a non-empty list of finite numbers >= 0, got {self.beta!r}")
        _positive("tune", "max_concurrent", self.max_concurrent)
        if self.metric not in TUNE_METRICS:
            raise ConfigError(f"tune.metric must be one of {', '.join(TUNE_METRICS)} (minimised, comparable "
                              f"across K), got {self.metric!r}")
        if self.search == "random" and min(self.beta) <= 0:
            raise ConfigError(f"tune.search = random draws β log-uniformly: every tune.beta must be > 0, got "
                              f"{self.beta!r} (use search: grid to include β = 0)")
        _positive("tune", "num_samples", self.num_samples)
        if self.grace_period is not None:
            _positive("tune", "grace_period", self.grace_period)
        if self.reduction_factor <= 1:
            raise ConfigError(f"tune.reduction_factor must be > 1, got {self.reduction_factor!r}")


@dataclass
class GenerationConfig:
    data: Optional[str] = doc(None, "Records `tailkd eval` decodes for task accuracy: jsonl or parquet with `prompt` "
                                    "and `completion` (the reference), or `messages` (a chat: the prompt is the chat "
                                    "template over the turns before the last assistant turn, the reference that "
                                    "turn). null = data.val when data.format is chat or prompt_completion, else no "
                                    "generation metrics.")
    examples: int = doc(200, "Records decoded: the first N usable ones, in file order (malformed ones are skipped "
                             "and counted).")
    max_new_tokens: int = doc(256, "Tokens generated per prompt at most; greedy decoding stops earlier at an EOS "
                                   "(the tokenizer's, the model's generation_config eos_token_id, or with data.format "
                                   "chat the chat template's end-of-turn token).")
    batch_size: int = doc(8, "Prompts decoded together (left-padded; longest prompts first).")
    answer_regex: str = doc(r"####\s*(-?[\d,]*\.?\d+)",
                            "Final answer for exact match: the first match in the reference and in the generated "
                            "text (its group 1, or the whole match without a group), compared after removing "
                            "whitespace and thousands commas and writing numbers in their plain form (1,000.50 = "
                            "1000.5). The default reads GSM8K's `#### N`.")
    teacher: bool = doc(True, "Decode the teacher too, as the reference line (teacher_exact_match, teacher_rouge_l; "
                              "reused from OUT/teacher_generations.json while teacher, prompts and these settings "
                              "are the same).")
    log_every: int = doc(50, "Examples between progress lines (done / total, examples/s, ETA).")

    def records(self, data: DataConfig) -> Optional[str]:
        """The records decoded: generation.data, else the val corpus of a supervised format (else none)."""
        return self.data or (data.val if data.format in SUPERVISED_FORMATS else None)

    def validate(self) -> None:
        for name in ("examples", "max_new_tokens", "batch_size", "log_every"):
            _positive("generation", name, getattr(self, name))
        try:
            re.compile(self.answer_regex)
        except re.error as error:
            raise ConfigError(f"generation.answer_regex {self.answer_regex!r} is not a valid regular expression: "
                              f"{error}") from None


@dataclass
class LmEvalConfig:
    tasks: list = doc([], "EleutherAI lm-evaluation-harness tasks `tailkd eval` runs on the student (its `hf` model, "
                          "float32, on the GPU if there is one), e.g. [gsm8k, hellaswag]; also `tailkd eval --lm-eval "
                          "gsm8k,hellaswag`. [] = none. Needs `pip install 'tailkd-ray[lm-eval]'`.")
    include_path: Optional[str] = doc(None, "A directory of your own task YAMLs (found beside the harness's own), "
                                            "e.g. a task over a local jsonl, which runs offline.")
    num_fewshot: Optional[int] = doc(None, "Few-shot examples per prompt; null = each task's own setting.")
    limit: Optional[int] = doc(None, "Examples per task at most; null = all.")
    batch_size: int = doc(8, "Requests per forward pass of the harness.")

    def validate(self) -> None:
        if not all(isinstance(t, str) and t for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"lm_eval.tasks must be a list of distinct task names, got {self.tasks!r}")
        if self.tasks and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("lm_eval.tasks needs EleutherAI's lm-evaluation-harness, which is not installed: "
                              "pip install 'tailkd-ray[lm-eval]'")
        if self.num_fewshot is not None:
            _positive("lm_eval", "num_fewshot", self.num_fewshot, allow_zero=True)
        if self.limit is not None:
            _positive("lm_eval", "limit", self.limit)
        _positive("lm_eval", "batch_size", self.batch_size)


@dataclass
class ExportConfig:
    dtype: Literal["float32", "bfloat16", "float16"] = doc(
        "float32", "Weight dtype of the exported student (`OUT/student/` safetensors): `bfloat16` or `float16` halve "
                   "the files; float16 overflows beyond ±65504 where bfloat16 keeps float32's range.")

    def validate(self) -> None:
        # load_config checks the Literal; this also covers an ExportConfig built in Python.
        allowed = typing.get_args(typing.get_type_hints(ExportConfig)["dtype"])
        if self.dtype not in allowed:
            raise ConfigError(f"export.dtype must be one of {', '.join(allowed)}; got {self.dtype!r}")


@dataclass
class Config:
    output_dir: str = doc("runs/tailkd", "Where students, metrics, eval and tune results are written.")
    autoscaling: bool = doc(False, "The Ray cluster autoscales (cluster/*.yaml): placement checks then wait for "
                                   "nodes that offer teacher.resources / train.resources_per_worker instead of "
                                   "failing fast when no alive node does.")
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"doc": "The teacher and its actor pool."})
    student: StudentConfig = field(default_factory=StudentConfig, metadata={"doc": "The student model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Corpora and tokenization."})
    summary: SummaryConfig = field(default_factory=SummaryConfig, metadata={"doc": "Teacher summaries."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"doc": "The distillation loss."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Ray Train student training."})
    tune: TuneConfig = field(default_factory=TuneConfig, metadata={"doc": "Ray Tune K/β search."})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"doc": "The exported student."})
    generation: GenerationConfig = field(default_factory=GenerationConfig,
                                         metadata={"doc": "Task accuracy in `tailkd eval` (greedy decoding)."})
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig,
                                  metadata={"doc": "lm-evaluation-harness tasks in `tailkd eval`."})

    def validate(self) -> "Config":
        if self.teacher.tokens_per_batch is not None and self.teacher.tokens_per_batch < self.data.seq_len:
            raise ConfigError(f"teacher.tokens_per_batch = {self.teacher.tokens_per_batch} is below data.seq_len = "
                              f"{self.data.seq_len}: a teacher forward pass holds at least one whole sequence; "
                              f"raise it to >= {self.data.seq_len} or set it to null (teacher.batch_size sequences)")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        if self.summary.top_m is not None and self.loss.kind in ("tad", "topk"):
            require_k_within_top_m("loss.k", self.loss.k, self.summary.top_m)
        if self.summary.top_m is not None and self.loss.kind == "rkl":
            raise ConfigError("loss.kind = rkl needs the full teacher distribution: set summary.top_m: null "
                              "(co-located teacher) or pick another loss.kind")
        if self.loss.kind == "tad" and self.loss.k == self.summary.top_m and self.summary.tail_samples == 0:
            # pipelines.tune.search_config refuses this in a search over β; a single run may mean it, so only warn.
            log.warning(
                "loss.k = summary.top_m = %d with summary.tail_samples = 0: the summary holds nothing beyond the "
                "teacher's top K, so TAD's tail term is 0 and loss.beta = %g has no effect (the loss is D_KL1); "
                "set summary.tail_samples > 0 or loss.k < summary.top_m", self.loss.k, self.loss.beta)
        return self


def require_k_within_top_m(k_key: str, k: int, top_m: int) -> None:
    """The one rule tying K to the summary: a summary keeps the teacher's top M ids, so it serves any K ≤ M."""
    if k > top_m:
        raise ConfigError(f"{k_key} = {k} exceeds summary.top_m = {top_m}: the teacher summary keeps only its top "
                          f"{top_m} ids, so K ≤ M; raise summary.top_m (a new summary cache is scored) or lower {k_key}")


# train.loggers -> (the module its tracker imports, the extra that installs it)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def _check_loggers(loggers: list) -> None:
    if not isinstance(loggers, list) or len(set(map(str, loggers))) != len(loggers):
        raise ConfigError(f"train.loggers must be a list of distinct trackers, got {loggers!r}")
    for name in loggers:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"train.loggers: unknown tracker {name!r}; choose from {', '.join(TRACKER_PACKAGES)}")
        module, extra = TRACKER_PACKAGES[name]
        if extra and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.loggers: {name} needs the {module} package, which is not installed: "
                              f"pip install 'tailkd-ray[{extra}]' (on every node of the cluster)")


def _check_resources(key: str, resources: dict) -> None:
    for name, amount in resources.items():
        if (not isinstance(name, str) or not isinstance(amount, (int, float)) or not math.isfinite(amount)
                or amount <= 0):
            raise ConfigError(f"{key} must map resource names to positive amounts, got {name!r}: {amount!r}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type annotation.

    Where a float is expected, ints and numeric strings (a quoted ``"1e-4"``) are accepted; NaN and ±inf are
    refused here, since every range check (``value < 0``) lets NaN through and it would only fail in a worker.
    """
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if annotation is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    expected = origin or annotation
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from plain values, each checked against its field's type; nested
    dataclass fields are built from mappings. Errors name the key as ``prefix`` + field name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(f"unknown key {prefix}{unknown[0]} in {where}; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of keys, got {value!r}")
            kwargs[name] = build_dataclass(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = yaml.load(text, Loader=_Loader) if text else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value {text!r} is not valid YAML: {_yaml_reason(error)}; "
                              f"write it as YAML (quote a string holding ':', '#' or brackets)") from None
    return raw


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 does: ``1e-4`` is a float, not the string "1e-4"."""


# add_implicit_resolver copies the resolver table for the subclass: yaml.SafeLoader itself is unchanged.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _yaml_reason(error: yaml.YAMLError) -> str:
    """One line from a PyYAML error: what is wrong and where (line and column, 1-based)."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return str(error).replace("\n", " ")
    where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    return f"{where} ({context} from line {context_mark.line + 1})" if context and context_mark else where


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides and validate it."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            inside = sorted(path.glob("*.y*ml"))
            raise ConfigError(f"config file {path} is a directory; pass the path of a YAML file"
                              + (f" inside it, e.g. {inside[0]}" if inside else ""))
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_reason(error)}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} cannot be read as text: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides or []))
    return build_dataclass(Config, raw, "").validate()


def to_dict(config: Config) -> dict:
    """The config as plain data (for YAML dumps, manifests and Ray's train_loop_config)."""
    return dataclasses.asdict(config)


def from_dict(values: dict) -> Config:
    """Inverse of ``to_dict``; validates."""
    return build_dataclass(Config, values, "").validate()


def reference_markdown() -> str:
    """The config reference, generated from the dataclasses' own documentation so it cannot drift."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    hints = typing.get_type_hints(Config)
    for top in dataclasses.fields(Config):
        if dataclasses.is_dataclass(hints[top.name]):
            lines += [_row(f"{top.name}.{f.name}", f) for f in dataclasses.fields(hints[top.name])]
        else:
            lines.append(_row(top.name, top))
    return "\n".join(lines) + "\n"


def differing_fields(recorded: Any, wanted: Any, *, recorded_as: str, key: str = "") -> list[str]:
    """Dotted keys where two nested mappings (a recorded identity or config and this config's) differ, each with
    both values: ``"<key>: <recorded_as> has <value>, config gives <value>"``."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return [m for k in sorted(set(recorded) | set(wanted))
                for m in differing_fields(recorded.get(k), wanted.get(k), recorded_as=recorded_as,
                                          key=f"{key}.{k}" if key else k)]
    return [] if recorded == wanted else [f"{key}: {recorded_as} has {recorded!r}, config gives {wanted!r}"]


def _row(key: str, f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return f"| `{key}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {f.metadata['doc']} |"


# Keys holding local paths. Ray workers do not share the driver's working directory, so relative paths are
# made absolute in the driver; values that name nothing here (hub ids, URIs such as s3://...) are kept.
PATH_KEYS = ("output_dir", "teacher.model", "student.model", "data.train", "data.val", "data.tokenizer",
             "summary.cache_dir", "generation.data", "lm_eval.include_path")
_OUTPUT_KEYS = ("output_dir", "summary.cache_dir")


def resolve_local_paths(config: Config, base: Optional[Path] = None) -> Config:
    """Make relative local paths absolute against ``base`` (default: the current directory), in place."""
    base = Path(base or Path.cwd())
    for key in PATH_KEYS:
        section_name, _, name = key.rpartition(".")
        section = getattr(config, section_name) if section_name else config
        value = getattr(section, name)
        if value is None or "://" in value or os.path.isabs(value):
            continue
        candidate = base / value
        if key in _OUTPUT_KEYS or candidate.exists() or glob.glob(str(candidate)):
            setattr(section, name, str(candidate.absolute()))
    return config
