r"""Distillation losses in pure PyTorch: the tail-aware divergence (TAD) and its baselines.

Notation (DESIGN §2; natural logs, one token position): teacher p = softmax(z_T / τ), student
q = softmax(z_S / τ) over the vocabulary V, T_K the ids of the teacher's K largest probabilities,

    α_K = 1 − Σ_{i∈T_K} p_i      (teacher tail mass)      b_K = 1 − Σ_{i∈T_K} q_i   (student mass off T_K)
    D_KL1 = Σ_{i∈T_K} p_i (log p_i − log q_i) + α_K (log α_K − log b_K)
    α_K·D_KL2 = Σ_{i∉T_K} p_i (log p_i − log α_K − log q_i + log b_K)      (multiplied form, no 1/α_K)

and KL(p‖q) = D_KL1 + α_K·D_KL2. TAD per token is L_DIV = D_KL1 + w(X)·α_K·D_KL2 with

- ``normalize=True`` (the paper's final loss): w(X) = β / ᾱ_K(X), ᾱ_K(X) the mean of α_K over the valid
  tokens of the token's sequence X (a constant: no gradient flows through it);
- ``normalize=False`` (the paper's two-term form): w = β, so β = 1 is exactly forward KL.

Every loss returns the mean over valid tokens (``mask`` [B, T] of 0/1 or bool; None = all valid) and
accumulates in float32 (float64 inputs stay float64). Temperature τ divides both teacher and student
logits; **no τ² rescaling is applied** (scale with ``weight`` if you want Hinton's convention).

Every mass is computed from the members it sums, never as 1 − (the rest): log α_K and log b_K are
logsumexps over the ids outside T_K (T_K masked to −inf), log γ_M likewise outside the top M, and on the
summary path α_K = α_M + Σ_{ranks K+1..M} p and b_K = γ_M + Σ_{ranks K+1..M} q. The chunked path masks the top
set (T_K, or the summary's top M) before the student's log-softmax and reads log b_K (log γ_M) off its normaliser
at one id off the set (``_ChunkPlan._off_top``; the masked logsumexp where that id's logit is −inf). The
complement form 1 − Σ cancels in float32 once a confident student puts less than ~1e-6 outside T_K (at
V = 152k the float32 log-softmax normaliser alone is off by ~1e-5), which made the loss negative, wrong or NaN.

The summary path (``TeacherSummary`` of DESIGN §3, M ≥ K) splits the tail into the middle ranks
K+1..M (known exactly) and the far tail beyond M (mass α_M):

    α_K·D_KL2 = Σ_{ranks K+1..M} p_i (log p_i − log α_K − log q_i + log b_K)
              + α_M (log α_M − log α_K − log γ_M + log b_K) + α_M·F

γ_M the student mass off the teacher's top M and F = KL(far-tail teacher ‖ far-tail student), estimated
from S samples i_s ~ p restricted to ranks > M as mean_s[(log p_{i_s} − log α_M) − log q'_{i_s}], q' = q/γ_M
(unbiased in value and gradient); with S = 0 the α_M·F term is dropped.

``distill_objective`` is the training path: it takes the student's final hidden states and LM-head
weight and computes CLM + λ·divergence chunk by chunk over tokens in one pass, each chunk's loss and its
closed-form gradients in forward (``_ChunkPlan.chunk_losses_and_grad``), so that no [B·T, V] float32 tensor is
ever alive and no chunk is recomputed. The logits path above (autograd) is its reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from tailkd_ray.core.summary import FIELDS, TeacherSummary

Teacher = Union[Tensor, TeacherSummary, None]
KINDS = ("tad", "kd", "rkl", "topk", "clm")


# --------------------------------------------------------------------------------------------------
# Small numerically careful helpers
# --------------------------------------------------------------------------------------------------
def log_mass_outside(logq: Tensor, ids: Tensor) -> Tensor:
    """log Σ_{i∉ids} q_i for log-probs ``logq`` [N, V] and ids [N, K]: a logsumexp over the complement (``ids``
    masked to −inf), exact for any mass down to float underflow of the log itself, unlike log(1 − Σ_{ids} q)."""
    return logq.scatter(-1, ids, float("-inf")).logsumexp(-1)


def teacher_logits_over(teacher_logits: Tensor, shared_vocab: int, student_rows: int) -> Tensor:
    """Full teacher logits [..., V_T] as logits over the student's rows [..., V_S] (padded vocabularies, DESIGN §3):
    the shared ids' logits (ids < ``shared_vocab``, the tokenizer's length) and −inf on every other row, so the
    teacher's padding rows leave its softmax (their mass spread over the shared ids in proportion) and the
    student's padding rows get probability 0, which the losses drive the student's mass on them towards. The
    logits themselves when every row is shared."""
    if teacher_logits.shape[-1] == shared_vocab == student_rows:
        return teacher_logits
    return F.pad(teacher_logits[..., :shared_vocab], (0, student_rows - shared_vocab), value=float("-inf"))


def _weighted(p: Tensor, value: Tensor) -> Tensor:
    """p · value with 0 · (anything) = 0, so zero-probability teacher entries (log p = −inf) add nothing."""
    return torch.where(p > 0, p * value, torch.zeros((), dtype=value.dtype, device=value.device))


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _log_softmax(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """log softmax(logits / τ) in ``dtype``; τ = 1 (the usual case) skips the division, a pass over [N, V] each
    way (forward and backward)."""
    logits = logits.to(dtype)
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


# --------------------------------------------------------------------------------------------------
# Per-token terms. Inputs are flat: student log-probs [N, V]; teacher [N, V] logits or a flat summary.
# Each returns (div [N], tail [N] or None, alpha [N] or None): L_DIV = div + w·tail for TAD.
# --------------------------------------------------------------------------------------------------
def _d_kl1(logp_top: Tensor, logq_top: Tensor, log_alpha: Tensor, log_b: Tensor) -> Tensor:
    """D_KL1 over the K + 1 categories (top-K ids and the residual bucket)."""
    top = _weighted(logp_top.exp(), logp_top - logq_top).sum(-1)
    alpha = log_alpha.exp()
    return top + _weighted(alpha, log_alpha - log_b)


def _tad_terms_exact(logq: Tensor, teacher_logits: Tensor, k: int, temperature: float):
    logp = _log_softmax(teacher_logits, temperature, logq.dtype)
    top_ids = teacher_logits.topk(k, dim=-1, sorted=False).indices
    logp_top, logq_top = logp.gather(-1, top_ids), logq.gather(-1, top_ids)
    p_tail = logp.exp().scatter(-1, top_ids, 0.0)  # p with T_K zeroed: sums below run over the tail
    # Both masses from their own members, the same way, so that they agree exactly when q = p.
    log_alpha, log_b = log_mass_outside(logp, top_ids), log_mass_outside(logq, top_ids)
    alpha = log_alpha.exp()
    # α_K·D_KL2 = Σ_{i∉T_K} p_i (log p_i − log q_i) − α_K (log α_K − log b_K)   (multiplied form)
    tail = _weighted(p_tail, logp - logq).sum(-1) - _weighted(alpha, log_alpha - log_b)
    return _d_kl1(logp_top, logq_top, log_alpha, log_b), tail, alpha


class _SummaryTerms(NamedTuple):
    d_kl1: Tensor  # [N]
    tail: Tensor  # [N] α_K·D_KL2 (middle ranks, far tail, α_M·F)
    log_alpha: Tensor  # [N] log α_K
    log_b: Tensor  # [N] log b_K


def _summary_terms(logq_top_m: Tensor, logq_off_samples: Tensor, log_gamma_m: Tensor, summary: TeacherSummary,
                   k: int) -> _SummaryTerms:
    """TAD's terms from a summary, given the student's log q at the top-M ids [N, M], log q' = log q − log γ_M
    (its far tail renormalised) at the tail samples [N, S] and log γ_M [N] (student mass off the top M); shared
    by the logits path and the chunked path."""
    dtype = logq_top_m.dtype
    top_logp = summary.top_logp.to(dtype)
    logp_k, logq_k = top_logp[:, :k], logq_top_m[:, :k]
    logp_mid, logq_mid = top_logp[:, k:], logq_top_m[:, k:]
    log_alpha_m = summary.rest_logmass.to(dtype)
    # α_K = Σ_{ranks K+1..M} p + α_M, summed in log space: exact, no cancellation.
    log_alpha = torch.cat([logp_mid, log_alpha_m[:, None]], dim=-1).logsumexp(-1)
    # b_K = γ_M + Σ_{ranks K+1..M} q: from its members, like α_K.
    log_b = torch.cat([logq_mid, log_gamma_m[:, None]], dim=-1).logsumexp(-1)
    mid = _weighted(logp_mid.exp(), logp_mid - logq_mid - (log_alpha - log_b)[:, None]).sum(-1)
    far = log_alpha_m - log_alpha - log_gamma_m + log_b
    if summary.tail_samples:
        tail_logp = summary.tail_logp.to(dtype)
        far = far + ((tail_logp - log_alpha_m[:, None]) - logq_off_samples).mean(-1)
    tail = mid + _weighted(log_alpha_m.exp(), far)
    return _SummaryTerms(_d_kl1(logp_k, logq_k, log_alpha, log_b), tail, log_alpha, log_b)


def _tad_terms_summary(logq: Tensor, summary: TeacherSummary, k: int):
    m = summary.top_m
    # One gather for the top-M ids and the tail samples: its backward fills and scatters one [N, V] buffer, not two.
    logq_drawn = logq.gather(-1, torch.cat([summary.top_ids, summary.tail_ids], dim=-1).long())
    if m < logq.shape[-1]:
        log_gamma_m = log_mass_outside(logq, summary.top_ids.long())
    else:  # M = V: γ_M = 0 and α_M = 0 zeroes its terms; a logsumexp over nothing would give NaN gradients
        log_gamma_m = torch.full_like(logq[:, 0], float("-inf"))
    terms = _summary_terms(logq_drawn[:, :m], logq_drawn[:, m:] - log_gamma_m[:, None], log_gamma_m, summary, k)
    return terms.d_kl1, terms.tail, terms.log_alpha.exp()


def _renormalised_top(logp_top: Tensor, logq_top: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(KL(p̂‖q̂), p̂, q̂) with p̂, q̂ = p, q restricted to T_K and renormalised, from log p and log q on T_K."""
    log_p_hat = logp_top - logp_top.logsumexp(-1, keepdim=True)
    log_q_hat = logq_top - logq_top.logsumexp(-1, keepdim=True)
    p_hat = log_p_hat.exp()
    return _weighted(p_hat, log_p_hat - log_q_hat).sum(-1), p_hat, log_q_hat.exp()


def _topk_terms(logq: Tensor, logp_top: Tensor, top_ids: Tensor) -> Tensor:
    """KL between p and q renormalised on T_K: Σ p̂ (log p̂ − log q̂), p̂ = p/(1−α_K), q̂ = q/(1−b_K)."""
    return _renormalised_top(logp_top, logq.gather(-1, top_ids))[0]


def _token_terms(logq: Tensor, teacher: Teacher, *, kind: str, k: int, temperature: float):
    """Per-token divergence terms for ``kind``; see the module docstring for the formulas."""
    if kind == "clm":
        return torch.zeros_like(logq[:, 0]), None, None
    if isinstance(teacher, TeacherSummary):
        if kind == "tad":
            return _tad_terms_summary(logq, teacher, k)
        if kind == "kd":  # forward KL from a summary = D_KL1 at K = M plus α_M·F (the far-tail estimate)
            div, tail, _ = _tad_terms_summary(logq, teacher, teacher.top_m)
            return div + tail, None, None
        if kind == "topk":
            return _topk_terms(logq, teacher.top_logp[:, :k].to(logq.dtype), teacher.top_ids[:, :k].long()), None, None
        raise ValueError(f"loss kind {kind!r} needs full teacher logits, not a TeacherSummary "
                         f"(set summary.top_m: null for a co-located teacher)")
    if kind == "tad":
        return _tad_terms_exact(logq, teacher, k, temperature)
    logp = _log_softmax(teacher, temperature, logq.dtype)
    if kind == "kd":
        return _weighted(logp.exp(), logp - logq).sum(-1), None, None
    if kind == "rkl":
        return (logq.exp() * (logq - logp)).sum(-1), None, None
    if kind == "topk":
        logp_top, top_ids = logp.topk(k, dim=-1, sorted=False)
        return _topk_terms(logq, logp_top, top_ids), None, None
    raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------------
# Validation, flattening and reduction (shared by the logits and the chunked paths)
# --------------------------------------------------------------------------------------------------
def _check_args(kind: str, k: int, beta: float, temperature: float, vocab: int, teacher: Teacher) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(KINDS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got k={k!r}")
    if kind in ("tad", "topk") and k >= vocab:
        raise ValueError(f"k={k} must be smaller than the vocabulary size {vocab}")
    if not beta >= 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got beta={beta!r}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    if kind != "clm" and teacher is None:
        raise ValueError(f"loss kind {kind!r} needs a teacher (logits or a TeacherSummary); got None")
    if isinstance(teacher, TeacherSummary):
        if teacher.temperature is not None and not math.isclose(teacher.temperature, temperature):
            raise ValueError(f"the summary was scored at temperature {teacher.temperature:g} but the loss runs at "
                             f"temperature={temperature:g}: the teacher side cannot be re-tempered from a summary; "
                             f"use the scoring temperature or re-score the teacher at {temperature:g}")
        if kind in ("tad", "topk") and k > teacher.top_m:
            raise ValueError(f"k={k} exceeds the summary's top_m={teacher.top_m}: a summary can train any "
                             f"K <= M; re-score with a larger summary.top_m or lower loss.k")


def _check_shapes(student_shape: torch.Size, teacher: Teacher, mask: Optional[Tensor]) -> tuple[int, int]:
    if len(student_shape) != 3 and len(student_shape) != 2:
        raise ValueError(f"expected student [B, T, V] logits or [B, T, d] hidden states, got shape {tuple(student_shape)}")
    b, t = student_shape[0], student_shape[1]
    if isinstance(teacher, TeacherSummary):
        if tuple(teacher.shape) != (b, t):
            raise ValueError(f"summary positions {tuple(teacher.shape)} do not match the student's [B, T] = {(b, t)}")
    elif teacher is not None and tuple(teacher.shape[:2]) != (b, t):
        raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match the student's [B, T] = {(b, t)}")
    if mask is not None and tuple(mask.shape) != (b, t):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match [B, T] = {(b, t)}")
    return b, t


def _valid_index(mask: Optional[Tensor], b: int, t: int, device) -> Tensor:
    """Flat indices (into B·T) of the valid positions."""
    if mask is None:
        return torch.arange(b * t, device=device)
    return mask.reshape(-1).to(torch.bool).nonzero().squeeze(-1)


def _flatten(teacher: Teacher) -> Teacher:
    """[B, T, ...] teacher -> [B·T, ...] (views when contiguous)."""
    if teacher is None:
        return None
    if isinstance(teacher, TeacherSummary):
        return teacher.flatten_positions()
    return teacher.reshape(-1, teacher.shape[-1])


def _take(teacher: Teacher, index: Tensor) -> Teacher:
    """Select flat positions of the teacher (logits [B, T, V] or a summary)."""
    flat = _flatten(teacher)
    if flat is None:
        return None
    return flat.map(lambda f: f[index]) if isinstance(flat, TeacherSummary) else flat[index]


def _sequence_index(index: Tensor, b: int, t: int, position_ids: Optional[Tensor]) -> tuple[Tensor, int]:
    """(the sequence of each valid token ``index`` into [B·T], the number of sequences): rows, or with
    ``position_ids`` the runs of positions that start at 0 (packed samples; padding runs hold no valid token)."""
    if position_ids is None:
        return torch.div(index, t, rounding_mode="floor"), b
    starts = position_ids.reshape(b, t) == 0
    starts[:, 0] = True  # a row starts a sequence whatever its first position
    sequence = starts.reshape(-1).cumsum(0) - 1
    return sequence[index.to(sequence.device)], int(sequence[-1]) + 1


def _tail_weights(alpha: Tensor, seq_index: Tensor, num_seqs: int, *, beta: float, normalize: bool) -> Tensor:
    """w per token: β / ᾱ_K(X) (sequence-normalised, no gradient) or β."""
    if not normalize:
        return torch.full_like(alpha, beta)
    alpha = alpha.detach()
    sums = torch.zeros(num_seqs, dtype=alpha.dtype, device=alpha.device).index_add_(0, seq_index, alpha)
    counts = torch.zeros(num_seqs, dtype=alpha.dtype, device=alpha.device).index_add_(0, seq_index, torch.ones_like(alpha))
    mean_alpha = sums / counts.clamp_min(1)
    # ᾱ = 0 only if every α_K of the sequence is 0, and then every tail term is 0 as well.
    return beta / mean_alpha.clamp_min(torch.finfo(alpha.dtype).tiny)[seq_index]


def _divergence(div: Tensor, tail: Optional[Tensor], alpha: Optional[Tensor], seq_index: Tensor,
                num_seqs: int, *, beta: float, normalize: bool) -> Tensor:
    """Per-token L_DIV from the per-token terms."""
    if tail is None:
        return div
    return div + _tail_weights(alpha, seq_index, num_seqs, beta=beta, normalize=normalize) * tail


def _mean(values: Tensor) -> Tensor:
    """Mean over valid tokens; 0 (still attached to the graph) when there are none."""
    return values.sum() / max(values.numel(), 1)


# --------------------------------------------------------------------------------------------------
# Logits path: the public per-loss functions (full student logits [B, T, V])
# --------------------------------------------------------------------------------------------------
def divergence_loss(student_logits: Tensor, teacher: Teacher, *, kind: str, k: int = 10, beta: float = 1.0,
                    mask: Optional[Tensor] = None, temperature: float = 1.0, normalize: bool = True) -> Tensor:
    """Mean over valid tokens of the per-token divergence ``kind`` between teacher and student."""
    b, t = _check_shapes(student_logits.shape, teacher, mask)
    vocab = student_logits.shape[-1]
    _check_args(kind, k, beta, temperature, vocab, teacher)
    if isinstance(teacher, Tensor) and teacher.shape[-1] != vocab:
        raise ValueError(f"teacher vocabulary {teacher.shape[-1]} != student vocabulary {vocab}")
    index = _valid_index(mask, b, t, student_logits.device)
    logits = student_logits.reshape(-1, vocab)[index]
    logq = _log_softmax(logits, temperature, _compute_dtype(logits))
    div, tail, alpha = _token_terms(logq, _take(teacher, index), kind=kind, k=k, temperature=temperature)
    return _mean(_divergence(div, tail, alpha, torch.div(index, t, rounding_mode="floor"), b,
                             beta=beta, normalize=normalize))


def tad_loss(student_logits: Tensor, teacher_logits: Tensor, *, k: int, beta: float, mask: Optional[Tensor] = None,
             temperature: float = 1.0, normalize: bool = True) -> Tensor:
    """Exact TAD from full teacher logits: mean over valid tokens of D_KL1 + w(X)·α_K·D_KL2."""
    return divergence_loss(student_logits, teacher_logits, kind="tad", k=k, beta=beta, mask=mask,
                           temperature=temperature, normalize=normalize)


def tad_loss_from_summary(student_logits: Tensor, summary: TeacherSummary, *, k: int, beta: float,
                          mask: Optional[Tensor] = None, temperature: float = 1.0, normalize: bool = True) -> Tensor:
    """TAD from a ``TeacherSummary`` (the summary holds teacher log-probs already at its scoring τ;
    ``temperature`` applies to the student and must equal the summary's recorded τ, when it has one).
    Equals ``tad_loss`` when M = V (or α_M = 0)."""
    return divergence_loss(student_logits, summary, kind="tad", k=k, beta=beta, mask=mask,
                           temperature=temperature, normalize=normalize)


def forward_kl_loss(student_logits: Tensor, teacher: Union[Tensor, TeacherSummary], *, mask: Optional[Tensor] = None,
                    temperature: float = 1.0) -> Tensor:
    """Vanilla KD: KL(p‖q) = Σ p (log p − log q) (from a summary: D_KL1 at K = M plus the α_M·F estimate)."""
    return divergence_loss(student_logits, teacher, kind="kd", mask=mask, temperature=temperature)


def reverse_kl_loss(student_logits: Tensor, teacher_logits: Tensor, *, mask: Optional[Tensor] = None,
                    temperature: float = 1.0) -> Tensor:
    """Reverse KL: KL(q‖p) = Σ q (log q − log p). Needs full teacher logits."""
    return divergence_loss(student_logits, teacher_logits, kind="rkl", mask=mask, temperature=temperature)


def topk_kl_loss(student_logits: Tensor, teacher: Union[Tensor, TeacherSummary], *, k: int,
                 mask: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """Top-K renormalised KL (tail dropped): KL(p̂‖q̂) with p̂, q̂ = p, q restricted to T_K and renormalised."""
    return divergence_loss(student_logits, teacher, kind="topk", k=k, mask=mask, temperature=temperature)


def clm_loss(student_logits: Tensor, targets: Tensor, *, mask: Optional[Tensor] = None) -> Tensor:
    """Causal-LM cross-entropy, mean over valid tokens (targets [B, T] are the next tokens)."""
    b, t = _check_shapes(student_logits.shape, None, mask)
    index = _valid_index(mask, b, t, student_logits.device)
    logits = student_logits.reshape(-1, student_logits.shape[-1])[index]
    return _mean(F.cross_entropy(logits.to(_compute_dtype(logits)), targets.reshape(-1)[index], reduction="none"))


# --------------------------------------------------------------------------------------------------
# Chunked training path: hidden states + LM head, O(chunk × V) peak memory, one pass (no recompute)
# --------------------------------------------------------------------------------------------------
@dataclass
class ObjectiveOutput:
    """``loss`` (with grad) = mean over valid tokens of CLM + weight·div; the rest are for logging."""

    loss: Tensor
    clm: Tensor  # detached mean CLM
    div: Tensor  # detached mean divergence
    tokens: int


# Below this a row's factor of q in a gradient is too small to divide by (√tiny: 1e-19 in float32; its reciprocal
# stays far from overflow): such rows are written as they are (``_row_scale``).
def _divisor_floor(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).tiny)


_TOPK_BLOCK = 128  # ids per block of ``_top_k``


def _top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, ids) of each row's k largest logits in descending order: ``logits.topk(k)`` up to the order of ties.

    On CPU ``topk`` over a 32k–152k row costs several elementwise passes. The k largest values lie in the k blocks
    (of ``_TOPK_BLOCK`` consecutive ids) with the largest maxima, so one pass of block maxima and a ``topk`` over
    k blocks' worth of candidates find them."""
    n, vocab = logits.shape
    blocks = vocab // _TOPK_BLOCK
    if blocks < 4 * k:
        return logits.topk(k, dim=-1)
    covered = blocks * _TOPK_BLOCK
    tiles = logits[:, :covered].unflatten(-1, (blocks, _TOPK_BLOCK))
    best = tiles.amax(-1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    candidates = tiles.gather(1, best[:, :, None].expand(-1, -1, _TOPK_BLOCK)).flatten(1)
    ids = (best[:, :, None] * _TOPK_BLOCK + torch.arange(_TOPK_BLOCK, device=logits.device)).flatten(1)
    if covered < vocab:  # the last, partial block joins the candidates whole
        candidates = torch.cat([candidates, logits[:, covered:]], dim=-1)
        ids = torch.cat([ids, torch.arange(covered, vocab, device=logits.device).expand(n, -1)], dim=-1)
    values, picked = candidates.topk(k, dim=-1)
    return values, ids.gather(-1, picked)


def _row_dot_(p: Tensor, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Σ_j p_j x_j per row, the products written to ``out`` (default: over ``x``); 0 · (±inf) = 0 as in
    ``_weighted`` (a zero-probability entry with log p = −inf adds nothing): rows whose sum is NaN are redone."""
    products = torch.mul(p, x, out=x if out is None else out)
    dots = products.sum(-1)
    bad = dots.isnan().nonzero().squeeze(-1)
    if bad.numel():
        dots[bad] = torch.where(p[bad] > 0, products[bad], torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)
    return dots


def _mass_ratio(log_num: Tensor, log_den: Tensor) -> Tensor:
    """exp(log_num − log_den), 0 where the numerator's mass is 0 (also when both are: −inf − (−inf))."""
    return torch.where(log_num > float("-inf"), (log_num - log_den).exp(), torch.zeros((), dtype=log_num.dtype,
                                                                                         device=log_num.device))


def _row_scale(coef: Tensor) -> tuple[Tensor, Tensor]:
    """(s, explicit rows): the per-row factor ``coef`` of q in a gradient, to fold out of the dense pass (the caller
    scales the matmuls' [n, d] sides by it), and the rows that cannot fold it, whose factor is 0 or too small to
    divide by; s = 1 there."""
    explicit = coef.abs() < _divisor_floor(coef.dtype)
    return torch.where(explicit, torch.ones_like(coef), coef), explicit.nonzero().squeeze(-1)


def _combine_(q: Tensor, q_coef: float, p: Tensor, p_coef: float) -> Tensor:
    """q ← q_coef·q − p_coef·p in place; one pass (lerp) when q_coef − p_coef = 1."""
    if q_coef - p_coef == 1.0:
        return q.lerp_(p, -p_coef)
    return q.mul_(q_coef).sub_(p, alpha=p_coef)


def _scaled_into(out: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """out ← logits / τ in ``out``'s dtype (converted first, as ``_log_softmax`` does)."""
    out.copy_(logits)
    return out if temperature == 1.0 else out.div_(temperature)


def _exp_into(out: Tensor, logits: Tensor, temperature: float, shift: Optional[Tensor]) -> Tensor:
    """out ← exp(logits / τ − shift) in ``out``'s dtype (shift [n, 1] or None for 0), in as few passes as the case
    allows (one at τ = 1)."""
    if temperature == 1.0 and shift is not None:
        return torch.sub(logits, shift, out=out).exp_()
    if temperature == 1.0 and logits.dtype == out.dtype:
        return torch.exp(logits, out=out)
    scaled = _scaled_into(out, logits, temperature)
    return (scaled if shift is None else scaled.sub_(shift)).exp_()


def _exp_floor_log(dtype: torch.dtype) -> float:
    """Above this largest exponent a row's exp-sum needs no shift at the bottom: members down to √tiny times the
    largest stay normal floats (those below add < V·√tiny relative)."""
    return 0.5 * math.log(torch.finfo(dtype).tiny)


def _exp_ceiling_log(dtype: torch.dtype, vocab: int) -> float:
    """Below this largest exponent a row's exp-sum over ``vocab`` members cannot overflow."""
    return math.log(torch.finfo(dtype).max) - math.log(vocab) - 1.0


_CACHE_BLOCK_BYTES = 1 << 20  # a [rows, V] block this size stays in a CPU core's L2 cache between two passes


class _Workspace:
    """[chunk, V] buffers by (role, dtype), allocated once and reused by every chunk: a fresh [chunk, V] tensor per
    step costs its page faults, about as much as an elementwise pass over it on CPU."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, role: str, n: int, dtype: torch.dtype) -> Tensor:
        """The first ``n`` rows (contiguous) of the ``role`` buffer (allocated at the first request's size)."""
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.shape[0] < n:
            buffer = self._buffers[role, dtype] = torch.empty(n, self.vocab, dtype=dtype, device=self.device)
        return buffer[:n]

    def block_rows(self, dtype: torch.dtype) -> int:
        """Rows per block of a pass whose [rows, V] intermediate is written and read back at once: an L2-sized
        block on CPU (about a third less time than through a [chunk, V] buffer), the whole chunk elsewhere."""
        if self.device.type != "cpu":
            return self.rows
        return max(1, _CACHE_BLOCK_BYTES // (self.vocab * torch.finfo(dtype).bits // 8))


class _OffTop(NamedTuple):
    """The student's side beyond its softmax over the ids off a top set (``_ChunkPlan._off_top``): T_K for exact
    TAD, the summary's top M for TAD and KD from a summary."""

    ids: Tensor  # [n, K] the top set (T_K or the top M)
    logq_top: Tensor  # [n, K] log q on it
    log_b: Tensor  # [n] log of the student's mass off it (log b_K, or log γ_M)

    def log_q_at(self, logq_off: Tensor, ids: Tensor) -> Tensor:
        """log q [n] at one id per row (``ids`` [n, 1]), given log q' (``logq_off``) off the top set."""
        hit = self.ids == ids
        on_top = self.logq_top.masked_fill(~hit, float("-inf")).amax(-1)
        return torch.where(hit.any(-1), on_top, logq_off.gather(-1, ids).squeeze(-1) + self.log_b)


@dataclass
class _ChunkPlan:
    """What every chunk of the objective needs besides the student's hidden states and LM head: flat (valid
    positions only) targets, the teacher, and TAD's teacher-only inputs from the pre-pass (``tail_pre_pass``)."""

    targets: Tensor  # [N]
    teacher: Teacher  # flat over all B·T positions (views): [B·T, V] logits, a flat TeacherSummary, or None
    positions: Optional[Tensor]  # [N]: the valid positions' rows of ``teacher``; None: all rows, in order
    kind: str
    k: int
    temperature: float
    weight: float
    chunk_tokens: int
    work: _Workspace
    tail_weights: Optional[Tensor] = None  # [N] w (TAD) or None (w = 1)
    log_alpha: Optional[Tensor] = None  # [N] log α_K (TAD)
    top_ids: Optional[Tensor] = None  # [N, K + 1] int32 (O(N) memory): T_K, then the (K+1)-th largest's id
    teacher_lse: Optional[Tensor] = None  # [N] log Σ_i exp(z_T,i / τ) (TAD from full logits)
    teacher_log_rest: Optional[Tensor] = None  # [N] log Σ_{i∉T_K} exp(z_T,i / τ) (TAD from full logits)

    def chunks(self, count: int):
        return (slice(start, start + self.chunk_tokens) for start in range(0, count, self.chunk_tokens))

    def teacher_rows(self, part: slice) -> Union[Tensor, TeacherSummary]:
        """The teacher at the chunk's positions: a view, or (masked) rows copied into the "p" buffer."""
        if isinstance(self.teacher, TeacherSummary):
            rows = part if self.positions is None else self.positions[part]
            return self.teacher.map(lambda field: field[rows])
        if self.positions is None:
            return self.teacher[part]
        out = self.work.get("p", self.targets[part].shape[0], self.teacher.dtype)
        return torch.index_select(self.teacher, 0, self.positions[part], out=out)

    def tail_pre_pass(self, count: int, dtype: torch.dtype) -> Tensor:
        """log α_K [N] of every valid position (TAD; β(X) needs it before any chunk), in the student's compute
        ``dtype``; for full logits also T_K with the (K+1)-th id and the teacher's log-normaliser (for the chunks)."""
        if isinstance(self.teacher, TeacherSummary):
            rows = slice(None) if self.positions is None else self.positions
            top_logp, rest = self.teacher.top_logp[rows].to(dtype), self.teacher.rest_logmass[rows].to(dtype)
            return torch.cat([top_logp[:, self.k:], rest[:, None]], dim=-1).logsumexp(-1)
        stats = [self._exact_tail_stats(part, dtype) for part in self.chunks(count)]
        self.top_ids, self.teacher_log_rest, self.teacher_lse = (torch.cat(column) for column in zip(*stats))
        return self.teacher_log_rest - self.teacher_lse

    def _exact_tail_stats(self, part: slice, dtype: torch.dtype):
        """(T_K and the (K+1)-th id, log Σ_{i∉T_K} exp(z_i/τ), log Σ_i exp(z_i/τ)) of a chunk of teacher logits z,
        the first (hence α_K) from its members: Σ_{i∉T_K}
        exp(z_i/τ − c), c = 0 when the largest logit/τ outside T_K (the (K+1)-th largest) keeps that sum inside the
        float range, else c = that logit/τ (the sum is then ≥ 1: no underflow, no overflow)."""
        rows = self.teacher_rows(part)
        n = rows.shape[0]
        values, ids = _top_k(rows, self.k + 1)
        scaled = values.to(dtype) / self.temperature
        top_ids, rest_max = ids[:, :self.k], scaled[:, self.k]
        shift = torch.where(rest_max.isfinite(), rest_max, torch.zeros_like(rest_max))
        # Unshifted when every row's sum is safe without the shift (the usual case): one pass fewer.
        shifted = not bool(((shift > _exp_floor_log(dtype)) & (shift < _exp_ceiling_log(dtype, rows.shape[-1]))).all())
        block = self.work.block_rows(dtype)
        scratch = self.work.get("block", min(block, n), dtype)
        rest = torch.empty_like(rest_max)
        for start in range(0, n, block):  # block by block: the exps are summed while still in cache
            rows_in = slice(start, start + block)
            exps = _exp_into(scratch[:rows[rows_in].shape[0]], rows[rows_in], self.temperature,
                             shift[rows_in, None] if shifted else None)
            torch.sum(exps.scatter_(-1, top_ids[rows_in], 0.0), -1, out=rest[rows_in])
        log_rest = rest.log()
        if shifted:
            log_rest += shift
        log_norm = torch.logaddexp(log_rest, scaled[:, :self.k].logsumexp(-1))
        return ids.int(), log_rest, log_norm

    def chunk_losses_and_grad(self, logits: Tensor, part: slice) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Per-token (CLM, L_DIV) of the chunk ``part`` and d(Σ CLM + weight·Σ L_DIV)/d logits, in closed form (no
        autograd graph): (clm, div, X, s), the gradient s[:, None]·X with X in a workspace buffer and s [n] the
        per-row factor that TAD folds out of the dense pass (None: 1), for the caller to apply to the matmuls'
        [n, d] sides.

        With q = softmax(z/τ), q¹ = softmax(z) and G = ∂L_DIV/∂(z/τ) per token, the gradient is
        q¹ − onehot(y) + (weight/τ)·G. Every G is q − (teacher weights) plus, for TAD, the chain through log b_K and
        log γ_M (∂ log b_K/∂ log q_i = q_i/b_K off T_K): kd G = q − p; rkl G = q (log q − log p − KL(q‖p));
        topk G = q̂ − p̂ on T_K, 0 elsewhere; TAD and KD from a summary: ``_summary_divergence``; exact TAD:
        ``_exact_tad``. At τ = 1 q¹ = q and each kind writes q + weight·G over q in place (one or two passes).
        """
        n, tau = logits.shape[0], self.temperature
        dtype = _compute_dtype(logits)
        targets = self.targets[part, None]
        clm_q = None
        if tau != 1.0:  # CLM is always at τ = 1: its own softmax (before exact TAD masks T_K below)
            clm_q = torch.log_softmax(logits, -1, dtype=dtype, out=self.work.get("clm", n, dtype))
            clm = -clm_q.gather(-1, targets).squeeze(-1)
            clm_q.exp_()
        # TAD and KD (exact TAD; from a summary): the student's softmax over the ids off the top set (T_K, or the
        # top M; their logits masked to −inf), whose normaliser gives b_K or γ_M from its members without a pass to
        # sum them (``_off_top``).
        summary = self.teacher_rows(part) if isinstance(self.teacher, TeacherSummary) else None
        top = self._top_set(part, summary)
        if top is not None:
            z_top = logits.gather(-1, top).to(dtype)
            logits.scatter_(-1, top, float("-inf"))
            read = self._read_back_ids(part, logits, summary)
            picked = torch.cat([z_top, logits.gather(-1, read).to(dtype)], dim=-1)
            picked = picked if tau == 1.0 else picked / tau
        if tau == 1.0:
            logq = torch.log_softmax(logits, -1, dtype=dtype, out=self.work.get("logq", n, dtype))
            q = torch.exp(logq, out=self.work.get("q", n, dtype))
        else:
            scaled = _scaled_into(self.work.get("q", n, dtype), logits, tau)
            logq = torch.log_softmax(scaled, -1, out=self.work.get("logq", n, dtype))
            q = torch.exp(logq, out=scaled)
        student = None if top is None else self._off_top(logits, logq, q, top, read, picked)
        if clm_q is None:
            clm = -(logq.gather(-1, targets).squeeze(-1) if student is None else student.log_q_at(logq, targets))
        # The logits are spent: their buffer holds the teacher's log-probs next (when the dtypes agree).
        spare = logits if logits.dtype == dtype else self.work.get("teacher", n, dtype)
        div, row_scale = self._divergence(logq, q, 1.0 if clm_q is None else 0.0, part, spare, student, summary)
        unit = torch.ones_like(clm) if row_scale is None else row_scale.reciprocal()  # 1 / s: CLM's share of X
        if clm_q is not None:
            q.addcmul_(clm_q, unit[:, None])
        q.scatter_add_(-1, targets, -unit[:, None])
        return clm, div, q, row_scale

    def _top_set(self, part: slice, summary: Optional[TeacherSummary]) -> Optional[Tensor]:
        """The ids [n, K] whose student logits the chunk masks before its log-softmax: T_K (exact TAD), the top M
        (TAD and KD from a summary), or None (the other kinds use the plain softmax)."""
        if self.top_ids is not None:
            return self.top_ids[part, :self.k].long()
        if summary is not None and self.kind in ("tad", "kd"):
            return summary.top_ids.long()
        return None

    def _read_back_ids(self, part: slice, masked_logits: Tensor, summary: Optional[TeacherSummary]) -> Tensor:
        """One id [n, 1] per row off the top set, where the masked log-softmax's normaliser is read back: exact TAD's
        (K+1)-th teacher id; from a summary the candidate of largest student logit among the tail samples and the
        ids 0..M (at least one of which is off the top M; a larger log q' there reads back with less rounding).
        Masked ids have logit −inf there, so a row with no finite candidate falls back in ``_off_top``."""
        if summary is None:
            return self.top_ids[part, self.k:].long()
        n, vocab = masked_logits.shape
        first = torch.arange(min(summary.top_m + 1, vocab), device=masked_logits.device).expand(n, -1)
        candidates = torch.cat([summary.tail_ids.long(), first], dim=-1)
        return candidates.gather(-1, masked_logits.gather(-1, candidates).argmax(-1, keepdim=True))

    def _divergence(self, logq: Tensor, q: Tensor, clm_share: float, part: slice, spare: Tensor,
                    student: Optional[_OffTop], summary: Optional[TeacherSummary]) -> tuple[Tensor, Optional[Tensor]]:
        """(L_DIV per token, s or None); overwrites q with (clm_share·q + (weight/τ)·G) / s (s = 1 when None);
        TAD's and KD's q and log q are over the ids off the top set, with ``student`` (``_off_top``); ``summary``
        the chunk's summary rows (None for full logits)."""
        scale, tau, n = self.weight / self.temperature, self.temperature, q.shape[0]
        if self.kind == "clm":
            if not clm_share:  # τ ≠ 1: the gradient is CLM's own softmax, added by the caller
                q.zero_()
            return torch.zeros_like(q[:, 0]), None
        if summary is not None:
            if self.kind == "topk":
                return self._topk(logq, q, clm_share, summary.top_logp[:, :self.k].to(q.dtype),
                                  summary.top_ids[:, :self.k].long())
            return self._summary_divergence(logq, q, clm_share, summary, part, student)
        teacher = self.teacher_rows(part)
        if self.kind == "topk":  # T_K and log p̂ from the logits alone: the normaliser cancels
            values, ids = _top_k(teacher, self.k)
            return self._topk(logq, q, clm_share, values.to(q.dtype) / tau, ids)
        p_buffer = self.work.get("p", n, q.dtype)
        if self.kind == "tad":
            return self._exact_tad(logq, q, clm_share, teacher, part, spare, p_buffer, student)
        if tau == 1.0:
            logp = torch.log_softmax(teacher, -1, dtype=q.dtype, out=spare)
        else:
            logp = torch.log_softmax(_scaled_into(p_buffer, teacher, tau), -1, out=spare)
        if self.kind == "kd":
            p = torch.exp(logp, out=p_buffer)
            div = _row_dot_(p, logp.sub_(logq))  # Σ p (log p − log q)
            _combine_(q, clm_share + scale, p, scale)  # G = q − p
            return div, None
        # rkl: KL(q‖p) = −Σ q (log p − log q); G = −q (log p − log q + KL(q‖p))
        diff = logp.sub_(logq)
        div = -_row_dot_(q, diff, out=p_buffer)
        q.mul_(diff.add_(div[:, None]).mul_(-scale).add_(clm_share))
        return div, None

    def _topk(self, logq: Tensor, q: Tensor, clm_share: float, logp_top: Tensor, ids: Tensor) -> tuple[Tensor, None]:
        """Top-K renormalised KL; G = q̂ − p̂ on T_K, 0 elsewhere."""
        div, p_hat, q_hat = _renormalised_top(logp_top, logq.gather(-1, ids))
        if not clm_share:
            q.zero_()
        q.scatter_add_(-1, ids, (self.weight / self.temperature) * (q_hat - p_hat))
        return div, None

    def _off_top(self, logits: Tensor, logq: Tensor, q: Tensor, top: Tensor, read: Tensor, picked: Tensor) -> _OffTop:
        """The student's log q on the top set ``top`` [n, K] and log of its mass off it, given ``logq`` and ``q``,
        its log-softmax and softmax over the ids off the top set (log q' = log q − log b; −inf and 0 on the top
        set), and ``picked``, its logits/τ at the top set and at the read-back id j (``read``, off the top set):
        log Σ_{i∉top} e^{z_i} = z_j − log q'_j, a normaliser from its members. Rows where that is not finite
        (z_j = −inf, or j in the top set) take the logsumexp of their masked ``logits``; with nothing off the top
        set, q' = 0 there (not the NaN of a softmax over nothing)."""
        count = top.shape[1]
        z_top = picked[:, :count]
        log_off = picked[:, count] - logq.gather(-1, read).squeeze(-1)
        bad = (~log_off.isfinite()).nonzero().squeeze(-1)
        if bad.numel():
            log_off[bad] = (logits[bad].to(logq.dtype) / self.temperature).logsumexp(-1)
            empty = bad[log_off[bad] == float("-inf")]
            logq[empty], q[empty] = float("-inf"), 0.0
        log_norm = torch.logaddexp(log_off, z_top.logsumexp(-1))
        return _OffTop(top, z_top - log_norm[:, None], log_off - log_norm)

    def _exact_tad(self, logq: Tensor, q: Tensor, clm_share: float, teacher_logits: Tensor, part: slice,
                   spare: Tensor, p_buffer: Tensor, student: _OffTop) -> tuple[Tensor, Tensor]:
        """TAD from full teacher logits, in the renormalised tails: ``logq``, ``q`` are the student's over the ids off
        T_K (log q', q' = q/b_K), the teacher's p' = p/α_K is taken likewise from its normaliser off T_K (pre-pass),
        so α_K·D_KL2 = α_K·KL(p'‖q') with no large terms to cancel. G = q − p on T_K and q (1 − r (1 − w)) − w p off
        T_K (r = α_K/b_K): with the CLM share, q = b_K·q' and p = α_K·p', off T_K a·q' − c·p' per row,
        a = (clm_share + scale)·b_K − scale·(1 − w)·α_K, c = scale·w·α_K. s = a is folded out (one pass,
        q' − (c/a)·p', as KD's); nothing divides by b_K or α_K, which a confident student or teacher may underflow."""
        scale, tau = self.weight / self.temperature, self.temperature
        ids, w, log_alpha = student.ids, self.tail_weights[part], self.log_alpha[part]
        # T_K's log p before the teacher's rows are overwritten (they may be a copy in p_buffer)
        logp_top = teacher_logits.gather(-1, ids).to(q.dtype)
        logp_top = (logp_top if tau == 1.0 else logp_top / tau) - self.teacher_lse[part, None]
        log_rest = self.teacher_log_rest[part, None]
        if tau == 1.0:
            logp_off = torch.sub(teacher_logits, log_rest, out=spare)
        else:
            logp_off = _scaled_into(spare, teacher_logits, tau).sub_(log_rest)
        p_off = torch.exp(logp_off, out=p_buffer).scatter_(-1, ids, 0.0)  # p' (T_K zeroed: may be inf there)
        no_tail = (log_rest[:, 0] == float("-inf")).nonzero().squeeze(-1)
        if no_tail.numel():  # α_K = 0: no p' (its terms are 0)
            p_off[no_tail], logp_off[no_tail] = 0.0, 0.0
        alpha = log_alpha.exp()
        # α_K·D_KL2 = α_K Σ_{i∉T_K} p'_i (log p'_i − log q'_i)   (log q' = −inf on T_K: zeroed)
        tail = _weighted(alpha, _row_dot_(p_off, logp_off.sub_(logq).scatter_(-1, ids, 0.0)))
        div = _d_kl1(logp_top, student.logq_top, log_alpha, student.log_b) + w * tail
        coef = (clm_share + scale) * student.log_b.exp() - scale * (1.0 - w) * alpha
        row_scale, explicit = _row_scale(coef)
        tail_coef = scale * w * alpha
        fixed = (coef[explicit, None] * q[explicit] - tail_coef[explicit, None] * p_off[explicit]
                 if explicit.numel() else None)  # rows whose a is 0 or too small to divide by: a·q' − c·p' as is
        q.addcmul_(p_off, (-tail_coef / row_scale)[:, None])
        if fixed is not None:
            q[explicit] = fixed
        q.scatter_(-1, ids, ((clm_share + scale) * student.logq_top.exp() - scale * logp_top.exp())
                   / row_scale[:, None])
        return div, row_scale

    def _summary_divergence(self, logq: Tensor, q: Tensor, clm_share: float, summary: TeacherSummary,
                            part: slice, student: _OffTop) -> tuple[Tensor, Optional[Tensor]]:
        """TAD from a summary, or KD from a summary (K = M, w = 1), from the student's softmax over the ids off the
        top M: ``logq``, ``q`` are log q', q' = q/γ_M there (−inf, 0 on the top M), ``student`` holds log q on
        the top M and log γ_M (``_off_top``), and the samples' terms read log q' directly. With ℓ = log q, L = L_DIV
        depends on ℓ at the top-M ids and the samples, on log b_K and on log γ_M (∂ log γ_M/∂ℓ_j = q_j/γ_M off the
        top M); G = ∂L/∂ℓ − q Σ_j ∂L/∂ℓ_j, where Σ_j ∂L/∂ℓ_j = −(P_K + α_K), P_K = Σ_{ranks 1..K} p (1 up to the
        summary's float16 rounding), and ∂L/∂ℓ is
          ranks 1..K: −p_i; ranks K+1..M: −w p_i − (1 − w) α_K q_i/b_K; each sample: −w α_M/S;
          off the top M: −q_j ((1 − w) α_K/b_K + w α_M/γ_M if S = 0),
        so off the top M the gradient (with the CLM share) is a·q'_j per row, a = γ_M (clm_share + scale (P_K +
        α_K)) − scale (1 − w) α_K γ_M/b_K − scale w α_M [S = 0]: a is folded out (no pass over [n, V]), and
        nothing divides by γ_M, which a confident student may underflow."""
        scale, dtype = self.weight / self.temperature, q.dtype
        m, samples = summary.top_m, summary.tail_samples
        k = self.k if self.kind == "tad" else m
        w = self.tail_weights[part] if self.kind == "tad" else torch.ones_like(q[:, 0])
        log_gamma, logq_top_m = student.log_b, student.logq_top
        log_alpha_m = summary.rest_logmass.to(dtype)
        terms = _summary_terms(logq_top_m, logq.gather(-1, summary.tail_ids.long()), log_gamma, summary, k)
        alpha = terms.log_alpha.exp()
        p_top_m = summary.top_logp.to(dtype).exp()
        mass = p_top_m[:, :k].sum(-1) + alpha  # −Σ_j ∂L/∂ℓ_j
        coef = ((clm_share + scale * mass) * log_gamma.exp()
                - scale * (1.0 - w) * alpha * _mass_ratio(log_gamma, terms.log_b))  # γ_M/b_K ≤ 1
        if not samples:
            coef = coef - scale * w * log_alpha_m.exp()
        row_scale, explicit = _row_scale(coef)
        if explicit.numel():  # a is 0 or too small to divide by: a·q' as is
            q[explicit] *= coef[explicit, None]
        grad_top = -p_top_m  # ∂L/∂ℓ on the top M
        grad_top[:, k:] = -w[:, None] * p_top_m[:, k:] - ((1.0 - w) * alpha)[:, None] * (
            logq_top_m[:, k:] - terms.log_b[:, None]).exp()
        q_top_m = logq_top_m.exp()
        unit = row_scale.reciprocal()
        q.scatter_(-1, summary.top_ids.long(),
                   (clm_share * q_top_m + scale * (grad_top + mass[:, None] * q_top_m)) * unit[:, None])
        if samples:
            per_sample = (-scale * w * log_alpha_m.exp() / samples * unit)[:, None]
            q.scatter_add_(-1, summary.tail_ids.long(), per_sample.expand(-1, samples).contiguous())
        return terms.d_kl1 + w * terms.tail, row_scale


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out ← a @ b (out may have another dtype: the hidden states' gradient under autocast)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _add_mm_(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b (out in float32 while a, b may be bf16)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


class _OnePassObjective(torch.autograd.Function):
    """Σ over tokens of CLM + weight·L_DIV, and its gradients, in one pass over the chunks.

    Each chunk's logits, loss and gradients (w.r.t. its hidden states, the LM-head weight and bias) are computed
    in forward from the closed-form gradient w.r.t. the logits (two matmuls); backward only scales the stored
    gradients. So every chunk runs once (activation checkpointing ran it twice), no autograd graph over [chunk, V]
    is built, and one chunk's [chunk, V] buffers (``_Workspace``) are alive, reused by every chunk. The matmuls
    run in the forward's dtype (bf16 under autocast); the loss terms in float32 (float64 stays float64).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, lm_weight: Tensor, bias: Optional[Tensor], plan: _ChunkPlan):
        device = hidden.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lm_weight.dtype
        grad_hidden = torch.empty_like(hidden)
        # Summed over chunks in float32 whatever the parameter dtype (bf16 sums would drop small chunks' share).
        grad_weight = torch.zeros(lm_weight.shape, dtype=_compute_dtype(lm_weight), device=lm_weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=_compute_dtype(bias), device=bias.device)
        sums = torch.zeros(2, dtype=torch.float64, device=hidden.device)  # Σ CLM, Σ divergence
        with torch.autocast(device, enabled=False):  # explicit dtypes below; ``out=`` buffers need them
            hidden_mm, weight = hidden.to(mm_dtype), lm_weight.to(mm_dtype)
            bias_mm = None if bias is None else bias.to(mm_dtype)
            for part in plan.chunks(hidden.shape[0]):
                chunk_hidden = hidden_mm[part]
                logits = plan.work.get("logits", chunk_hidden.shape[0], mm_dtype)
                if bias_mm is None:
                    torch.mm(chunk_hidden, weight.t(), out=logits)
                else:
                    torch.addmm(bias_mm, chunk_hidden, weight.t(), out=logits)
                clm, div, grad_logits, row_scale = plan.chunk_losses_and_grad(logits, part)
                if grad_logits.dtype != mm_dtype:
                    grad_logits = logits.copy_(grad_logits)
                _mm_into(grad_hidden[part], grad_logits, weight)
                if row_scale is None:
                    _add_mm_(grad_weight, grad_logits.t(), chunk_hidden)
                else:  # the gradient is row_scale[:, None]·grad_logits: scale the [n, d] sides, not [n, V]
                    grad_hidden[part] *= row_scale[:, None]
                    _add_mm_(grad_weight, grad_logits.t(), chunk_hidden * row_scale[:, None].to(mm_dtype))
                if grad_bias is not None:
                    grad_bias += (grad_logits.sum(0) if row_scale is None
                                  else grad_logits.t().mv(row_scale.to(mm_dtype)))
                sums += torch.stack([clm.sum(), div.sum()]).double()
        ctx.save_for_backward(grad_hidden, grad_weight.to(lm_weight.dtype),
                              None if bias is None else grad_bias.to(bias.dtype))
        clm_sum, div_sum = sums[0].clone(), sums[1].clone()
        ctx.mark_non_differentiable(clm_sum, div_sum)
        return sums[0] + plan.weight * sums[1], clm_sum, div_sum

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_clm, _grad_div):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype),
                None if grad_bias is None else grad_bias * grad_total.to(grad_bias.dtype), None)


def distill_objective(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, teacher: Teacher, *, kind: str,
                      k: int = 10, beta: float = 1.0, normalize: bool = True, temperature: float = 1.0,
                      weight: float = 1.0, mask: Optional[Tensor] = None, chunk_tokens: int = 512,
                      lm_head_bias: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> ObjectiveOutput:
    """Training objective: mean over valid tokens of CLM(t) + weight·L_DIV(t), chunked over tokens.

    ``hidden`` [B, T, d] are the student's final hidden states, ``lm_head_weight`` [V, d] its output
    projection; ``teacher`` is full teacher logits [B, T, V], a ``TeacherSummary`` or None (``kind="clm"``).
    Each chunk of ``chunk_tokens`` valid tokens computes its logits, log-softmax, per-token terms and their
    gradients in one go (``_OnePassObjective``), so only one chunk's [chunk, V] buffers are alive and no chunk is
    recomputed in backward. TAD's teacher-only inputs (α_K, hence β(X); T_K of full logits) come from a pre-pass
    over the teacher before the chunks. Values and gradients equal the logits path (``divergence_loss`` +
    ``clm_loss``). The sequence X of β(X) is a row, or with ``position_ids`` [B, T] (packed samples) each run of
    positions restarting at 0: each sample averages its own tail mass, as when it is run alone.
    """
    b, t = _check_shapes(hidden.shape, teacher, mask)
    vocab = lm_head_weight.shape[0]
    _check_args(kind, k, beta, temperature, vocab, teacher)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if tuple(targets.shape) != (b, t):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match [B, T] = {(b, t)}")
    index = _valid_index(mask, b, t, hidden.device)
    if index.numel() == 0:  # every target masked (a block of prompt): zero gradients, the LM head's too (DDP)
        zero = sum(t.sum() * 0.0 for t in (hidden, lm_head_weight, lm_head_bias) if t is not None)
        return ObjectiveOutput(loss=zero, clm=zero.detach(), div=zero.detach(), tokens=0)
    n = index.numel()
    plan = _ChunkPlan(targets=targets.reshape(-1)[index].long(), teacher=None if kind == "clm" else _flatten(teacher),
                      positions=None if mask is None else index, kind=kind, k=k, temperature=temperature,
                      weight=weight, chunk_tokens=chunk_tokens,
                      work=_Workspace(min(chunk_tokens, n), vocab, hidden.device))
    if kind == "tad":
        plan.log_alpha = plan.tail_pre_pass(n, _compute_dtype(hidden))
        plan.tail_weights = _tail_weights(plan.log_alpha.exp(), *_sequence_index(index, b, t, position_ids),
                                          beta=beta, normalize=normalize)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])[index]  # [N, d]: small next to [N, V]
    total, clm_sum, div_sum = _OnePassObjective.apply(flat_hidden, lm_head_weight, lm_head_bias, plan)
    dtype = _compute_dtype(hidden)  # float32, or float64 for float64 inputs (the sums are float64)
    return ObjectiveOutput(loss=(total / n).to(dtype), clm=(clm_sum / n).to(dtype), div=(div_sum / n).to(dtype),
                           tokens=n)
