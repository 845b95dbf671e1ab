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
summary path α_K = α_M + Σ_{ranks K+1..M} p and b_K = γ_M + Σ_{ranks K+1..M} q. The complement form
1 − Σ cancels in float32 once a confident student puts less than ~1e-6 outside T_K (at V = 152k the float32
log-softmax normaliser alone is off by ~1e-5), which made the loss negative, wrong or NaN.

The summary path (``TeacherSummary`` of DESIGN §3, M ≥ K) splits the tail into the middle ranks
K+1..M (known exactly) and the far tail beyond M (mass α_M):

    α_K·D_KL2 = Σ_{ranks K+1..M} p_i (log p_i − log α_K − log q_i + log b_K)
              + α_M (log α_M − log α_K − log γ_M + log b_K) + α_M·F

γ_M the student mass off the teacher's top M and F = KL(far-tail teacher ‖ far-tail student), estimated
from S samples i_s ~ p restricted to ranks > M as mean_s[(log p_{i_s} − log α_M) − (log q_{i_s} − log γ_M)]
(unbiased in value and gradient); with S = 0 the α_M·F term is dropped.

``distill_objective`` is the training path: it takes the student's final hidden states and LM-head
weight and computes CLM + λ·divergence chunk by chunk over tokens, recomputing each chunk's logits in
backward, so that no [B·T, V] float32 tensor is ever alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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


def _tad_terms_exact(logq: Tensor, teacher_logits: Tensor, k: int, temperature: float,
                     top_ids: Optional[Tensor] = None):
    logp = _log_softmax(teacher_logits, temperature, logq.dtype)
    if top_ids is None:
        top_ids = teacher_logits.topk(k, dim=-1, sorted=False).indices
    logp_top, logq_top = logp.gather(-1, top_ids), logq.gather(-1, top_ids)
    p_tail = logp.exp().scatter(-1, top_ids, 0.0)  # p with T_K zeroed: sums below run over the tail
    # Both masses from their own members, the same way, so that they agree exactly when q = p.
    log_alpha, log_b = log_mass_outside(logp, top_ids), log_mass_outside(logq, top_ids)
    alpha = log_alpha.exp()
    # α_K·D_KL2 = Σ_{i∉T_K} p_i (log p_i − log q_i) − α_K (log α_K − log b_K)   (multiplied form)
    tail = _weighted(p_tail, logp - logq).sum(-1) - _weighted(alpha, log_alpha - log_b)
    return _d_kl1(logp_top, logq_top, log_alpha, log_b), tail, alpha


def _tad_terms_summary(logq: Tensor, summary: TeacherSummary, k: int):
    top_logp = summary.top_logp.to(logq.dtype)
    m = summary.top_m
    # One gather for the top-M ids and the tail samples: its backward fills and scatters one [N, V] buffer, not two.
    logq_drawn = logq.gather(-1, torch.cat([summary.top_ids, summary.tail_ids], dim=-1).long())
    logq_top_m, logq_s = logq_drawn[:, :m], logq_drawn[:, m:]
    logp_k, logq_k = top_logp[:, :k], logq_top_m[:, :k]
    logp_mid, logq_mid = top_logp[:, k:], logq_top_m[:, k:]
    log_alpha_m = summary.rest_logmass.to(logq.dtype)
    # α_K = Σ_{ranks K+1..M} p + α_M, summed in log space: exact, no cancellation.
    log_alpha = torch.cat([logp_mid, log_alpha_m[:, None]], dim=-1).logsumexp(-1)
    if m < logq.shape[-1]:
        log_gamma_m = log_mass_outside(logq, summary.top_ids.long())
    else:  # M = V: γ_M = 0 and α_M = 0 zeroes its terms; a logsumexp over nothing would give NaN gradients
        log_gamma_m = torch.full_like(log_alpha_m, float("-inf"))
    # b_K = γ_M + Σ_{ranks K+1..M} q: from its members, like α_K.
    log_b = torch.cat([logq_mid, log_gamma_m[:, None]], dim=-1).logsumexp(-1)
    mid = _weighted(logp_mid.exp(), logp_mid - logq_mid - (log_alpha - log_b)[:, None]).sum(-1)
    far = log_alpha_m - log_alpha - log_gamma_m + log_b
    if summary.tail_samples:
        tail_logp = summary.tail_logp.to(logq.dtype)
        far = far + ((tail_logp - log_alpha_m[:, None]) - (logq_s - log_gamma_m[:, None])).mean(-1)
    tail = mid + _weighted(log_alpha_m.exp(), far)
    return _d_kl1(logp_k, logq_k, log_alpha, log_b), tail, log_alpha.exp()


def _topk_terms(logq: Tensor, logp_top: Tensor, top_ids: Tensor) -> Tensor:
    """KL between p and q renormalised on T_K: Σ p̂ (log p̂ − log q̂), p̂ = p/(1−α_K), q̂ = q/(1−b_K)."""
    logq_top = logq.gather(-1, top_ids)
    log_p_hat = logp_top - logp_top.logsumexp(-1, keepdim=True)
    log_q_hat = logq_top - logq_top.logsumexp(-1, keepdim=True)
    return _weighted(log_p_hat.exp(), log_p_hat - log_q_hat).sum(-1)


def _token_terms(logq: Tensor, teacher: Teacher, *, kind: str, k: int, temperature: float,
                 top_ids: Optional[Tensor] = None):
    """Per-token divergence terms for ``kind``; see the module docstring for the formulas.
    ``top_ids`` optionally gives the teacher's top-K ids (exact TAD) when they are already known."""
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
        return _tad_terms_exact(logq, teacher, k, temperature, top_ids)
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
# Chunked training path: hidden states + LM head, O(chunk × V) peak memory, recompute in backward
# --------------------------------------------------------------------------------------------------
@dataclass
class ObjectiveOutput:
    """``loss`` (with grad) = mean over valid tokens of CLM + weight·div; the rest are for logging."""

    loss: Tensor
    clm: Tensor  # detached mean CLM
    div: Tensor  # detached mean divergence
    tokens: int


def _chunk_terms(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, teacher_fields: tuple,
                 positions: Tensor, top_ids: Optional[Tensor], kind: str, k: int, temperature: float):
    """One chunk: logits → log-softmax → CLM and divergence terms (recomputed in backward).

    ``teacher_fields`` are the whole flat teacher (views); this chunk's ``positions`` are gathered here, inside
    the checkpoint, so that no chunk's teacher copy stays alive until backward.
    """
    logits = F.linear(hidden, weight, bias)
    logq = _log_softmax(logits, temperature, _compute_dtype(logits))
    # CLM is always at τ = 1; reuse the log-softmax when τ = 1 (the common case).
    logq_clm = logq if temperature == 1.0 else _log_softmax(logits, 1.0, logq.dtype)
    clm = -logq_clm.gather(-1, targets[:, None]).squeeze(-1)
    teacher = _teacher_from_fields(tuple(f[positions] for f in teacher_fields))
    div, tail, alpha = _token_terms(logq, teacher, kind=kind, k=k, temperature=temperature, top_ids=top_ids)
    return (clm, div) if tail is None else (clm, div, tail, alpha)


def _teacher_fields(teacher: Teacher) -> tuple:
    """The teacher as a flat tuple of tensors (what checkpoint can pass through); inverse below."""
    if teacher is None:
        return ()
    if isinstance(teacher, TeacherSummary):
        return tuple(getattr(teacher, name) for name in FIELDS)
    return (teacher,)


def _teacher_from_fields(fields: tuple) -> Teacher:
    if not fields:
        return None
    return fields[0] if len(fields) == 1 else TeacherSummary(*fields)


def distill_objective(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, teacher: Teacher, *, kind: str,
                      k: int = 10, beta: float = 1.0, normalize: bool = True, temperature: float = 1.0,
                      weight: float = 1.0, mask: Optional[Tensor] = None, chunk_tokens: int = 512,
                      lm_head_bias: Optional[Tensor] = None) -> ObjectiveOutput:
    """Training objective: mean over valid tokens of CLM(t) + weight·L_DIV(t), chunked over tokens.

    ``hidden`` [B, T, d] are the student's final hidden states, ``lm_head_weight`` [V, d] its output
    projection; ``teacher`` is full teacher logits [B, T, V], a ``TeacherSummary`` or None (``kind="clm"``).
    Each chunk of ``chunk_tokens`` valid tokens computes its logits, log-softmax and per-token terms under
    activation checkpointing, so only one chunk's [chunk, V] tensors are alive, in forward and backward.
    Values and gradients equal the logits path (``divergence_loss`` + ``clm_loss``).
    """
    b, t = _check_shapes(hidden.shape, teacher, mask)
    vocab = lm_head_weight.shape[0]
    _check_args(kind, k, beta, temperature, vocab, teacher)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if tuple(targets.shape) != (b, t):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match [B, T] = {(b, t)}")
    index = _valid_index(mask, b, t, hidden.device)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])[index]  # [N, d]: small next to [N, V]
    flat_targets = targets.reshape(-1)[index].long()

    flat_teacher = _teacher_fields(_flatten(teacher))
    pieces = []
    for start in range(0, index.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        positions = index[part]
        top_ids = None
        if kind == "tad" and isinstance(teacher, Tensor):
            # The teacher's top-K ids are tiny: find them once here rather than again in the recompute.
            with torch.no_grad():
                top_ids = flat_teacher[0][positions].topk(k, dim=-1, sorted=False).indices
        pieces.append(checkpoint(
            _chunk_terms, flat_hidden[part], lm_head_weight, lm_head_bias, flat_targets[part],
            flat_teacher, positions, top_ids, kind, k, temperature, use_reentrant=False))
    if not pieces:
        zero = hidden.sum() * 0.0
        return ObjectiveOutput(loss=zero, clm=zero.detach(), div=zero.detach(), tokens=0)
    columns = [torch.cat(column) for column in zip(*pieces)]
    clm, div, tail, alpha = columns + [None] * (4 - len(columns))  # tail, alpha: TAD only
    div = _divergence(div, tail, alpha, torch.div(index, t, rounding_mode="floor"), b, beta=beta, normalize=normalize)
    loss = _mean(clm + weight * div)
    return ObjectiveOutput(loss=loss, clm=_mean(clm).detach(), div=_mean(div).detach(), tokens=index.numel())
