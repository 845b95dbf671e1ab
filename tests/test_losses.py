"""TAD and baselines against an independent brute-force reference written from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.measure import peak_extra_bytes  # jobs/bench (pytest's pythonpath)
from tailkd_ray.core import losses
from tailkd_ray.core.losses import (
    clm_loss,
    distill_objective,
    divergence_loss,
    forward_kl_loss,
    reverse_kl_loss,
    tad_loss,
    tad_loss_from_summary,
    topk_kl_loss,
)
from tailkd_ray.core.summary import summarize


# ---------------------------------------------------------------------------------------------
# Reference: float64, explicit loops over positions and vocabulary entries, D_KL2 with division.
# ---------------------------------------------------------------------------------------------
def _probs(logits_row, tau):
    z = [float(v) / tau for v in logits_row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def ref_token_terms(s_row, t_row, k, tau):
    p, q = _probs(t_row, tau), _probs(s_row, tau)
    top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
    top_set = set(top)
    alpha = sum(p[i] for i in range(len(p)) if i not in top_set)
    b = sum(q[i] for i in range(len(q)) if i not in top_set)
    d1 = sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in top if p[i] > 0)
    if alpha > 0:
        d1 += alpha * (math.log(alpha) - math.log(b))
    d2 = 0.0
    if alpha > 0:
        for i in range(len(p)):
            if i not in top_set and p[i] > 0:
                d2 += (p[i] / alpha) * (math.log(p[i] / alpha) - math.log(q[i] / b))
    return d1, d2, alpha


def ref_tad(student, teacher, mask, k, beta, tau, normalize):
    B, T, _ = student.shape
    total, count = 0.0, 0
    for bi in range(B):
        rows = [(ti, ref_token_terms(student[bi, ti].tolist(), teacher[bi, ti].tolist(), k, tau))
                for ti in range(T) if mask[bi, ti]]
        if not rows:
            continue
        mean_alpha = sum(a for _, (_, _, a) in rows) / len(rows)
        w = beta / mean_alpha if normalize else beta
        for _, (d1, d2, a) in rows:
            total += d1 + w * a * d2
            count += 1
    return total / max(count, 1)


def ref_mean(student, teacher, mask, tau, per_token):
    """Mean over valid positions of per_token(p, q), p and q the teacher and student probabilities."""
    values = [per_token(_probs(teacher[bi, ti].tolist(), tau), _probs(student[bi, ti].tolist(), tau))
              for bi in range(student.shape[0]) for ti in range(student.shape[1]) if mask[bi, ti]]
    return sum(values) / max(len(values), 1)


def kl(p, q):
    return sum(a * (math.log(a) - math.log(c)) for a, c in zip(p, q) if a > 0)


def ref_kl(student, teacher, mask, tau, reverse=False):
    return ref_mean(student, teacher, mask, tau, (lambda p, q: kl(q, p)) if reverse else kl)


def ref_topk(student, teacher, mask, k, tau):
    def renormalised_top_k_kl(p, q):
        top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        sp, sq = sum(p[i] for i in top), sum(q[i] for i in top)
        return kl([p[i] / sp for i in top], [q[i] / sq for i in top])

    return ref_mean(student, teacher, mask, tau, renormalised_top_k_kl)


def make_case(seed, B, T, V, teacher_scale=2.0, mask_prob=0.2):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * teacher_scale
    mask = torch.rand(B, T, generator=g) > mask_prob
    mask[0, 0] = True
    return student, teacher, mask


TEACHER_SHAPES = {"random": 2.0, "peaked": 12.0, "flat": 0.05}


@pytest.mark.parametrize("shape", list(TEACHER_SHAPES))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_tad_matches_bruteforce(shape, normalize, seed):
    g = torch.Generator().manual_seed(100 + seed)
    B, T, V = 2, int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(8, 40, (1,), generator=g))
    k = int(torch.randint(1, V - 1, (1,), generator=g))
    beta = float(torch.rand(1, generator=g) * 3)
    tau = float(torch.empty(1).uniform_(0.5, 2.0, generator=g))
    student, teacher, mask = make_case(seed, B, T, V, TEACHER_SHAPES[shape])
    got = tad_loss(student, teacher, k=k, beta=beta, mask=mask, temperature=tau, normalize=normalize)
    want = ref_tad(student, teacher, mask, k, beta, tau, normalize)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), V=st.integers(3, 30), T=st.integers(1, 4), k_frac=st.floats(0, 0.99),
       beta=st.floats(0, 5), tau=st.floats(0.3, 3), normalize=st.booleans(), scale=st.sampled_from([0.1, 2.0, 8.0]))
def test_tad_matches_bruteforce_property(seed, V, T, k_frac, beta, tau, normalize, scale):
    k = max(1, min(V - 1, int(k_frac * V)))
    student, teacher, mask = make_case(seed, 2, T, V, scale)
    got = tad_loss(student, teacher, k=k, beta=beta, mask=mask, temperature=tau, normalize=normalize).item()
    assert got == pytest.approx(ref_tad(student, teacher, mask, k, beta, tau, normalize), rel=1e-5, abs=1e-7)
    assert got >= -1e-9


@pytest.mark.parametrize("seed", range(3))
def test_baselines_match_bruteforce(seed):
    student, teacher, mask = make_case(seed, 2, 4, 17)
    assert forward_kl_loss(student, teacher, mask=mask, temperature=1.5).item() == pytest.approx(
        ref_kl(student, teacher, mask, 1.5), rel=1e-6)
    assert reverse_kl_loss(student, teacher, mask=mask).item() == pytest.approx(
        ref_kl(student, teacher, mask, 1.0, reverse=True), rel=1e-6)
    assert topk_kl_loss(student, teacher, k=5, mask=mask).item() == pytest.approx(
        ref_topk(student, teacher, mask, 5, 1.0), rel=1e-6)


def test_clm_matches_cross_entropy():
    student, _, mask = make_case(0, 2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    want = sum(-torch.log_softmax(student[b, t], -1)[targets[b, t]].item()
               for b in range(2) for t in range(5) if mask[b, t]) / int(mask.sum())
    assert clm_loss(student, targets, mask=mask).item() == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 10])
def test_unnormalized_beta_one_is_forward_kl(k):
    student, teacher, mask = make_case(7, 3, 5, 23)
    assert tad_loss(student, teacher, k=k, beta=1.0, mask=mask, normalize=False).item() == pytest.approx(
        forward_kl_loss(student, teacher, mask=mask).item(), rel=1e-10)


def test_normalized_beta_one_is_not_forward_kl():
    student, teacher, mask = make_case(7, 3, 5, 23)
    assert tad_loss(student, teacher, k=3, beta=1.0, mask=mask).item() != pytest.approx(
        forward_kl_loss(student, teacher, mask=mask).item(), rel=1e-3)


@pytest.mark.parametrize("normalize", [True, False])
def test_beta_zero_is_dkl1_only(normalize):
    student, teacher, mask = make_case(3, 2, 4, 19)
    k = 4
    want, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b, t]:
                d1, _, _ = ref_token_terms(student[b, t].tolist(), teacher[b, t].tolist(), k, 1.0)
                want += d1
                count += 1
    got = tad_loss(student, teacher, k=k, beta=0.0, mask=mask, normalize=normalize).item()
    assert got == pytest.approx(want / count, rel=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 4, 15])
def test_summary_with_full_vocab_equals_exact(k, normalize):
    student, teacher, mask = make_case(11, 2, 6, 16)
    summary = summarize(teacher, top_m=16, tail_samples=0, logp_dtype=torch.float32)
    exact = tad_loss(student, teacher, k=k, beta=1.7, mask=mask, normalize=normalize)
    from_summary = tad_loss_from_summary(student, summary, k=k, beta=1.7, mask=mask, normalize=normalize)
    assert from_summary.item() == pytest.approx(exact.item(), rel=1e-6)


def test_fully_masked_sequence_contributes_nothing():
    student, teacher, mask = make_case(5, 3, 4, 13, mask_prob=0.0)
    mask[1] = False
    altered_student, altered_teacher = student.clone(), teacher.clone()
    altered_student[1] = torch.randn(4, 13, dtype=torch.float64) * 5
    altered_teacher[1] = torch.randn(4, 13, dtype=torch.float64) * 5
    for fn in (lambda s, t: tad_loss(s, t, k=3, beta=2.0, mask=mask), lambda s, t: forward_kl_loss(s, t, mask=mask)):
        assert fn(student, teacher).item() == pytest.approx(fn(altered_student, altered_teacher).item(), rel=1e-12)
    none_valid = torch.zeros(3, 4, dtype=torch.bool)
    s = student.clone().requires_grad_()
    loss = tad_loss(s, teacher, k=3, beta=2.0, mask=none_valid)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.abs().sum().item() == 0.0


def test_sequence_normalisation_is_per_sequence():
    """Scaling the tail of one sequence changes only that sequence's weight β / ᾱ_K(X)."""
    student, teacher, _ = make_case(9, 2, 3, 12, mask_prob=0.0)
    k, beta = 3, 1.3
    per_seq = [tad_loss(student[i:i + 1], teacher[i:i + 1], k=k, beta=beta).item() for i in range(2)]
    both = tad_loss(student, teacher, k=k, beta=beta).item()
    assert both == pytest.approx(sum(per_seq) / 2, rel=1e-10)


@pytest.mark.parametrize("kind", ["tad", "kd", "rkl", "topk"])
def test_gradcheck(kind):
    student, teacher, mask = make_case(13, 2, 3, 9)
    student = student.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: divergence_loss(s, teacher, kind=kind, k=3, beta=1.5, mask=mask, temperature=1.3), (student,))


def test_gradcheck_summary_with_tail_samples():
    student, teacher, mask = make_case(17, 2, 3, 20)
    summary = summarize(teacher, top_m=6, tail_samples=4, logp_dtype=torch.float32,
                        generator=torch.Generator().manual_seed(0))
    student = student.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: tad_loss_from_summary(s, summary, k=3, beta=2.0, mask=mask), (student,))


def test_bf16_inputs_accumulate_in_float32():
    student, teacher, mask = make_case(19, 2, 8, 64)
    exact = tad_loss(student.bfloat16().double(), teacher.bfloat16().double(), k=5, beta=2.0, mask=mask)
    low = tad_loss(student.bfloat16(), teacher.bfloat16(), k=5, beta=2.0, mask=mask)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(exact.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Chunked training path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tad", "kd", "rkl", "topk", "clm"])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 1000])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_equals_logits_path(kind, chunk_tokens, normalize):
    g = torch.Generator().manual_seed(23)
    B, T, d, V = 2, 5, 6, 21
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    opts = dict(k=4, beta=1.7, temperature=1.4, normalize=normalize)
    out = distill_objective(hidden, weight, targets, teacher, kind=kind, mask=mask, chunk_tokens=chunk_tokens,
                            weight=0.7, lm_head_bias=bias, **opts)
    logits = hidden @ weight.T + bias
    want = clm_loss(logits, targets, mask=mask)
    if kind != "clm":
        want = want + 0.7 * divergence_loss(logits, teacher, kind=kind, mask=mask, **opts)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert out.tokens == int(mask.sum())
    for a, b in zip(torch.autograd.grad(out.loss, (hidden, weight, bias)),
                    torch.autograd.grad(want, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_tokens", [2, 5, 64])
@pytest.mark.parametrize("kind", ["tad", "kd", "topk"])
def test_chunked_summary_equals_logits_path(chunk_tokens, kind):
    g = torch.Generator().manual_seed(29)
    B, T, d, V = 2, 6, 5, 30
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    summary = summarize(torch.randn(B, T, V, generator=g) * 3, top_m=8, tail_samples=5, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    out = distill_objective(hidden, weight, targets, summary, kind=kind, k=4, beta=2.0, chunk_tokens=chunk_tokens)
    logits = hidden @ weight.T
    want = clm_loss(logits, targets) + divergence_loss(logits, summary, kind=kind, k=4, beta=2.0)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(out.loss, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["tad", "topk", "kd"])
def test_chunked_equals_logits_path_on_a_wide_padded_vocabulary(kind, monkeypatch):
    """V = 3,000: the chunked path finds T_K by block maxima (23 full blocks and a partial one); −inf teacher rows
    (a padded vocabulary) add nothing; TAD's pre-pass sums its exps in row blocks (2 rows here: a full block and a
    partial one per chunk of 3)."""
    monkeypatch.setattr(losses, "_CACHE_BLOCK_BYTES", 2 * 3000 * 8)
    g = torch.Generator().manual_seed(31)
    B, T, d, V = 2, 4, 6, 3000
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher[..., 2980:] = float("-inf")
    targets = torch.randint(0, 2980, (B, T), generator=g)
    opts = dict(k=4, beta=1.3, temperature=1.2)
    out = distill_objective(hidden, weight, targets, teacher, kind=kind, chunk_tokens=3, **opts)
    logits = hidden @ weight.T
    want = clm_loss(logits, targets) + divergence_loss(logits, teacher, kind=kind, **opts)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(out.loss, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("teacher_kind", ["logits", "summary"])
def test_chunked_tad_falls_back_when_the_read_back_id_has_no_student_mass(teacher_kind, temperature):
    """The chunked path reads the student's mass off the top set (b_K, γ_M) back from the normaliser of its masked
    log-softmax at one id off that set: exact TAD's (K+1)-th teacher id; from a summary the largest student logit
    among the tail samples and ids 0..M. A −inf LM-head bias on every such id (a padding row) makes that read-back
    −inf − (−inf): the rows take the logsumexp over their masked logits and must still equal the logits path."""
    g = torch.Generator().manual_seed(37)
    B, T, d, V, K = 2, 5, 6, 30, 4
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(V, dtype=torch.float64)
    if teacher_kind == "logits":
        # finite teacher logits on ids 10..K+9 only (α_K = 0), so the (K+1)-th largest is a −inf id: no teacher
        # mass where the student has none
        teacher = torch.full((B, T, V), float("-inf"), dtype=torch.float64)
        teacher[..., 10:10 + K] = torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2
        bias[losses._top_k(teacher.reshape(-1, V), K + 1)[1][:, K]] = float("-inf")
        assert bias.isfinite().sum() > K  # the student keeps mass off T_K: the fallback's sum is not empty
        targets = torch.randint(10, 10 + K, (B, T), generator=g)
    else:
        # the teacher's top M among ids 20..29, so ids 0..M lie in its far tail; no samples (S = 0): a sample
        # with q = 0 would make the far-tail estimate infinite
        logits = torch.randn(B, T, V, generator=g) * 2
        logits[..., 20:] += 10
        teacher = summarize(logits, top_m=8, temperature=temperature, logp_dtype=torch.float32)
        bias[:9] = float("-inf")
        targets = torch.randint(9, V, (B, T), generator=g)
    bias.requires_grad_()
    opts = dict(k=K, beta=1.5, temperature=temperature)
    out = distill_objective(hidden, weight, targets, teacher, kind="tad", chunk_tokens=3, lm_head_bias=bias, **opts)
    student = hidden @ weight.T + bias
    want = clm_loss(student, targets) + divergence_loss(student, teacher, kind="tad", **opts)
    assert math.isfinite(out.loss.item())
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(out.loss, (hidden, weight, bias)),
                    torch.autograd.grad(want, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("teacher_kind", ["logits", "summary"])
def test_chunked_loss_memory_is_flat_in_tokens(teacher_kind):
    """Peak live memory of forward + backward stays O(chunk × V): flat as T grows, far below one [T, V] tensor."""
    V, d, chunk = 1024, 16, 64

    def peak(T, chunk_tokens):
        g = torch.Generator().manual_seed(T)
        hidden = torch.randn(1, T, d, generator=g, requires_grad=True)
        weight = torch.randn(V, d, generator=g, requires_grad=True)
        logits = torch.randn(1, T, V, generator=g)
        teacher = logits if teacher_kind == "logits" else summarize(logits, top_m=16, tail_samples=4, generator=g)
        targets = torch.randint(0, V, (1, T), generator=g)
        return peak_extra_bytes(lambda: distill_objective(hidden, weight, targets, teacher, kind="tad", k=5, beta=1.0,
                                                          chunk_tokens=chunk_tokens).loss.backward(), torch.device("cpu"))

    full_logits_bytes = 4096 * V * 4
    small, large = peak(256, chunk), peak(4096, chunk)
    # growth per token is O(d) (hidden-state gradients, per-token terms), not O(V)
    assert large - small < 0.05 * (4096 - 256) * V * 4, (small, large)
    assert large < 0.25 * full_logits_bytes, large
    assert peak(4096, 4096) > full_logits_bytes, "an unchunked run must show up in the probe"


# ---------------------------------------------------------------------------------------------
# Errors name the bad value
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0, beta=1.0), "k=0"),
    (dict(k=9, beta=1.0), "k=9 must be smaller than the vocabulary size 9"),
    (dict(k=2, beta=-0.5), "beta=-0.5"),
    (dict(k=2, beta=float("nan")), "beta=nan"),
    (dict(k=2, beta=1.0, temperature=0.0), "temperature=0.0"),
])
def test_invalid_arguments(kwargs, match):
    student, teacher, _ = make_case(0, 1, 2, 9)
    with pytest.raises(ValueError, match=match):
        tad_loss(student, teacher, **kwargs)


def test_k_larger_than_summary_m_is_refused():
    student, teacher, _ = make_case(0, 1, 2, 20)
    summary = summarize(teacher, top_m=4)
    with pytest.raises(ValueError, match="k=5 exceeds the summary's top_m=4"):
        tad_loss_from_summary(student, summary, k=5, beta=1.0)


def test_shape_mismatches_are_refused():
    student, teacher, _ = make_case(0, 2, 3, 9)
    with pytest.raises(ValueError, match="teacher logits"):
        tad_loss(student, teacher[:, :2], k=2, beta=1.0)
    with pytest.raises(ValueError, match="mask shape"):
        tad_loss(student, teacher, k=2, beta=1.0, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="teacher vocabulary 8"):
        tad_loss(student, teacher[..., :8], k=2, beta=1.0)
    with pytest.raises(ValueError, match="needs full teacher logits"):
        reverse_kl_loss(student, summarize(teacher, top_m=3))


@pytest.mark.parametrize("tail_samples", [0, 3])
def test_full_vocab_summary_has_finite_gradients(tail_samples):
    """M = V leaves no far tail (α_M = 0, γ_M = 1): the gradient must be finite and equal the exact one."""
    student, teacher, mask = make_case(31, 2, 4, 16)
    student = student.clone().requires_grad_()
    summary = summarize(teacher, top_m=16, tail_samples=tail_samples, logp_dtype=torch.float32)
    got = torch.autograd.grad(tad_loss_from_summary(student, summary, k=3, beta=1.0, mask=mask), student)[0]
    want = torch.autograd.grad(tad_loss(student, teacher, k=3, beta=1.0, mask=mask), student)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
