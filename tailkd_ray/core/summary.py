"""The teacher summary: what crosses Ray's object store (or the Parquet cache) instead of full logits.

For each token position the teacher distribution p = softmax(z / τ) is summarised by

- ``top_ids [M]`` (int32): the ids of its M most probable tokens, by descending probability;
- ``top_logp [M]`` (float16, or float32 on request): log p of those ids;
- ``rest_logmass`` (float32): log α_M = log Σ_{rank > M} p, computed with logsumexp over the rest of the
  vocabulary (no 1 − Σ cancellation);
- ``tail_ids [S]`` (int32): S ids drawn i.i.d. from p restricted to ranks > M;
- ``tail_logp [S]`` (float16 / float32): log p of those ids.

Any K ≤ M can be trained from one summary, since α_K = α_M + Σ_{ranks K+1..M} p is exact: one teacher
pass serves a whole K/β search. ``summarize`` builds it from logits, ``summarize_hidden`` from the teacher's
final hidden states and LM head chunk by chunk (a lean teacher never holds its [positions, V] logits). The
summary is pure torch + pyarrow (no Ray).

The log-probs are at the scoring temperature τ, which the summary records (``temperature``; Arrow schema
metadata ``tailkd.temperature`` on disk) so a loss at another τ can be refused. Ray Data batches (dicts of
numpy arrays) drop it: there the cache manifest or the config that scored the rows holds it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from tailkd_ray.errors import NonFiniteLogitsError  # re-exported: callers import it from here too

FIELDS = ("top_ids", "top_logp", "rest_logmass", "tail_ids", "tail_logp")  # the tensor fields, in order
TEMPERATURE_KEY = b"tailkd.temperature"  # Arrow schema metadata holding the scoring τ


@dataclass
class TeacherSummary:
    """Compact teacher distribution per position; leading dims are [B, T] (or [N] once flattened)."""

    top_ids: torch.Tensor  # [..., M] int32
    top_logp: torch.Tensor  # [..., M] float16 / float32
    rest_logmass: torch.Tensor  # [...] float32
    tail_ids: torch.Tensor  # [..., S] int32
    tail_logp: torch.Tensor  # [..., S] float16 / float32
    temperature: Optional[float] = field(default=None, kw_only=True)  # scoring τ; None = not known

    @property
    def top_m(self) -> int:
        return self.top_ids.shape[-1]

    @property
    def tail_samples(self) -> int:
        return self.tail_ids.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Leading (position) shape, e.g. [B, T]."""
        return self.rest_logmass.shape

    def map(self, fn) -> "TeacherSummary":
        """Apply ``fn`` to every field tensor (e.g. indexing, ``.to(device)``); the temperature is kept."""
        return TeacherSummary(**{name: fn(getattr(self, name)) for name in FIELDS}, temperature=self.temperature)

    def flatten_positions(self) -> "TeacherSummary":
        """[B, T, ...] -> [B*T, ...]."""
        positions, dims = self.rest_logmass.numel(), self.rest_logmass.dim()
        return self.map(lambda t: t.reshape(positions, *t.shape[dims:]))

    def to(self, device) -> "TeacherSummary":
        return self.map(lambda t: t.to(device, non_blocking=True))

    def nbytes_per_position(self) -> int:
        return sum(getattr(self, name)[(0,) * self.rest_logmass.dim()].nbytes for name in FIELDS)

    # --- Arrow / Parquet / Ray Data batches -------------------------------------------------------
    def to_numpy(self) -> dict[str, np.ndarray]:
        """Field name -> numpy array (a Ray Data ``batch_format="numpy"`` batch; no copy on CPU)."""
        return {name: getattr(self, name).detach().cpu().numpy() for name in FIELDS}

    @classmethod
    def from_batch(cls, batch: Mapping[str, object], *, temperature: Optional[float] = None) -> "TeacherSummary":
        """Build from a mapping holding the five columns as numpy arrays or tensors (zero-copy for numpy);
        ``temperature`` is the scoring τ when the caller knows it (a batch does not carry it)."""
        missing = [name for name in FIELDS if name not in batch]
        if missing:
            raise KeyError(f"batch lacks teacher-summary column(s) {missing}; it has {sorted(batch)}")
        return cls(**{name: torch.as_tensor(batch[name]) for name in FIELDS}, temperature=temperature)

    def to_arrow(self, extra: Optional[Mapping[str, np.ndarray]] = None) -> pa.RecordBatch:
        """A record batch with one row per leading index (per sequence for [B, T] summaries).

        Each field is stored as a fixed-size-list column whose flat values are the tensor's contiguous
        buffer (no per-element conversion). ``extra`` adds columns such as ``input_ids`` with the same
        leading dimension. A known temperature goes into the schema metadata (``TEMPERATURE_KEY``).
        """
        columns = {**{name: getattr(self, name).detach().cpu().numpy() for name in FIELDS}, **(extra or {})}
        metadata = None if self.temperature is None else {TEMPERATURE_KEY: repr(float(self.temperature)).encode()}
        return pa.RecordBatch.from_pydict({name: _fixed_list(array) for name, array in columns.items()},
                                          metadata=metadata)

    @classmethod
    def from_arrow(cls, batch: pa.RecordBatch | pa.Table, *, tokens_per_row: int) -> "TeacherSummary":
        """Inverse of ``to_arrow`` for [B, T] summaries with ``tokens_per_row`` = T; the temperature is read
        from the schema metadata (None when absent)."""
        out = {}
        for name in FIELDS:
            array = _unfixed(batch.column(name), len(batch))
            trailing = () if name == "rest_logmass" else (array.shape[1] // tokens_per_row,)  # S may be 0
            with warnings.catch_warnings():  # Arrow buffers are read-only; the losses never write to them
                warnings.simplefilter("ignore", UserWarning)
                out[name] = torch.from_numpy(array.reshape(len(batch), tokens_per_row, *trailing))
        stored = (batch.schema.metadata or {}).get(TEMPERATURE_KEY)
        return cls(**out, temperature=None if stored is None else float(stored))


def _fixed_list(array: np.ndarray) -> pa.Array:
    """[rows, ...] numpy -> FixedSizeList column over a flat buffer (zero-copy for contiguous arrays). A row of
    no values (the tail columns with summary.tail_samples = 0) is an empty variable-size list: Arrow has no
    fixed-size list of width 0 that Parquet can store."""
    array = np.ascontiguousarray(array)
    flat = pa.array(array.reshape(-1))
    width = int(np.prod(array.shape[1:])) if array.ndim > 1 else 1
    if width == 0:
        return pa.ListArray.from_arrays(pa.array(np.zeros(len(array) + 1, dtype=np.int32)), flat)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _unfixed(column: pa.Array | pa.ChunkedArray, rows: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    nested = pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type)
    values = column.flatten() if nested else column
    return values.to_numpy(zero_copy_only=False).reshape(rows, -1)


SUMMARY_CHUNK_BYTES = 2**28  # float32 [positions, V] buffer size that summaries are computed in (two are alive)


@torch.inference_mode()
def summarize(
    teacher_logits: torch.Tensor,
    *,
    top_m: int,
    tail_samples: int = 0,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
    logp_dtype: torch.dtype = torch.float16,
    uniforms: Optional[torch.Tensor] = None,
    shared_vocab: Optional[int] = None,
) -> TeacherSummary:
    """Summarise teacher logits ``[..., V]`` into a ``TeacherSummary`` (log-probs at temperature τ, recorded as
    its ``temperature``).

    ``shared_vocab`` (V_s ≤ V, the tokenizer's length; None = V) marks rows V_s..V−1 as padding rows of a padded
    embedding: no summary id is a padding row, and their mass is counted into ``rest_logmass`` (logsumexp over the
    far tail's members, padding rows included). The far tail's samples are drawn from its shared ids and their
    ``tail_logp`` carry the rest mass, log p_i + log α_M − log Σ_{far shared} p: the summary is that of the
    teacher with its padding mass spread over the far tail in proportion to p (DESIGN §3). With −inf padding
    logits it equals the summary of the unpadded logits.

    Tail samples are drawn i.i.d. (with replacement) from p restricted to ranks > M, i.e. with
    probabilities p_i / α_M, by inverse-CDF sampling from uniforms: ``uniforms [..., S]`` in [0, 1) when
    given (so a caller can seed each row on its own and still summarise a whole batch at once), else drawn
    with ``generator``. Positions whose far tail is empty (M = V) or has zero mass get ``tail_ids = 0`` and
    ``tail_logp = -inf``; the loss ignores them since α_M = 0 there.
    Raises ``NonFiniteLogitsError`` (a ``ValueError``) naming the first position whose logits hold NaN or +inf
    (or are all −inf).
    """
    vocab = teacher_logits.shape[-1]
    logits = teacher_logits.reshape(-1, vocab)
    return _summarize_chunks(lambda rows: logits[rows], tuple(teacher_logits.shape[:-1]), vocab,
                             teacher_logits.device, default_chunk_tokens(vocab), top_m=top_m,
                             tail_samples=tail_samples, temperature=temperature, generator=generator,
                             logp_dtype=logp_dtype, uniforms=uniforms, shared_vocab=shared_vocab)


@torch.inference_mode()
def summarize_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: Optional[torch.Tensor] = None,
    *,
    top_m: int,
    tail_samples: int = 0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    logp_dtype: torch.dtype = torch.float16,
    uniforms: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    shared_vocab: Optional[int] = None,
) -> TeacherSummary:
    """``summarize`` of the logits ``hidden @ lm_head_weight.T + lm_head_bias`` (then ``softcap · tanh(z /
    softcap)`` when ``softcap`` is set, as Gemma 2's ``final_logit_softcapping``), computed from the teacher's
    final hidden states ``[..., d]`` ``chunk_tokens`` positions at a time: the [positions, V] logits are never
    held whole (peak ≈ two float32 [chunk_tokens, V] buffers, logits and log-probs, plus the head's own output
    when it is not float32). The LM head runs in the weight's dtype (e.g. bf16 on GPU), the log-softmax in
    float32.

    Same arguments (``shared_vocab`` included), summary and ``NonFiniteLogitsError`` as ``summarize``: with the same ``uniforms`` it gives
    the same summary as ``summarize`` on the full logits. ``chunk_tokens`` defaults to the positions of one
    ``SUMMARY_CHUNK_BYTES`` float32 buffer.
    """
    vocab, width = lm_head_weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden states have width {hidden.shape[-1]} but the LM head weight is [V, d] = "
                         f"{tuple(lm_head_weight.shape)}; pass the final (post-norm) hidden states of the same model")
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden states are {hidden.dtype} but the LM head weight is {lm_head_weight.dtype}; "
                         f"cast one to the other (the model's own forward uses one dtype)")
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (vocab,):
        raise ValueError(f"lm_head_bias must have shape ({vocab},), got {tuple(lm_head_bias.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None: no capping), got {softcap}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (or None: the default), got {chunk_tokens}")
    states = hidden.reshape(-1, width)

    def chunk_logits(rows: slice) -> torch.Tensor:
        logits = F.linear(states[rows], lm_head_weight, lm_head_bias)
        # The model's own op order and dtype, so the logits match its forward's.
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    return _summarize_chunks(chunk_logits, tuple(hidden.shape[:-1]), vocab, hidden.device,
                             chunk_tokens or default_chunk_tokens(vocab), top_m=top_m, tail_samples=tail_samples,
                             temperature=temperature, generator=generator, logp_dtype=logp_dtype, uniforms=uniforms,
                             shared_vocab=shared_vocab)


def default_chunk_tokens(vocab: int) -> int:
    """Positions per chunk of ``summarize`` and, by default, of ``summarize_hidden``: one SUMMARY_CHUNK_BYTES float32
    [positions, V] buffer."""
    return max(1, SUMMARY_CHUNK_BYTES // (4 * vocab))


def _summarize_chunks(chunk_logits: Callable[[slice], torch.Tensor], leading: tuple, vocab: int,
                      device: torch.device, chunk_rows: int, *, top_m: int, tail_samples: int, temperature: float,
                      generator: Optional[torch.Generator], logp_dtype: torch.dtype,
                      uniforms: Optional[torch.Tensor], shared_vocab: Optional[int]) -> TeacherSummary:
    """The summary of positions [*leading] whose logits rows ``chunk_logits(rows)`` [rows, V] gives, ``chunk_rows``
    positions at a time: float32 working memory stays ~2 × SUMMARY_CHUNK_BYTES whatever the batch (a 4 × 4096
    batch at V = 151,936 would otherwise need 2 × 10 GB); rows are independent, so chunking changes nothing.
    (441 positions per chunk at V = 151,936: on CPU, chunks of 128-512 positions ran no slower than 1,766.)"""
    shared = vocab if shared_vocab is None else shared_vocab
    if not 1 <= shared <= vocab:
        raise ValueError(f"shared_vocab must be in [1, vocab={vocab}] (or None: every row), got {shared_vocab}")
    if not 1 <= top_m <= shared:
        raise ValueError(f"top_m must be in [1, {shared}] (the vocabulary's ids), got {top_m}")
    if top_m == shared < vocab:
        raise ValueError(f"top_m = shared_vocab = {shared} leaves no shared id beyond the top M to carry the mass of "
                         f"the {vocab - shared} padding rows: lower top_m")
    if tail_samples < 0:
        raise ValueError(f"tail_samples must be >= 0, got {tail_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logp_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"logp_dtype must be torch.float16 or torch.float32, got {logp_dtype}")
    if uniforms is not None and tuple(uniforms.shape) != (*leading, tail_samples):
        raise ValueError(f"uniforms must have shape {(*leading, tail_samples)}, got {tuple(uniforms.shape)}")
    rows = math.prod(leading)
    if uniforms is None:
        uniforms = torch.rand(rows, tail_samples, generator=generator, device=device)
    uniforms = uniforms.reshape(rows, tail_samples).to(device, torch.float32)
    chunks = []
    for start in range(0, rows, chunk_rows):
        logits = chunk_logits(slice(start, start + chunk_rows))
        chunk = _summarize_rows(logits, uniforms[start:start + chunk_rows], top_m, temperature, shared)
        if isinstance(chunk, int):
            raise _non_finite_error(logits[chunk], start + chunk, leading)
        chunks.append(chunk)
    top_logp, top_ids, rest_logmass, tail_ids, tail_logp = (torch.cat(column) for column in zip(*chunks))

    def shaped(t: torch.Tensor, dtype: torch.dtype, trailing: tuple = (-1,)) -> torch.Tensor:
        return t.to(dtype).reshape(leading + trailing)

    return TeacherSummary(
        top_ids=shaped(top_ids, torch.int32),
        top_logp=shaped(top_logp, logp_dtype),
        rest_logmass=shaped(rest_logmass, torch.float32, ()),
        tail_ids=shaped(tail_ids, torch.int32),
        tail_logp=shaped(tail_logp, logp_dtype),
        temperature=float(temperature),
    )


def _summarize_rows(logits: torch.Tensor, uniforms: torch.Tensor, top_m: int, temperature: float, shared: int):
    """(top log-probs, top ids, log α_M, tail ids, tail log-probs) of logit rows [N, V] whose ids below ``shared``
    are tokens and the rest padding rows; or, if a row is not finite, that row's index."""
    logits = logits.float()
    logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    # One topk serves both the top M and, at rank M + 1, the largest far-tail log-prob (the shift below).
    ranked_logp, ranked_ids = logp[:, :shared].topk(min(top_m + 1, shared), dim=-1, sorted=True)
    not_finite = torch.isnan(ranked_logp[:, 0])  # NaN or +inf logits make their whole row NaN; topk puts NaN first
    if not_finite.any():
        return int(not_finite.nonzero()[0])
    top_logp, top_ids = ranked_logp[:, :top_m], ranked_ids[:, :top_m]
    rest = logp.scatter_(-1, top_ids, float("-inf"))  # in place: log p of the far tail only
    padding_logmass = rest[:, shared:].logsumexp(-1)  # −inf when there are no padding rows
    far_max = ranked_logp[:, top_m] if top_m < shared else torch.full_like(top_logp[:, 0], float("-inf"))
    shared_logmass, tail_ids, has_tail = _far_tail(rest[:, :shared], far_max, uniforms)
    # α_M from its members: the far tail's shared ids and the padding rows (DESIGN §2, §3).
    rest_logmass = torch.logaddexp(shared_logmass, padding_logmass)
    # Log-probs of the drawn ids from the logits (``rest`` now holds the CDF): log p_i = z_i/τ − log Z, with
    # log Z read off the top-1 id; plus log α_M − log Σ_{far shared} p (0 without padding mass), the share of the
    # padding mass the sample's id carries.
    scale = 1.0 / temperature
    log_normalizer = logits.gather(-1, top_ids[:, :1]) * scale - top_logp[:, :1]
    carried = torch.where(has_tail, rest_logmass - shared_logmass, 0.0)[:, None]
    tail_logp = torch.where(has_tail[:, None], logits.gather(-1, tail_ids) * scale - log_normalizer + carried,
                            float("-inf"))
    return top_logp, top_ids, rest_logmass, tail_ids, tail_logp


def _non_finite_error(row_logits: torch.Tensor, row: int, leading: tuple) -> "NonFiniteLogitsError":
    """The error naming position ``row`` (flat index into ``leading``) and its first NaN or +inf vocabulary entry
    (None: its logits are all −inf)."""
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), leading))
    bad = (torch.isnan(row_logits) | (row_logits == float("inf"))).nonzero()
    return NonFiniteLogitsError(position, int(bad[0]) if len(bad) else None)


def _far_tail(rest: torch.Tensor, far_max: torch.Tensor, uniforms: torch.Tensor):
    """(log α_M, tail ids, has-a-far-tail mask) from ``rest`` = log p with the top M at −inf, whose row maxima
    are ``far_max`` (−inf: empty far tail), one draw per uniform of ``uniforms`` [N, S]. Overwrites ``rest`` with
    the CDF: no [N, V] copy.

    α_M = Σ_far p is a logsumexp shifted by the row's largest far-tail log-prob (no underflow, no cancellation);
    the same shifted exponentials, summed cumulatively, are the unnormalised CDF for inverse-CDF draws from
    p_i / α_M. Targets lie in (0, total], so a zero-probability id (a flat stretch of the CDF, e.g. a top-M id)
    is never the first index reaching one. Rows with an empty far tail get α_M = 0 (log −inf) and ids 0.
    """
    vocab = rest.shape[-1]
    has_tail = far_max > float("-inf")
    shift = torch.where(has_tail, far_max, 0.0)
    cdf = rest.sub_(shift[:, None]).exp_().cumsum_(-1)
    rest_logmass = shift + cdf[:, -1].log()  # −inf where the far tail is empty
    targets = (1.0 - uniforms) * cdf[:, -1:]
    # ``rest`` is a column slice (not contiguous) when padding rows follow the shared ids.
    drawn = torch.searchsorted(cdf.contiguous(), targets.contiguous()).clamp_max(vocab - 1)
    return rest_logmass, torch.where(has_tail[:, None], drawn, 0), has_tail


def bytes_per_position(top_m: int, tail_samples: int, logp_dtype: torch.dtype = torch.float16) -> int:
    """Storage per token position: ids int32, log-probs ``logp_dtype``, rest mass float32."""
    logp_bytes = torch.finfo(logp_dtype).bits // 8
    return (top_m + tail_samples) * (4 + logp_bytes) + 4


