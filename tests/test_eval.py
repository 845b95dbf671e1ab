"""core/metrics.py: every metric against a brute-force computation on a tiny case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tailkd_ray.core.metrics import EVAL_KEYS, evaluate
from tailkd_ray.core.summary import summarize

V, D, B, T, K, BINS = 12, 6, 2, 5, 3, 10


@pytest.fixture
def tiny_case():
    g = torch.Generator().manual_seed(0)
    emb, head, bias = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    teacher_table = emb @ head.t() + bias + 1.5 * torch.randn(V, V, generator=g)  # related, not equal
    ids = torch.randint(0, V, (B, T + 1), generator=g)

    def student(inputs, head_fn, position_ids=None):  # a bigram model: positions change nothing
        return head_fn(emb[inputs], head, bias)

    student_logits = emb[ids[:, :-1]] @ head.t() + bias
    return student, (lambda inputs, positions: teacher_table[inputs]), ids, student_logits, teacher_table[ids[:, :-1]]


def brute_force(student_logits, teacher_logits, targets, k=K, bins=BINS):
    q = torch.softmax(student_logits.double(), -1).reshape(-1, V).numpy()
    p = torch.softmax(teacher_logits.double(), -1).reshape(-1, V).numpy()
    y = targets.reshape(-1).numpy()
    n = len(y)
    gaps = np.zeros(bins)
    for i in range(n):
        for v in range(V):
            m = min(int(q[i, v] * bins), bins - 1)
            gaps[m] += (1.0 if y[i] == v else 0.0) - q[i, v]
    loss = -np.mean(np.log(q[np.arange(n), y]))
    return {
        "val_loss": loss, "val_ppl": math.exp(loss),
        "kl_to_teacher": np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)),
        "top1_agreement": np.mean(q.argmax(-1) == p.argmax(-1)),
        "full_ece": 100 * np.abs(gaps).sum() / n,
        "tail_mass_student": np.mean(1 - np.sort(q, -1)[:, -k:].sum(-1)),
        "tail_mass_teacher": np.mean(1 - np.sort(p, -1)[:, -k:].sum(-1)),
        "tokens": n,
    }


def _batches(ids, extra=None):
    yield {"input_ids": ids[:1], **({k: v[:1] for k, v in extra.items()} if extra else {})}
    yield {"input_ids": ids[1:], **({k: v[1:] for k, v in extra.items()} if extra else {})}


def test_metrics_match_brute_force_with_colocated_teacher(tiny_case):
    student, teacher, ids, student_logits, teacher_logits = tiny_case
    reduced = []
    got = evaluate(student, _batches(ids), teacher=teacher, k=K, bins=BINS, chunk_tokens=3,
                   reduce=lambda t: reduced.append(t.clone()) or t)
    want = brute_force(student_logits, teacher_logits, ids[:, 1:])
    assert set(EVAL_KEYS) <= set(got) and len(reduced) == 1
    for key in EVAL_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert 0 < got["full_ece"] < 200 and 0 < got["top1_agreement"] < 1  # a case that exercises the metrics


def test_summary_with_m_equal_v_matches_exact(tiny_case):
    student, teacher, ids, student_logits, teacher_logits = tiny_case
    summary = summarize(teacher_logits, top_m=V, logp_dtype=torch.float32).to_numpy()
    got = evaluate(student, _batches(ids, summary), k=K, bins=BINS, chunk_tokens=4)
    want = brute_force(student_logits, teacher_logits, ids[:, 1:])
    for key in EVAL_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_summary_top_m_keeps_top1_and_tail_masses_exact(tiny_case):
    student, teacher, ids, student_logits, teacher_logits = tiny_case
    summary = summarize(teacher_logits, top_m=K + 2, logp_dtype=torch.float32).to_numpy()
    got = evaluate(student, _batches(ids, summary), k=K, bins=BINS)
    want = brute_force(student_logits, teacher_logits, ids[:, 1:])
    for key in ("top1_agreement", "tail_mass_teacher", "tail_mass_student", "val_loss", "full_ece"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert got["kl_to_teacher"] < want["kl_to_teacher"]  # S = 0 drops the far-tail KL: reads low


def test_without_teacher_teacher_metrics_are_nan(tiny_case):
    student, _, ids, student_logits, teacher_logits = tiny_case
    got = evaluate(student, _batches(ids), k=K, bins=BINS)
    assert math.isnan(got["kl_to_teacher"]) and math.isnan(got["top1_agreement"])
    assert got["val_loss"] == pytest.approx(brute_force(student_logits, teacher_logits, ids[:, 1:])["val_loss"], rel=1e-6)
