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
# Chunked training path: hidden states + LM head, O(chunk × V) peak memory, one pass (no recompute)
# --------------------------------------------------------------------------------------------------
@dataclass
class ObjectiveOutput:
    """``loss`` (with grad) = mean over valid tokens of CLM + weight·div; the rest are for logging."""

    loss: Tensor
    clm: Tensor  # detached mean CLM
    div: Tensor  # detached mean divergence
    tokens: int


@dataclass
class _ChunkPlan:
    """What every chunk of the objective needs besides the student's hidden states and LM head: flat (valid
    positions only) targets and teacher, the per-token tail weights w (TAD), the exact teacher's top-K ids."""

    targets: Tensor  # [N]
    teacher: Teacher  # flat over all B·T positions (views): [B·T, V] logits, a flat TeacherSummary, or None
    positions: Tensor  # [N]: the valid positions' rows of ``teacher`` (gathered per chunk, never all at once)
    tail_weights: Optional[Tensor]  # [N] (TAD) or None
    log_alpha: Optional[Tensor]  # [N] log α_K (TAD) or None
    top_ids: Optional[Tensor]  # [N, K] (exact TAD) or None
    kind: str
    k: int
    temperature: float
    weight: float
    chunk_tokens: int

    def chunk_losses(self, hidden: Tensor, lm_weight: Tensor, bias: Optional[Tensor], part: slice):
        """Per-token (CLM, divergence) of the positions ``part``; divergence = L_DIV, tail weight applied."""
        logits = F.linear(hidden, lm_weight, bias)
        logq = _log_softmax(logits, self.temperature, _compute_dtype(logits))
        # CLM is always at τ = 1; reuse the log-softmax when τ = 1 (the common case).
        logq_clm = logq if self.temperature == 1.0 else _log_softmax(logits, 1.0, logq.dtype)
        clm = -logq_clm.gather(-1, self.targets[part, None]).squeeze(-1)
        teacher = _take_flat(self.teacher, self.positions[part])
        top_ids = None if self.top_ids is None else self.top_ids[part]
        div, tail, _ = _token_terms(logq, teacher, kind=self.kind, k=self.k, temperature=self.temperature,
                                    top_ids=top_ids)
        return clm, div if tail is None else div + self.tail_weights[part] * tail

    @property
    def analytic(self) -> bool:
        """Whether ``chunk_losses_and_grad`` covers this plan: CLM alone or any kind with full teacher logits."""
        return self.teacher is None or isinstance(self.teacher, Tensor)

    def chunk_losses_and_grad(self, logits: Tensor, part: slice) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token (CLM, divergence) and d(Σ CLM + weight·Σ div)/d logits, in closed form (no autograd graph).

        With z the student logits, q = softmax(z/τ), q¹ = softmax(z) and G = ∂L_DIV/∂(z/τ) per token:
        ∂CLM/∂z = q¹ − onehot(y); kd: G = q − p; rkl: G = q (log q − log p − KL(q‖p)); topk: G = q̂ − p̂ on T_K, 0
        elsewhere; tad: G = q − p on T_K and q (1 − (α_K/b_K)(1 − w)) − w p off T_K (w the token's tail weight).
        """
        dtype = _compute_dtype(logits)
        logq = _log_softmax(logits, self.temperature, dtype)
        q = logq.exp()
        logq_clm, q_clm = (logq, q) if self.temperature == 1.0 else _log_softmax_and_probs(logits, dtype)
        targets = self.targets[part, None]
        clm = -logq_clm.gather(-1, targets).squeeze(-1)
        if self.teacher is None:
            div, grad = torch.zeros_like(clm), q_clm.clone()
        else:
            teacher = self.teacher[self.positions[part]]
            div, grad = self._divergence_and_grad(logq, q, teacher, part)
            grad.mul_(self.weight / self.temperature).add_(q_clm)
        grad.scatter_add_(-1, targets, torch.full_like(clm[:, None], -1.0))
        return clm, div, grad

    def _divergence_and_grad(self, logq: Tensor, q: Tensor, teacher_logits: Tensor, part: slice):
        """(L_DIV per token, G) for full teacher logits; see ``chunk_losses_and_grad``."""
        # -inf teacher logits (a masked vocabulary) give p = 0; clamping keeps 0 · (log p − log q) at 0, not NaN.
        logp = _log_softmax(teacher_logits, self.temperature, logq.dtype).clamp_(min=torch.finfo(logq.dtype).min)
        p = logp.exp()
        if self.kind == "topk":
            logp_top, top_ids = logp.topk(self.k, dim=-1, sorted=False)
            logq_top = logq.gather(-1, top_ids)
            log_p_hat = logp_top - logp_top.logsumexp(-1, keepdim=True)
            log_q_hat = logq_top - logq_top.logsumexp(-1, keepdim=True)
            p_hat = log_p_hat.exp()
            div = (p_hat * (log_p_hat - log_q_hat)).sum(-1)
            return div, torch.zeros_like(q).scatter_(-1, top_ids, log_q_hat.exp() - p_hat)
        diff = logp - logq  # log p − log q
        if self.kind == "kd":
            return torch.linalg.vecdot(p, diff), q - p
        if self.kind == "rkl":
            div = -torch.linalg.vecdot(q, diff)
            return div, -q * (diff + div[:, None])
        # tad
        ids, w, log_alpha = self.top_ids[part], self.tail_weights[part], self.log_alpha[part]
        p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
        tail_kl = torch.linalg.vecdot(p.scatter(-1, ids, 0.0), diff)  # Σ_{i∉T_K} p_i (log p_i − log q_i)
        log_b = log_mass_outside(logq, ids)
        alpha = log_alpha.exp()
        bucket = _weighted(alpha, log_alpha - log_b)  # α_K (log α_K − log b_K)
        d_kl1 = (p_top * diff.gather(-1, ids)).sum(-1) + bucket
        div = d_kl1 + w * (tail_kl - bucket)
        grad = q * (1.0 - (log_alpha - log_b).exp() * (1.0 - w))[:, None]
        grad.addcmul_(p, -w[:, None])
        return div, grad.scatter_(-1, ids, q_top - p_top)


def _log_softmax_and_probs(logits: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    logq = _log_softmax(logits, 1.0, dtype)
    return logq, logq.exp()


def _take_flat(teacher: Teacher, part) -> Teacher:
    """Rows ``part`` (a slice or index tensor) of a flat teacher."""
    if teacher is None:
        return None
    return teacher.map(lambda f: f[part]) if isinstance(teacher, TeacherSummary) else teacher[part]


class _OnePassObjective(torch.autograd.Function):
    """Σ over tokens of CLM + weight·L_DIV, and its gradients, in one pass over the chunks.

    Each chunk's logits, loss and gradients (w.r.t. its hidden states, the LM-head weight and bias) are computed
    in forward and the chunk's graph is freed at once; backward only scales the stored gradients. So every chunk
    runs forward once (activation checkpointing ran it twice) and one chunk's [chunk, V] tensors are alive.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, lm_weight: Tensor, bias: Optional[Tensor], plan: _ChunkPlan):
        grad_hidden = torch.empty_like(hidden)
        # Summed over chunks in float32 whatever the parameter dtype (bf16 sums would drop small chunks' share).
        grad_weight = torch.zeros(lm_weight.shape, dtype=_compute_dtype(lm_weight), device=lm_weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=_compute_dtype(bias), device=bias.device)
        sums = torch.zeros(2, dtype=torch.float64, device=hidden.device)  # Σ CLM, Σ divergence
        for start in range(0, hidden.shape[0], plan.chunk_tokens):
            part = slice(start, start + plan.chunk_tokens)
            if plan.analytic:
                clm, div, grads = _closed_form_chunk(hidden[part], lm_weight, bias, plan, part)
            else:
                with torch.enable_grad():
                    inputs = [hidden[part].detach().requires_grad_(), lm_weight.detach().requires_grad_()]
                    if bias is not None:
                        inputs.append(bias.detach().requires_grad_())
                    clm, div = plan.chunk_losses(*inputs[:2], inputs[2] if bias is not None else None, part)
                    grads = torch.autograd.grad((clm + plan.weight * div).sum(), inputs)
            grad_hidden[part] = grads[0]
            grad_weight += grads[1]
            if bias is not None:
                grad_bias += grads[2]
            sums += torch.stack([clm.detach().sum(), div.detach().sum()]).double()
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


def _closed_form_chunk(hidden: Tensor, lm_weight: Tensor, bias: Optional[Tensor], plan: _ChunkPlan, part: slice):
    """(CLM, divergence, gradients w.r.t. hidden, weight[, bias]) of one chunk from the logits' closed-form
    gradient: two matmuls, no autograd graph over [chunk, V]."""
    logits = F.linear(hidden, lm_weight, bias)
    clm, div, grad_logits = plan.chunk_losses_and_grad(logits, part)
    grad_logits = grad_logits.to(logits.dtype)  # the matmuls run in the forward's dtype (bf16 under autocast)
    grads = [grad_logits @ lm_weight.to(logits.dtype), grad_logits.t() @ hidden.to(logits.dtype)]
    if bias is not None:
        grads.append(grad_logits.sum(0))
    return clm, div, grads


def _teacher_tail_plan(flat_teacher: Teacher, positions: Tensor, kind: str, k: int, temperature: float,
                       chunk_tokens: int, dtype: torch.dtype):
    """TAD's teacher-only inputs at ``positions``, before the chunks: log α_K per token (for β(X)) and, for exact
    logits, the top-K ids. ``None, None`` for the other kinds. ``dtype``: the student's compute dtype."""
    if kind != "tad":
        return None, None
    if isinstance(flat_teacher, TeacherSummary):
        top_logp = flat_teacher.top_logp[positions].to(dtype)
        rest = flat_teacher.rest_logmass[positions].to(dtype)
        return torch.cat([top_logp[:, k:], rest[:, None]], dim=-1).logsumexp(-1), None
    top_ids, alphas = [], []
    with torch.no_grad():
        for start in range(0, positions.numel(), chunk_tokens):
            logits = flat_teacher[positions[start:start + chunk_tokens]]
            ids = logits.topk(k, dim=-1, sorted=False).indices
            logp = _log_softmax(logits, temperature, dtype)
            top_ids.append(ids)
            alphas.append(log_mass_outside(logp, ids))
    return torch.cat(alphas), torch.cat(top_ids)


def distill_objective(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, teacher: Teacher, *, kind: str,
                      k: int = 10, beta: float = 1.0, normalize: bool = True, temperature: float = 1.0,
                      weight: float = 1.0, mask: Optional[Tensor] = None, chunk_tokens: int = 512,
                      lm_head_bias: Optional[Tensor] = None) -> ObjectiveOutput:
    """Training objective: mean over valid tokens of CLM(t) + weight·L_DIV(t), chunked over tokens.

    ``hidden`` [B, T, d] are the student's final hidden states, ``lm_head_weight`` [V, d] its output
    projection; ``teacher`` is full teacher logits [B, T, V], a ``TeacherSummary`` or None (``kind="clm"``).
    Each chunk of ``chunk_tokens`` valid tokens computes its logits, log-softmax, per-token terms and their
    gradients in one go (``_OnePassObjective``), so only one chunk's [chunk, V] tensors are alive and no chunk is
    recomputed in backward. β(X) depends on the teacher only and is computed before the chunks.
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
    if index.numel() == 0:
        zero = hidden.sum() * 0.0
        return ObjectiveOutput(loss=zero, clm=zero.detach(), div=zero.detach(), tokens=0)
    flat_teacher = None if kind == "clm" else _flatten(teacher)
    log_alpha, top_ids = _teacher_tail_plan(flat_teacher, index, kind, k, temperature, chunk_tokens,
                                            _compute_dtype(hidden))
    tail_weights = None if log_alpha is None else _tail_weights(
        log_alpha.exp(), torch.div(index, t, rounding_mode="floor"), b, beta=beta, normalize=normalize)
    plan = _ChunkPlan(targets=targets.reshape(-1)[index].long(), teacher=flat_teacher, positions=index,
                      tail_weights=tail_weights, log_alpha=log_alpha,
                      top_ids=top_ids, kind=kind, k=k, temperature=temperature, weight=weight,
                      chunk_tokens=chunk_tokens)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])[index]  # [N, d]: small next to [N, V]
    total, clm_sum, div_sum = _OnePassObjective.apply(flat_hidden, lm_head_weight, lm_head_bias, plan)
    n = index.numel()
    dtype = _compute_dtype(hidden)  # float32, or float64 for float64 inputs (the sums are float64)
    return ObjectiveOutput(loss=(total / n).to(dtype), clm=(clm_sum / n).to(dtype), div=(div_sum / n).to(dtype),
                           tokens=n)
