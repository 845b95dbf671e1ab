"""Models and tokenizers: the one home of every Hugging Face load, build and check.

- ``load_tokenizer`` (the one tokenizer loader), ``data_tokenizer_path`` / ``export_tokenizer`` (which one a run
  uses); ``check_vocab_compatible`` (teacher, student and data tokenizer share one token table, whose length is
  the shared vocabulary; embeddings may be padded beyond it); ``shared_vocab_size``;
- ``load_teacher``; ``student_config`` and ``build_student`` (the one student builder: an HF path, or overrides
  of the teacher's config initialised randomly (seeded) or by truncating the teacher); ``StudentWithHead``, the
  wrapper the chunked objective runs in; ``prepare_decoder_blocks`` (activation checkpointing and regional
  compilation of the student's blocks); ``llama_config`` / ``save_random_model``, the small random-weight models
  of the demo, the benchmarks and the tests.

Truncation (``student.init: truncate``, as in the paper): every student tensor is copied from the teacher
tensor of the same name, keeping its **leading slice along every dimension**,
``student[name] = teacher[name][:s0, :s1, ...]``. With HF's layer naming (``layers.{i}.`` / ``h.{i}.``) the
student's layer i is the teacher's layer i, so the student keeps the teacher's *first* N layers. Concretely:

- embeddings ``[V, d_T] -> [V, d_S]`` (first d_S features; the vocabulary must be the teacher's);
- q / k / v / o projections and MLP matrices: leading rows and columns. Slicing rows of q_proj
  ``[n_heads·head_dim, d]`` keeps whole heads only if the student's ``head_dim`` equals the teacher's, so
  that is required (``ConfigError`` otherwise; e.g. halve ``num_attention_heads`` with ``hidden_size``);
  the student then keeps the teacher's first heads (and first key/value heads under GQA);
- fused projections (``FUSED_PROJECTIONS``: GPT-2 ``c_attn`` = [q | k | v] along the last dim of its Conv1D
  weight; Phi-3 ``qkv_proj`` = [q | k | v] rows sized by its query and key/value heads, ``gate_up_proj`` =
  [gate | up] rows) are sliced part by part, so each part keeps its leading slice;
- norms, biases and the LM head: leading entries / rows;
- per-layer config lists (``layer_types``) keep their first N entries (``student_config``), matching the layers.

Architectures with fused layouts not listed there (e.g. GPT-NeoX's per-head interleaved ``query_key_value``)
are not truncated correctly by this rule; use ``init: random`` or an explicit ``student.model`` for them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tailkd_ray.config import Config, ConfigError, StudentConfig, TeacherConfig
from tailkd_ray.core.losses import teacher_logits_over
from tailkd_ray.errors import DataError, VocabularyError

log = logging.getLogger(__name__)


def _qkv_sizes(config) -> list[int]:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return [config.num_attention_heads * head_dim(config)] + [kv_heads * head_dim(config)] * 2


# Fused projections: parameter-name suffix -> (dimension that concatenates the parts, the parts' sizes from
# the HF config).
FUSED_PROJECTIONS: dict[str, tuple[int, Callable[[object], list[int]]]] = {
    "attn.c_attn.weight": (-1, lambda c: [c.n_embd] * 3),  # GPT-2 Conv1D [d, 3d]: [q | k | v]
    "attn.c_attn.bias": (-1, lambda c: [c.n_embd] * 3),
    "self_attn.qkv_proj.weight": (0, _qkv_sizes),  # Phi-3 Linear rows: [q | k | v], GQA-sized
    "mlp.gate_up_proj.weight": (0, lambda c: [c.intermediate_size] * 2),  # Phi-3 Linear rows: [gate | up]
}


def load_model(path: str | Path, *, trust_remote_code: bool, device: str | torch.device = "cpu",
               dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A frozen eval-mode ``AutoModelForCausalLM`` (a teacher, or a student to evaluate), float32 by default."""
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                 dtype=dtype or torch.float32)
    model.to(device).eval().requires_grad_(False)
    return model


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a frozen model runs in on ``device``: bfloat16 on a GPU, float32 on CPU (no fast bf16 there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_teacher(teacher: TeacherConfig, *, device: str | torch.device = "cpu",
                 dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The teacher as a frozen eval-mode model (co-located exact mode, truncation and evaluation)."""
    if teacher.model is None:
        raise ConfigError("teacher.model is not set: give the teacher's HF path")
    return load_model(teacher.model, trust_remote_code=teacher.trust_remote_code, device=device, dtype=dtype)


def student_config(cfg: Config):
    """The student's HF config: ``student.model``'s own, or the teacher's with ``student.config`` overrides.

    Reads only the teacher's config.json (no weights, no tokenizer). Override keys must already exist in the
    teacher's config (a typo would otherwise be silently ignored). A ``head_dim`` that the teacher derives as
    hidden_size / num_attention_heads is re-derived for the student, and per-layer lists (``layer_types``,
    ``mlp_layer_types``, ...) follow a changed ``num_hidden_layers`` (see ``_resize_per_layer``).
    """
    if cfg.student.model is not None:
        return AutoConfig.from_pretrained(cfg.student.model, trust_remote_code=cfg.student.trust_remote_code)
    if cfg.teacher.model is None:
        raise ConfigError("set student.model, or teacher.model so the student can be derived from its config")
    config = _teacher_config(cfg.teacher)
    overrides = cfg.student.config
    known = set(config.to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"student.config.{unknown[0]} is not a field of the teacher's {type(config).__name__} "
                          f"({cfg.teacher.model}); known fields include: {', '.join(sorted(known)[:40])}")
    derived_head_dim = getattr(config, "head_dim", None) == _default_head_dim(config)
    teacher_layers = getattr(config, "num_hidden_layers", None)
    per_layer = _per_layer_fields(config, teacher_layers)
    for key, value in overrides.items():
        _set_field(cfg, config, key, value)
    if derived_head_dim and "head_dim" not in overrides:
        # The teacher's head_dim was hidden_size / heads; keep that relation rather than a stale value.
        _set_field(cfg, config, "head_dim", _default_head_dim(config))
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 1:  # transformers builds a model of no decoder blocks without a word
        raise ConfigError(f"student.config.num_hidden_layers must be >= 1, got {layers}")
    if layers != teacher_layers:
        for key, values in per_layer.items():
            if key not in overrides:
                _set_field(cfg, config, key, _resize_per_layer(key, values, layers))
    validate = getattr(config, "validate", None)  # transformers >= 5 checks a config's architecture on request
    if validate is not None:
        try:
            validate()
        except Exception as error:  # huggingface_hub's StrictDataclassClassValidationError; not picklable by Ray
            reason = str(error).strip().splitlines()[-1].strip()
            named = [k for k in dict.fromkeys(re.findall(r"`(\w+)`", reason)) if k in known]
            fix = (f"set {' and '.join(f'student.config.{k}' for k in named)} consistently" if named else
                   "set the fields it names in student.config (e.g. num_attention_heads and num_key_value_heads "
                   "dividing hidden_size)")
            raise ConfigError(f"student.config {overrides} on the teacher's {type(config).__name__} "
                              f"({cfg.teacher.model}) is not a valid model: {reason}; {fix}") from None
    return config


# List-valued config fields that are never per-layer even when their length happens to equal the layer count.
_NOT_PER_LAYER = ("architectures",)


def _per_layer_fields(config, layers: Optional[int]) -> dict[str, list]:
    """Every top-level list field with one entry per layer (``layer_types`` and the like), by length."""
    if not layers:
        return {}
    fields = {}
    for key in config.to_dict():
        value = getattr(config, key, None)
        if (isinstance(value, (list, tuple)) and len(value) == layers and key not in _NOT_PER_LAYER
                and "token" not in key):  # token ids (e.g. a list eos_token_id) are not per layer
            fields[key] = list(value)
    return fields


def _resize_per_layer(key: str, values: list, layers: int) -> list:
    """The teacher's per-layer list for ``layers`` layers.

    Fewer layers keep the first ``layers`` entries: the student's layer i stands for the teacher's layer i
    (which ``init: truncate`` copies), and a periodic pattern anchored at layer 0 (e.g. Gemma's alternating
    sliding / full attention) is the same pattern regenerated. More layers repeat the list's shortest period,
    which needs a list that repeats at all.
    """
    period = next(p for p in range(1, len(values) + 1)
                  if all(v == values[i % p] for i, v in enumerate(values)))
    if layers > len(values) and period == len(values):
        raise ConfigError(f"student.config.num_hidden_layers = {layers} exceeds the teacher's {len(values)} layers "
                          f"and the teacher's {key} {values} has no repeating pattern to extend: set "
                          f"student.config.{key} (a list of {layers} entries)")
    return [values[i % period] for i in range(layers)]


def _set_field(cfg: Config, config, key: str, value) -> None:
    try:
        setattr(config, key, value)
    except Exception as error:  # huggingface_hub's strict-dataclass type check, not picklable by Ray
        reason = str(error).strip().splitlines()[-1].strip()
        raise ConfigError(f"student.config.{key} = {value!r} is not valid for the teacher's {type(config).__name__} "
                          f"({cfg.teacher.model}): {reason}") from None


def _default_head_dim(config) -> Optional[int]:
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    return hidden // heads if heads and hidden else None


def build_student(cfg: Config, *, teacher_state: Optional[dict] = None) -> nn.Module:
    """The student model on CPU in float32, initialised per ``student.init`` (seeded by ``train.seed``), with an
    embedding row for every token of the data tokenizer (``VocabularyError`` otherwise; padding rows beyond it are
    fine).

    ``teacher_state`` (a state dict) avoids re-reading the teacher for ``truncate`` when it is already loaded.
    """
    student_cfg: StudentConfig = cfg.student
    if student_cfg.model is not None and student_cfg.init == "random":
        # An explicit student checkpoint is used as is: its weights are the initialisation.
        model = AutoModelForCausalLM.from_pretrained(student_cfg.model, dtype=torch.float32,
                                                     trust_remote_code=student_cfg.trust_remote_code)
    else:
        config = student_config(cfg)
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=_remote_code(cfg))
        if student_cfg.init == "truncate":
            teacher_state = teacher_state if teacher_state is not None else load_teacher(cfg.teacher).state_dict()
            teacher_config = _teacher_config(cfg.teacher)
            check_truncatable(teacher_config, config)
            truncate_into(model, teacher_state, teacher_config)
    tokenizer_path = data_tokenizer_path(cfg)
    tokenizer = None if tokenizer_path is None else _shipped_tokenizer(
        tokenizer_path, cfg.teacher.trust_remote_code and tokenizer_path == cfg.teacher.model)
    if tokenizer is not None:  # without one (a config-only teacher) the driver's check_vocab_compatible refused
        require_rows_for_tokens("the built student", model.get_output_embeddings().weight.shape[0],
                                tokenizer_size(tokenizer), tokenizer_path)
    return model


def _teacher_config(teacher: TeacherConfig):
    return AutoConfig.from_pretrained(teacher.model, trust_remote_code=teacher.trust_remote_code)


def _remote_code(cfg: Config) -> bool:
    return cfg.student.trust_remote_code if cfg.student.model is not None else cfg.teacher.trust_remote_code


def head_dim(config) -> Optional[int]:
    """Attention head width of an HF config (None if it has no attention heads)."""
    return getattr(config, "head_dim", None) or _default_head_dim(config)


def check_truncatable(teacher_config, student_config_) -> None:
    """Truncation keeps whole heads only if both models have the same head width."""
    t, s = head_dim(teacher_config), head_dim(student_config_)
    if t is not None and s is not None and t != s:
        raise ConfigError(f"student.init = truncate needs the teacher's head_dim ({t}) but the student's is {s} "
                          f"(hidden_size {student_config_.hidden_size} / {student_config_.num_attention_heads} "
                          f"heads): set num_attention_heads = hidden_size / {t}")


def truncate_tensor(name: str, teacher: torch.Tensor, shape: torch.Size,
                    parts: Optional[tuple[int, list[int], list[int]]] = None) -> torch.Tensor:
    """Leading slice of ``teacher`` with the student's ``shape``.

    ``parts`` = (dim, teacher part sizes, student part sizes) slices a fused projection part by part.
    """
    if any(s > t for s, t in zip(shape, teacher.shape)) or len(shape) != teacher.dim():
        raise ConfigError(f"student.init = truncate: student tensor {name} {tuple(shape)} is larger than the "
                          f"teacher's {tuple(teacher.shape)}; a truncated student must be no wider than its teacher")
    if parts is not None:
        dim, teacher_sizes, student_sizes = parts
        if sum(teacher_sizes) != teacher.shape[dim] or sum(student_sizes) != shape[dim]:
            raise ConfigError(f"student.init = truncate: fused tensor {name} {tuple(teacher.shape)} -> {tuple(shape)} "
                              f"does not split into the parts {teacher_sizes} -> {student_sizes} its config implies; "
                              f"use student.init: random for this architecture")
        pieces = []
        for i, (piece, size) in enumerate(zip(teacher.split(teacher_sizes, dim=dim), student_sizes)):
            part_shape = list(shape)
            part_shape[dim] = size
            pieces.append(truncate_tensor(f"{name}[part {i}]", piece, torch.Size(part_shape)))
        return torch.cat(pieces, dim=dim)
    return teacher[tuple(slice(0, s) for s in shape)]


@torch.no_grad()
def truncate_into(student: nn.Module, teacher_state: dict, teacher_config) -> None:
    """Copy the leading slices of the teacher's tensors into every student parameter and buffer."""
    for name, tensor in student.state_dict().items():
        if name not in teacher_state:
            if name.endswith("inv_freq") or "rotary" in name:
                continue  # derived from the config, not learned
            raise ConfigError(f"student.init = truncate: student tensor {name} has no counterpart in the teacher "
                              f"(the student needs the teacher's architecture)")
        fused = next((spec for suffix, spec in FUSED_PROJECTIONS.items() if name.endswith(suffix)), None)
        parts = (fused[0], fused[1](teacher_config), fused[1](student.config)) if fused else None
        tensor.copy_(truncate_tensor(name, teacher_state[name], tensor.shape, parts))
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()


def export_dtype(cfg: Config) -> torch.dtype:
    """The dtype ``export.dtype`` names, for the weights written to ``OUT/student/``."""
    return getattr(torch, cfg.export.dtype)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer at ``path`` (a Hugging Face directory or hub id), its fast (Rust) version where one exists."""
    return AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=trust_remote_code)


def data_tokenizer_path(cfg: Config) -> Optional[str]:
    """The tokenizer the corpus is tokenized with: ``data.tokenizer``, else the teacher's."""
    return cfg.data.tokenizer or cfg.teacher.model


def export_tokenizer(cfg: Config):
    """The tokenizer exported with the student: the data tokenizer, else the student's own."""
    path = data_tokenizer_path(cfg) or cfg.student.model
    return load_tokenizer(path, trust_remote_code=cfg.teacher.trust_remote_code and path == cfg.teacher.model)


def model_vocab_size(config) -> int:
    """Rows of the model's embedding / LM head (may exceed the tokenizer's size: padded vocabularies)."""
    return int(config.get_text_config().vocab_size)


def shared_vocab_size(cfg: Config) -> int:
    """The shared vocabulary: the data tokenizer's size (``tokenizer_size``: ``len(tokenizer)``, added tokens
    included, for dense vocabularies). Teacher and
    student embeddings may have more rows (padded to a multiple, e.g. Qwen2.5: 151,665 tokens, 151,936 or 152,064
    rows); ids beyond it are padding rows, which the summaries and losses never name (DESIGN §3)."""
    path = data_tokenizer_path(cfg)
    if path is None:
        raise ConfigError("no tokenizer: set teacher.model (its tokenizer) or data.tokenizer")
    return tokenizer_size(load_tokenizer(path, trust_remote_code=cfg.teacher.trust_remote_code
                                         and path == cfg.teacher.model))


def tokenizer_size(tokenizer) -> int:
    """Token ids a tokenizer can produce: its largest id + 1 (``len(tokenizer)`` for the usual dense vocabularies;
    larger when ids have gaps below the special tokens)."""
    return max(tokenizer.get_vocab().values()) + 1


def require_rows_for_tokens(model_name: str, rows: int, shared: int, tokenizer_name: str) -> None:
    """A model needs an embedding row for every token id of the tokenizer (it may have more: padding rows)."""
    if rows < shared:
        raise VocabularyError(f"{model_name} has vocab_size {rows} but the tokenizer {tokenizer_name} has {shared} "
                              f"tokens: every token id needs an embedding row; use a model of the teacher's "
                              f"family/tokenizer (or drop vocab_size from student.config)")


def require_reverse_kl_support(cfg: Config, shared_vocab: int) -> None:
    """Reverse KL (``loss.kind: rkl``) is infinite where the teacher's probability is 0: on a padded student's
    padding rows (DESIGN §3)."""
    rows = model_vocab_size(student_config(cfg))
    if cfg.loss.kind == "rkl" and rows > shared_vocab:
        raise VocabularyError(f"loss.kind = rkl: the student has {rows - shared_vocab} padding rows beyond the "
                              f"tokenizer's {shared_vocab} tokens, where the teacher's probability is 0 and reverse "
                              f"KL is infinite; use a student without padding rows (student.config.vocab_size: "
                              f"{shared_vocab}) or another loss.kind")


def check_vocab_compatible(teacher_path: str, student: Optional[str | Mapping[str, Any]],
                           tokenizer_path: Optional[str], *, trust_remote_code: bool = False) -> int:
    """Check that teacher, student and data tokenizer share one token table; return its length (the shared
    vocabulary, ``tokenizer_size``).

    - the data tokenizer's token table must equal the teacher's tokenizer's (when the teacher ships one), and so
      must the student's (when ``student`` is a model path that ships one): ``VocabularyError`` naming both and the
      first differing tokens;
    - teacher and student (``student`` is a model path, a dict of config overrides applied to the teacher's config,
      or None for the teacher's own config) need an embedding row for every token: their ``vocab_size`` may differ
      and exceed the tokenizer's length (padded vocabularies: the rows beyond it are padding, DESIGN §3).
    Raises ``DataError`` when there is no tokenizer.
    """
    teacher_vocab = model_vocab_size(AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust_remote_code))
    if isinstance(student, str):
        student_vocab = model_vocab_size(AutoConfig.from_pretrained(student, trust_remote_code=trust_remote_code))
        student_name = f"student {student}"
    else:
        student_vocab = (student or {}).get("vocab_size", teacher_vocab)
        student_name = "student (student.config)"
    teacher_tokenizer, data_tokenizer, data_name = _data_tokenizer(teacher_path, tokenizer_path, trust_remote_code)
    shared = tokenizer_size(data_tokenizer)
    for name, rows in ((f"teacher {teacher_path}", teacher_vocab), (student_name, student_vocab)):
        require_rows_for_tokens(name, rows, shared, data_name)
    if teacher_tokenizer is None:
        log.warning("teacher %s ships no tokenizer: only the vocabulary size of %s was checked", teacher_path,
                    data_name)
    elif teacher_tokenizer is not data_tokenizer:
        _compare_token_tables(teacher_tokenizer.get_vocab(), data_tokenizer.get_vocab(), f"teacher {teacher_path}",
                              data_name, remedy="tokenize the data with the teacher's tokenizer (data.tokenizer: "
                                                "null or the teacher's path)")
    student_tokenizer = _shipped_tokenizer(student, trust_remote_code) if isinstance(student, str) else None
    if student_tokenizer is not None and teacher_tokenizer is not None:
        _compare_token_tables(teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab(), f"teacher {teacher_path}",
                              f"{student_name} tokenizer", remedy="distil into a student of the teacher's tokenizer")
    if max(teacher_vocab, student_vocab) > shared:
        log.info("padded vocabularies: %d tokens (%s), teacher %d rows, student %d rows; the rows beyond the tokens "
                 "are padding: never in a summary, the teacher's mass there counted into the rest mass", shared,
                 data_name, teacher_vocab, student_vocab)
    return shared


def _data_tokenizer(teacher_path: str, tokenizer_path: Optional[str], trust_remote_code: bool):
    """(the teacher's tokenizer or None, the data tokenizer, its name for messages)."""
    teacher_tokenizer = _shipped_tokenizer(teacher_path, trust_remote_code)
    data_tokenizer = (load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
                      if tokenizer_path is not None else teacher_tokenizer)
    if data_tokenizer is None:
        raise DataError(f"no tokenizer found in teacher {teacher_path} and data.tokenizer is not set: "
                        f"set data.tokenizer to the teacher's tokenizer")
    return teacher_tokenizer, data_tokenizer, f"data tokenizer {tokenizer_path or teacher_path}"


_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _shipped_tokenizer(path: str, trust_remote_code: bool):
    """The tokenizer saved with a model, or None when the model directory holds none."""
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in _TOKENIZER_MARKERS):
        return None  # AutoTokenizer would build an empty tokenizer of the config's type rather than fail
    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # the model's config loaded, so this means "no tokenizer files"
        log.debug("no tokenizer with %s: %s", path, err)
        return None


def _compare_token_tables(teacher: Mapping[str, int], data: Mapping[str, int], teacher_name: str,
                          data_name: str, *, remedy: str, show: int = 5) -> None:
    if teacher == data:
        return
    by_id_teacher = {i: t for t, i in teacher.items()}
    by_id_data = {i: t for t, i in data.items()}
    differing = sorted(i for i in set(by_id_teacher) | set(by_id_data) if by_id_teacher.get(i) != by_id_data.get(i))
    examples = ", ".join(f"id {i}: {by_id_teacher.get(i)!r} vs {by_id_data.get(i)!r}" for i in differing[:show])
    raise VocabularyError(f"token tables differ between the {teacher_name} tokenizer ({len(teacher)} tokens) and "
                          f"the {data_name} ({len(data)} tokens) at {len(differing)} id(s), first: {examples}; "
                          f"{remedy}")


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks (HF's ``_no_split_modules`` classes) with their qualified names."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [(name, m) for name, m in model.named_modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (no _no_split_modules), which "
                         f"FSDP2, train.activation_checkpointing and train.compile work on; use train.strategy = "
                         f"ddp with both off for this architecture")
    return blocks


def prepare_decoder_blocks(model: nn.Module, *, activation_checkpointing: bool, compile: bool) -> list[nn.Module]:
    """Each decoder block as training runs it, put back in place of the block; returns them (FSDP2's units).

    The order is torchtitan's: activation checkpointing wraps the block (PyTorch's ``checkpoint_wrapper``,
    non-reentrant: the block's activations are recomputed in backward, inside the unit FSDP2 gathers for it and
    with ZeRO-3's per-module gather hooks firing again), then the wrapped block is compiled on its own (regional
    compilation: one small graph reused by every block), then the caller shards it. Both keep the parameter
    names: the wrapper's prefix is removed by its state-dict hooks and by ``torch.distributed.checkpoint``, and
    ``nn.Module.compile`` compiles in place.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    if activation_checkpointing and compile:
        # Transformers' attention sets and resets a context variable (the `kernels` hub's kernel choice) in forward;
        # dynamo refuses such a side effect inside a checkpoint, graph-breaks, and the block then runs uncompiled.
        # Not replaying that set/reset pair in the recompute is harmless.
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    prepared = []
    for name, block in decoder_blocks(model):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, block)
        if compile:
            block.compile()
        prepared.append(block)
    return prepared


HeadFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], object]


class StudentWithHead(nn.Module):
    """Runs the student's decoder, then ``head_fn(hidden, lm_head_weight, lm_head_bias)`` inside one forward.

    The chunked objective needs the final hidden states and the LM-head weight rather than logits. Doing
    both inside this module's own forward keeps every strategy's parameter management correct: FSDP2
    unshards the root-level parameters (embeddings, final norm, LM head) for the root's forward and
    backward, DDP syncs gradients of everything used in its forward, and DeepSpeed ZeRO-3 gathers the LM
    head because it is registered as an external parameter of this module (see ``register_for_zero3``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, head_fn: HeadFn, position_ids: Optional[torch.Tensor] = None):
        # No KV cache: training never reuses it, and a recomputed (checkpointed) block would append to it again.
        # Position ids restarting per packed sample (no attention mask, no cache) make transformers build its
        # packed-sequence mask: each sample attends within itself only (DESIGN §1).
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        return head_fn(hidden, self.head.weight, getattr(self.head, "bias", None))

    def register_for_zero3(self) -> None:
        import deepspeed  # deferred: slow to import, and only the deepspeed strategy needs it

        for param in self.head.parameters():
            deepspeed.zero.register_external_parameter(self, param)


def teacher_logits(teacher: nn.Module, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor], *,
                   shared_vocab: int, student_rows: int) -> torch.Tensor:
    """A full (co-located or eval) teacher's logits over the student's rows (``core.losses.teacher_logits_over``) on
    ``input_ids`` at ``position_ids`` (None: 0..T-1). No KV cache: with one, transformers skips its packed-sequence
    mask and packed samples would attend to each other."""
    logits = teacher(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return teacher_logits_over(logits, shared_vocab, student_rows)


def llama_config(*, vocab: int, layers: int, width: int, heads: int, intermediate: int, max_positions: int,
                 kv_heads: Optional[int] = None, eos_id: int = 0) -> LlamaConfig:
    """A small Llama config (the demo's teacher, the benchmarks' and the tests' models): untied LM head, the eos
    id as bos and pad too."""
    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=False,
                       bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)


def save_random_model(config, out_dir: str | Path, *, seed: int, tokenizer=None) -> Path:
    """A randomly initialised (seeded) causal LM of ``config`` saved as safetensors in ``out_dir``, with
    ``tokenizer`` (a tokenizer or its path) beside it; returns ``out_dir``."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
