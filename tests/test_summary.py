"""The teacher summary: top-M, rest mass, far-tail samples, Arrow round trip, its recorded temperature, unbiased
far-tail KL; the same summary from hidden states and the LM head (summarize_hidden) as from full logits."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tailkd_ray.core.losses import tad_loss, tad_loss_from_summary
from tailkd_ray.core.summary import (FIELDS, TEMPERATURE_KEY, NonFiniteLogitsError, TeacherSummary, bytes_per_position,
                                summarize, summarize_hidden)


def teacher_logits(seed=0, shape=(2, 3, 50), scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_top_m_and_rest_mass_match_float64_reference():
    z = teacher_logits()
    s = summarize(z, top_m=7, tail_samples=0, temperature=1.5, logp_dtype=torch.float32)
    logp = torch.log_softmax(z / 1.5, -1)
    ref_logp, ref_ids = logp.topk(7, -1)
    assert torch.equal(s.top_ids, ref_ids.int())
    torch.testing.assert_close(s.top_logp, ref_logp.float())
    assert (s.top_logp[..., :-1] >= s.top_logp[..., 1:]).all(), "top ids must be sorted by probability"
    ref_rest = torch.log1p(-ref_logp.exp().sum(-1))
    torch.testing.assert_close(s.rest_logmass.double(), ref_rest, rtol=1e-5, atol=1e-6)
    assert s.top_ids.dtype == torch.int32 and s.rest_logmass.dtype == torch.float32


def test_default_dtype_is_float16_and_bytes_per_position():
    s = summarize(teacher_logits(), top_m=8, tail_samples=4)
    assert s.top_logp.dtype == s.tail_logp.dtype == torch.float16
    assert s.nbytes_per_position() == bytes_per_position(8, 4) == 12 * 6 + 4


def test_tail_samples_come_from_far_tail_with_teacher_probabilities():
    z = teacher_logits(shape=(1, 1, 12), scale=1.0)
    s = summarize(z, top_m=4, tail_samples=20000, generator=torch.Generator().manual_seed(0),
                  logp_dtype=torch.float32)
    top = set(s.top_ids.flatten().tolist())
    drawn = s.tail_ids.flatten()
    assert not top & set(drawn.tolist()), "a tail sample hit the top M"
    p = torch.softmax(z.flatten(), -1)
    far = [i for i in range(12) if i not in top]
    alpha = p[far].sum()
    for i in far:
        freq = (drawn == i).double().mean()
        assert freq.item() == pytest.approx((p[i] / alpha).item(), abs=0.015)
    logp = torch.log_softmax(z.flatten(), -1).float()
    torch.testing.assert_close(s.tail_logp.flatten(), logp[drawn.long()])


def test_generator_makes_samples_reproducible():
    z = teacher_logits()
    a = summarize(z, top_m=5, tail_samples=6, generator=torch.Generator().manual_seed(3))
    b = summarize(z, top_m=5, tail_samples=6, generator=torch.Generator().manual_seed(3))
    c = summarize(z, top_m=5, tail_samples=6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.tail_ids, b.tail_ids) and not torch.equal(a.tail_ids, c.tail_ids)


def test_full_vocab_summary_has_empty_far_tail():
    s = summarize(teacher_logits(), top_m=50, tail_samples=3)
    assert torch.isinf(s.rest_logmass).all() and (s.rest_logmass < 0).all()
    assert torch.isinf(s.tail_logp).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_name_the_position(bad):
    z = teacher_logits()
    z[1, 2, 7] = bad
    with pytest.raises(NonFiniteLogitsError, match=r"position \(1, 2\)") as raised:
        summarize(z, top_m=4)
    assert isinstance(raised.value, ValueError) and raised.value.position == (1, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_m=0), "top_m"), (dict(top_m=51), "top_m"), (dict(top_m=4, tail_samples=-1), "tail_samples"),
    (dict(top_m=4, temperature=0.0), "temperature"), (dict(top_m=4, logp_dtype=torch.bfloat16), "logp_dtype"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        summarize(teacher_logits(), **kwargs)


@pytest.mark.parametrize("logp_dtype, tail_samples", [(torch.float16, 2), (torch.float32, 2), (torch.float16, 0)])
def test_arrow_and_parquet_round_trip(tmp_path, logp_dtype, tail_samples):
    s = summarize(teacher_logits(shape=(3, 5, 40)), top_m=6, tail_samples=tail_samples, logp_dtype=logp_dtype,
                  generator=torch.Generator().manual_seed(0))
    assert s.tail_ids.shape == (3, 5, tail_samples)
    input_ids = torch.randint(0, 40, (3, 6), dtype=torch.int32).numpy()
    pq.write_table(pa.Table.from_batches([s.to_arrow({"input_ids": input_ids})]), tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet")
    back = TeacherSummary.from_arrow(table, tokens_per_row=5)
    for name in FIELDS:
        assert torch.equal(getattr(back, name), getattr(s, name)), name
    assert table.column("input_ids").to_pylist() == input_ids.tolist()
    assert back.temperature == s.temperature == 1.0


def test_summary_records_its_temperature_and_keeps_it():
    """τ travels with the object (map, flatten, to) and through Arrow / Parquet schema metadata; a summary built
    from bare tensors or a Ray Data batch does not know it (None) unless told."""
    s = summarize(teacher_logits(), top_m=4, tail_samples=2, temperature=2.0)
    assert s.temperature == 2.0
    assert FIELDS == ("top_ids", "top_logp", "rest_logmass", "tail_ids", "tail_logp")
    assert s.to("cpu").temperature == s.flatten_positions().temperature == s.map(lambda t: t[:1]).temperature == 2.0
    assert TeacherSummary(*(getattr(s, name) for name in FIELDS)).temperature is None
    assert TeacherSummary.from_batch(s.to_numpy()).temperature is None
    assert TeacherSummary.from_batch(s.to_numpy(), temperature=2.0).temperature == 2.0

    record = s.to_arrow()
    assert record.schema.metadata == {TEMPERATURE_KEY: b"2.0"}
    assert TeacherSummary.from_arrow(record, tokens_per_row=3).temperature == 2.0
    unknown = TeacherSummary.from_batch(s.to_numpy()).to_arrow()
    assert unknown.schema.metadata is None
    assert TeacherSummary.from_arrow(unknown, tokens_per_row=3).temperature is None


def test_numpy_batch_round_trip_is_zero_copy():
    s = summarize(teacher_logits(), top_m=4, tail_samples=2)
    batch = s.to_numpy()
    back = TeacherSummary.from_batch(batch)
    assert back.top_logp.data_ptr() == batch["top_logp"].__array_interface__["data"][0]
    with pytest.raises(KeyError, match="rest_logmass"):
        TeacherSummary.from_batch({k: v for k, v in batch.items() if k != "rest_logmass"})


def test_far_tail_estimate_is_unbiased():
    """Mean over seeds of the sampled summary loss converges to the exact TAD loss (M < V, S > 0)."""
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 60, generator=g, dtype=torch.float64)
    z = torch.randn(2, 4, 60, generator=g, dtype=torch.float64) * 1.5
    exact = tad_loss(student, z, k=4, beta=2.0).item()
    dropped = tad_loss_from_summary(student, summarize(z, top_m=8, logp_dtype=torch.float32), k=4, beta=2.0).item()
    draws = torch.tensor([
        tad_loss_from_summary(student, summarize(z, top_m=8, tail_samples=4, logp_dtype=torch.float32,
                                                 generator=torch.Generator().manual_seed(seed)), k=4, beta=2.0).item()
        for seed in range(400)])
    stderr = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - exact) < 4 * stderr + 1e-6
    assert abs(dropped - exact) > 10 * stderr, "dropping F should be visibly biased here"


def test_all_minus_inf_row_is_named_not_summarised_to_nan():
    z = teacher_logits()
    z[0, 1, :] = float("-inf")
    with pytest.raises(ValueError, match=r"position \(0, 1\) \(every vocabulary entry is -inf\)"):
        summarize(z, top_m=4)


def test_far_tail_of_a_peaked_teacher_does_not_underflow():
    """log α_M is a shifted logsumexp: a far tail with mass ~1e-30 keeps a finite, exact log mass."""
    z = torch.zeros(1, 1, 40, dtype=torch.float64)
    z[..., :4] = 70.0  # top 4 hold all but ~36·e^-70 ≈ 1.4e-29 of the mass
    s = summarize(z, top_m=4, tail_samples=3, logp_dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    expected = torch.log_softmax(z, -1)[..., 4:].logsumexp(-1)
    torch.testing.assert_close(s.rest_logmass.double(), expected, rtol=1e-6, atol=1e-4)
    assert (s.tail_ids >= 4).all() and torch.isfinite(s.tail_logp).all()


def test_chunked_summary_equals_one_pass(monkeypatch):
    """summarize() works on bounded chunks of positions; rows are independent, so chunking changes nothing —
    including where a non-finite position is reported."""
    import tailkd_ray.core.summary as summary_module

    z = teacher_logits(shape=(3, 5, 40))
    whole = summarize(z, top_m=6, tail_samples=3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(summary_module, "SUMMARY_CHUNK_BYTES", 4 * 40 * 2)  # two positions per chunk
    chunked = summarize(z, top_m=6, tail_samples=3, generator=torch.Generator().manual_seed(0))
    for name in FIELDS:
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    z[2, 3, :] = float("-inf")  # in the seventh chunk
    with pytest.raises(ValueError, match=r"position \(2, 3\)"):
        summarize(z, top_m=6)


def lm_head(seed=0, shape=(2, 5, 16), vocab=60, dtype=torch.float64, bias=True):
    """Hidden states [*shape], an LM head weight [vocab, d] and bias [vocab] (or None) scaled to give logits of a
    few units, as a trained teacher's."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, shape[-1], generator=g, dtype=torch.float64) * (3.0 / math.sqrt(shape[-1]))
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    return hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype)


def assert_same_summary(actual: TeacherSummary, expected: TeacherSummary) -> None:
    for name in ("top_ids", "tail_ids"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name
    for name in ("top_logp", "rest_logmass", "tail_logp"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=1e-6, atol=1e-6, msg=name)
    assert actual.temperature == expected.temperature


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("chunk_tokens", [3, 4, 10, None])  # 3 and 4 do not divide the 10 positions
def test_summarize_hidden_equals_summarize_on_full_logits(dtype, bias, temperature, chunk_tokens):
    hidden, weight, b = lm_head(dtype=dtype, bias=bias)
    uniforms = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(1))
    logits = hidden @ weight.T + (0 if b is None else b)
    args = dict(top_m=7, tail_samples=6, temperature=temperature, uniforms=uniforms, logp_dtype=torch.float32)
    lean = summarize_hidden(hidden, weight, b, chunk_tokens=chunk_tokens, **args)
    assert lean.shape == (2, 5) and lean.top_m == 7 and lean.tail_samples == 6
    assert_same_summary(lean, summarize(logits, **args))


def test_summarize_hidden_in_bf16_equals_summarize_on_the_heads_bf16_logits():
    """A bf16 teacher: the LM head runs in bf16 as the model's own forward does, the log-softmax in float32."""
    hidden, weight, b = lm_head(dtype=torch.bfloat16, shape=(3, 7, 32), vocab=200)
    args = dict(top_m=8, tail_samples=4, uniforms=torch.rand(3, 7, 4, generator=torch.Generator().manual_seed(2)))
    lean = summarize_hidden(hidden, weight, b, chunk_tokens=5, **args)
    assert lean.top_logp.dtype == torch.float16
    # the head's logits by the same 5-token matmuls: a bf16 GEMM's rounding depends on the kernel CPU torch picks
    # for the shape (and on process state), so one [21, 32] matmul can differ from five by an ulp and swap ties
    rows = hidden.reshape(-1, hidden.shape[-1])
    logits = torch.cat([torch.nn.functional.linear(chunk, weight, b) for chunk in rows.split(5)])
    assert_same_summary(lean, summarize(logits.reshape(*hidden.shape[:-1], -1), **args))


def test_summarize_hidden_applies_a_final_logit_softcap():
    hidden, weight, b = lm_head()
    hidden = hidden * 4  # logits of tens: well inside tanh's curved part at cap 10
    args = dict(top_m=5, tail_samples=3, uniforms=torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(3)),
                logp_dtype=torch.float32)
    capped = 10.0 * torch.tanh((hidden @ weight.T + b) / 10.0)
    lean = summarize_hidden(hidden, weight, b, softcap=10.0, chunk_tokens=3, **args)
    assert_same_summary(lean, summarize(capped, **args))
    assert not torch.allclose(summarize_hidden(hidden, weight, b, **args).top_logp, lean.top_logp)


def test_summarize_hidden_draws_the_same_samples_from_one_generator():
    hidden, weight, b = lm_head()
    lean = summarize_hidden(hidden, weight, b, top_m=4, tail_samples=5, chunk_tokens=3,
                            generator=torch.Generator().manual_seed(7))
    full = summarize(hidden @ weight.T + b, top_m=4, tail_samples=5, generator=torch.Generator().manual_seed(7))
    assert_same_summary(lean, full)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_summarize_hidden_names_a_non_finite_position_as_summarize_does(bad):
    hidden, weight, b = lm_head()
    hidden[1, 2, 3] = bad  # a whole logits row non-finite, in the second chunk of 4 positions
    with pytest.raises(NonFiniteLogitsError) as full:
        summarize(hidden @ weight.T + b, top_m=4)
    with pytest.raises(NonFiniteLogitsError, match=r"position \(1, 2\)") as lean:
        summarize_hidden(hidden, weight, b, top_m=4, chunk_tokens=4)
    assert lean.value.position == full.value.position == (1, 2) and lean.value.token == full.value.token


@pytest.mark.parametrize("change, match", [
    (dict(hidden=torch.zeros(2, 5, 15, dtype=torch.float64)), "width 15"),
    (dict(hidden=torch.zeros(2, 5, 16, dtype=torch.float32)), "float32"),
    (dict(lm_head_bias=torch.zeros(59, dtype=torch.float64)), "lm_head_bias"),
    (dict(softcap=0.0), "softcap"), (dict(chunk_tokens=0), "chunk_tokens"), (dict(top_m=61), "top_m"),
])
def test_summarize_hidden_invalid_arguments(change, match):
    hidden, weight, b = lm_head()
    args = dict(hidden=hidden, lm_head_weight=weight, lm_head_bias=b, top_m=4) | change
    with pytest.raises(ValueError, match=match):
        summarize_hidden(**args)
