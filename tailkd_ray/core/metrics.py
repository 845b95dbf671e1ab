r"""Held-out evaluation of a student against its teacher (DESIGN §7), streaming over token chunks.

Per token position with student q, teacher p (τ = 1) and target y:

- ``val_loss`` = mean −log q_y, ``val_ppl`` = exp(val_loss);
- ``kl_to_teacher`` = mean KL(p‖q). With full teacher logits it is exact (``kl_source: exact``). From a
  ``TeacherSummary`` it is the summary forward KL of ``losses.forward_kl_loss``: exact over the top M and the
  far-tail mass, plus the sampled far-tail term (unbiased with S > 0; with S = 0 it drops the far-tail KL
  α_M·F and reads low) (``kl_source: summary``); exact again when M = V;
- ``top1_agreement`` = fraction of positions where argmax q = argmax p;
- ``tail_mass_teacher`` = mean α_K^T = 1 − Σ of the teacher's K largest probabilities (K = ``loss.k``),
  ``tail_mass_student`` = mean α_K^S = 1 − Σ of the student's own K largest probabilities;
- ``full_ece`` (Liu et al., arXiv 2406.11345), ×100: the probability of every vocabulary entry at every
  position goes into one of M equal-width bins over [0, 1]; with N positions,
  Full-ECE = (1/N) Σ_m |Σ_{(i,k)∈B_m} (1[y_i = k] − q_i^(k))|. Streaming: per bin only the count of hits
  and the sum of probabilities are kept.

Everything is accumulated as float64 sums in one flat vector, so a distributed evaluation is one
all-reduce of that vector (``reduce``). Pure torch: the training workers (``train/loop.py``) and ``tailkd eval``
(``pipelines/evaluate.py``) run the same ``evaluate``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from tailkd_ray.core.losses import forward_kl_loss
from tailkd_ray.core.summary import FIELDS, TeacherSummary

EVAL_KEYS = ("val_loss", "val_ppl", "kl_to_teacher", "top1_agreement", "full_ece", "tail_mass_student",
             "tail_mass_teacher", "tokens")
SCALARS = ("nll", "kl", "top1", "tail_student", "tail_teacher", "tokens")


def calibration_bins(logq: Tensor, targets: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Per-bin (count of hits, sum of probabilities) over every vocabulary entry of ``logq`` [N, V]."""
    probs = logq.exp()
    index = (probs * bins).long().clamp_(max=bins - 1)  # bin m holds [m/M, (m+1)/M); p = 1 goes to the last
    prob_sums = torch.zeros(bins, dtype=torch.float64, device=probs.device)
    prob_sums.index_add_(0, index.reshape(-1), probs.reshape(-1).double())
    hits = torch.bincount(index.gather(-1, targets[:, None]).reshape(-1), minlength=bins).double()
    return hits, prob_sums


def _log_mass_outside_top(logp: Tensor, k: int) -> Tensor:
    """log(1 − Σ of the k largest probabilities), by logsumexp over the rest (no cancellation)."""
    rest = logp.scatter(-1, logp.topk(k, dim=-1).indices, float("-inf"))
    return rest.logsumexp(-1)


def _teacher_terms(logq: Tensor, teacher: Union[Tensor, TeacherSummary], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(KL sum, teacher argmax [N], teacher α_K sum) for full teacher logits [N, V] or a summary [N]."""
    n = logq.shape[0]
    if isinstance(teacher, TeacherSummary):
        kl = forward_kl_loss(logq[None], teacher.map(lambda t: t[None])) * n
        argmax = teacher.top_ids[:, 0].long()
        log_alpha = torch.cat([teacher.top_logp[:, k:].float(), teacher.rest_logmass[:, None].float()], -1).logsumexp(-1)
    else:
        kl = forward_kl_loss(logq[None], teacher[None].float()) * n
        argmax = teacher.argmax(-1)
        log_alpha = _log_mass_outside_top(torch.log_softmax(teacher.float(), -1), k)
    return kl.double(), argmax, log_alpha.exp().double().sum()


def metric_sums(student_logits: Tensor, targets: Tensor, teacher: Union[Tensor, TeacherSummary, None], *,
                k: int, bins: int = 10) -> Tensor:
    """Flat float64 vector of sums for N positions: [nll, kl, top1, tail_student, tail_teacher, tokens,
    hits per bin (bins), probability sum per bin (bins)]. ``teacher`` None leaves the teacher sums at 0."""
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    n = logq.shape[0]
    nll = -logq.gather(-1, targets[:, None].long()).double().sum()
    tail_student = _log_mass_outside_top(logq, k).exp().double().sum()
    zero = torch.zeros((), dtype=torch.float64, device=logq.device)
    kl, top1, tail_teacher = zero, zero, zero
    if teacher is not None:
        kl, argmax, tail_teacher = _teacher_terms(logq, teacher, k)
        top1 = (logq.argmax(-1) == argmax).double().sum()
    hits, prob_sums = calibration_bins(logq, targets.long(), bins)
    scalars = torch.stack([nll, kl, top1, tail_student, tail_teacher, zero + n])
    return torch.cat([scalars, hits, prob_sums])


def finalize_metrics(sums: Tensor, *, bins: int = 10, with_teacher: bool = True) -> dict:
    """Turn accumulated ``metric_sums`` into the eval.json metrics (teacher metrics NaN without a teacher)."""
    values = dict(zip(SCALARS, sums[:len(SCALARS)].tolist()))
    hits, prob_sums = sums[len(SCALARS):len(SCALARS) + bins], sums[len(SCALARS) + bins:]
    n = max(values["tokens"], 1.0)
    nan = float("nan")
    val_loss = values["nll"] / n
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700.0)),
        "kl_to_teacher": values["kl"] / n if with_teacher else nan,
        "top1_agreement": values["top1"] / n if with_teacher else nan,
        "full_ece": 100.0 * float((hits - prob_sums).abs().sum()) / n,
        "tail_mass_student": values["tail_student"] / n,
        "tail_mass_teacher": values["tail_teacher"] / n if with_teacher else nan,
        "tokens": int(values["tokens"]),
    }


def target_mask(batch: Mapping[str, Tensor], device) -> Optional[Tensor]:
    """[B, T] bool: which targets ``input_ids[:, 1:]`` the losses and metrics cover, from a block's ``loss_mask``
    (aligned with ``input_ids``; data.train_on: completion), or None: all of them."""
    if "loss_mask" not in batch:
        return None
    return torch.as_tensor(batch["loss_mask"])[:, 1:].to(device=device, dtype=torch.bool)


def block_tensors(batch: Mapping[str, Tensor], device) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(inputs, targets, mask, positions), each [B, T], of a batch of blocks ``input_ids`` [B, T+1]: the mask is
    ``target_mask``'s; the positions are the inputs' ``position_ids`` (restarting at every packed sample, from which
    transformers keeps each sample's attention within it), or None without that column: 0..T-1."""
    ids = torch.as_tensor(batch["input_ids"]).to(device).long()
    positions = torch.as_tensor(batch["position_ids"])[:, :-1].to(device).long() if "position_ids" in batch else None
    return ids[:, :-1], ids[:, 1:], target_mask(batch, device), positions


@torch.no_grad()
def evaluate(student: Callable, batches: Iterable[Mapping[str, Tensor]], *,
             teacher: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]] = None, k: int = 10, bins: int = 10,
             chunk_tokens: int = 512, device: Union[str, torch.device] = "cpu",
             reduce: Optional[Callable[[Tensor], Tensor]] = None) -> dict:
    """Evaluate ``student`` on ``batches`` of ``input_ids`` [B, T+1] (plus summary columns, if any), over the
    targets a ``loss_mask`` column keeps (``target_mask``; all of them without one).

    ``student(input_ids, head_fn, position_ids=...)`` must run the decoder (at those positions when not None) and
    return ``head_fn(hidden, lm_head_weight, bias)``
    (``models.StudentWithHead``, possibly wrapped by DDP / FSDP2 / DeepSpeed): metrics are computed chunk by
    chunk from the hidden states, never on a [B·T, V] float32 tensor. The teacher is ``teacher(input_ids,
    position_ids) -> logits [B, T, V]`` (co-located, exact) or, when None, the batches' summary columns; with neither,
    the teacher metrics are NaN. ``reduce`` sums the flat vector across workers (an all-reduce).
    """
    total = torch.zeros(len(SCALARS) + 2 * bins, dtype=torch.float64, device=device)
    with_teacher = teacher is not None
    for batch in batches:
        inputs, targets, mask, positions = block_tensors(batch, device)
        summary = TeacherSummary.from_batch(batch).to(device) if all(f in batch for f in FIELDS) else None
        reference = teacher(inputs, positions) if teacher is not None else summary
        with_teacher = with_teacher or summary is not None
        head_fn = _chunked_metrics(targets, reference, mask, k=k, bins=bins, chunk_tokens=chunk_tokens)
        total += student(inputs, head_fn, position_ids=positions)
    if reduce is not None:
        total = reduce(total)
    return finalize_metrics(total.cpu(), bins=bins, with_teacher=with_teacher)


def _chunked_metrics(targets: Tensor, reference: Union[Tensor, TeacherSummary, None], mask: Optional[Tensor], *,
                     k: int, bins: int, chunk_tokens: int):
    """A ``head_fn`` accumulating ``metric_sums`` over chunks of ``chunk_tokens`` positions (those ``mask`` keeps)."""

    def head_fn(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1)
        flat_reference = _flatten(reference)
        if mask is not None:
            index = mask.reshape(-1).nonzero().squeeze(-1)
            flat_hidden, flat_targets = flat_hidden[index], flat_targets[index]
            flat_reference = _rows(flat_reference, index)
        total = torch.zeros(len(SCALARS) + 2 * bins, dtype=torch.float64, device=hidden.device)  # if no position
        for start in range(0, flat_hidden.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            logits = flat_hidden[part].float() @ weight.float().t()
            if bias is not None:
                logits = logits + bias.float()
            total = total + metric_sums(logits, flat_targets[part], _rows(flat_reference, part), k=k, bins=bins)
        return total

    return head_fn


def _flatten(reference: Union[Tensor, TeacherSummary, None]):
    if reference is None or isinstance(reference, TeacherSummary):
        return None if reference is None else reference.flatten_positions()
    return reference.reshape(-1, reference.shape[-1])


def _rows(reference: Union[Tensor, TeacherSummary, None], index):
    """Rows ``index`` (a slice or indices) of a flattened reference."""
    if reference is None or isinstance(reference, Tensor):
        return None if reference is None else reference[index]
    return reference.map(lambda t: t[index])
