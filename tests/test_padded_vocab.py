"""Padded vocabularies (DESIGN §3): teacher and student share one tokenizer but not one embedding size.

The summary names only ids below the tokenizer's length; the teacher's mass on its padding rows is counted into
the rest mass; the losses give the student's padding rows probability 0; a Qwen2.5-sized pair (152,064 and
151,936 rows, hidden size 8) distils end to end; differing token tables are refused by name.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tailkd_ray.core.losses import divergence_loss, forward_kl_loss, teacher_logits_over
from tailkd_ray.core.summary import FIELDS, summarize, summarize_hidden
from tailkd_ray.errors import VocabularyError
from tailkd_ray.models import check_vocab_compatible

SHARED, TEACHER_ROWS, STUDENT_ROWS = 48, 56, 52


def padded_logits(seed: int = 0) -> torch.Tensor:
    """[2, 3, TEACHER_ROWS] logits whose padding rows hold a real share of the mass."""
    return torch.randn(2, 3, TEACHER_ROWS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_padding_mass_is_counted_into_the_rest_mass():
    logits = padded_logits()
    summary = summarize(logits, top_m=6, tail_samples=32, shared_vocab=SHARED, logp_dtype=torch.float32,
                        generator=torch.Generator().manual_seed(1))
    assert int(summary.top_ids.max()) < SHARED and int(summary.tail_ids.max()) < SHARED
    logp = torch.log_softmax(logits, -1)
    outside_top = logp.scatter(-1, summary.top_ids.long(), float("-inf"))
    # α_M from its members: the shared far tail and the padding rows.
    torch.testing.assert_close(summary.rest_logmass.double(), outside_top.logsumexp(-1), atol=1e-6, rtol=1e-6)
    padding = logp[..., SHARED:].logsumexp(-1)
    assert bool((summary.rest_logmass.double() > outside_top[..., :SHARED].logsumexp(-1) + 1e-3).all())
    assert bool((padding.exp() > 0.01).all())  # the test's padding rows carry mass to count
    # Each far-tail sample carries its share of the padding mass: log p_i + log α_M − log Σ_{far shared} p.
    carried = outside_top.logsumexp(-1) - outside_top[..., :SHARED].logsumexp(-1)
    expected = logp.gather(-1, summary.tail_ids.long()) + carried[..., None]
    torch.testing.assert_close(summary.tail_logp.double(), expected, atol=1e-5, rtol=1e-5)


def test_minus_inf_padding_rows_give_the_unpadded_summary():
    logits = padded_logits().float()
    logits[..., SHARED:] = float("-inf")
    uniforms = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(2))
    padded = summarize(logits, top_m=6, tail_samples=4, uniforms=uniforms, shared_vocab=SHARED)
    unpadded = summarize(logits[..., :SHARED], top_m=6, tail_samples=4, uniforms=uniforms)
    for name in FIELDS:
        assert torch.equal(getattr(padded, name), getattr(unpadded, name)), name


def test_summarize_hidden_equals_summarize_on_padded_rows():
    generator = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 5, 16, generator=generator), torch.randn(TEACHER_ROWS, 16, generator=generator)
    uniforms = torch.rand(2, 5, 4, generator=generator)
    args = dict(top_m=6, tail_samples=4, uniforms=uniforms, shared_vocab=SHARED, logp_dtype=torch.float32)
    lean, full = summarize_hidden(hidden, weight, chunk_tokens=3, **args), summarize(hidden @ weight.T, **args)
    for name in ("top_ids", "tail_ids"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name
    for name in ("top_logp", "rest_logmass", "tail_logp"):
        torch.testing.assert_close(getattr(lean, name), getattr(full, name), atol=1e-5, rtol=1e-5)


def test_top_m_must_leave_a_shared_id_for_the_padding_mass():
    with pytest.raises(ValueError, match="leaves no shared id beyond the top M"):
        summarize(padded_logits(), top_m=SHARED, shared_vocab=SHARED)
    with pytest.raises(ValueError, match="shared_vocab must be in"):
        summarize(padded_logits(), top_m=4, shared_vocab=TEACHER_ROWS + 1)


def test_summary_loss_is_the_kl_to_the_teacher_with_its_padding_mass_in_the_far_tail():
    """M = V_s − 1 leaves one shared far-tail id, so the sampled far-tail term is exact: forward KL from the
    summary equals KL(p̃ ‖ q) over the student's rows, p̃ = p on the top M, α_M (padding mass included) on the
    far-tail id, 0 on every padding row of either model (the student's included)."""
    teacher = padded_logits()
    student = torch.randn(2, 3, STUDENT_ROWS, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    summary = summarize(teacher, top_m=SHARED - 1, tail_samples=1, shared_vocab=SHARED, logp_dtype=torch.float32)
    logp = torch.log_softmax(teacher, -1)
    target = torch.full_like(student, float("-inf"))
    target.scatter_(-1, summary.top_ids.long(), logp.gather(-1, summary.top_ids.long()))
    target.scatter_(-1, summary.tail_ids[..., :1].long(), summary.rest_logmass.double()[..., None])
    assert torch.allclose(target.logsumexp(-1), torch.zeros(2, 3, dtype=torch.float64), atol=1e-6)
    from_summary = divergence_loss(student, summary, kind="kd")
    torch.testing.assert_close(from_summary, forward_kl_loss(student, target), atol=1e-5, rtol=1e-5)
    # TAD with β = 1, two-term form, is forward KL too; it is never negative.
    tad = divergence_loss(student, summary, kind="tad", k=5, beta=1.0, normalize=False)
    torch.testing.assert_close(tad, from_summary, atol=1e-5, rtol=1e-5)
    assert float(divergence_loss(student, summary, kind="tad", k=5, beta=2.0)) > 0


def test_full_teacher_logits_over_the_students_rows():
    teacher = padded_logits()
    over = teacher_logits_over(teacher, SHARED, STUDENT_ROWS)
    assert over.shape[-1] == STUDENT_ROWS
    assert torch.equal(over[..., :SHARED], teacher[..., :SHARED])
    assert bool(torch.isneginf(over[..., SHARED:]).all())
    assert teacher_logits_over(teacher, TEACHER_ROWS, TEACHER_ROWS) is teacher
    # The exact loss pushes the student's mass off its padding rows: its gradient there is q (p = 0).
    student = torch.randn(2, 3, STUDENT_ROWS, dtype=torch.float64, requires_grad=True)
    forward_kl_loss(student, over).backward()
    q = torch.softmax(student.detach(), -1)
    torch.testing.assert_close(student.grad[..., SHARED:], q[..., SHARED:] / 6)


# --- the start-up check -----------------------------------------------------------------------------------------

def config_dir(path, vocab_size: int, tokenizer_from=None) -> str:
    """A model directory with only a config.json (the checks never load weights) and optionally a tokenizer."""
    from transformers import LlamaConfig

    path.mkdir()
    LlamaConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(path)
    if tokenizer_from is not None:
        for name in tokenizer_from.iterdir():
            if name.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(name, path)
    return str(path)


def test_padded_teacher_and_student_are_accepted(tiny_tokenizer_dir, tmp_path):
    teacher = config_dir(tmp_path / "teacher", 384, tokenizer_from=tiny_tokenizer_dir)
    assert check_vocab_compatible(teacher, config_dir(tmp_path / "student", 352), None) == 320
    assert check_vocab_compatible(teacher, {"vocab_size": 320}, None) == 320
    with pytest.raises(VocabularyError, match=r"student \(student.config\) has vocab_size 300 but the tokenizer "
                                              r"data tokenizer .*teacher has 320 tokens"):
        check_vocab_compatible(teacher, {"vocab_size": 300}, None)


def test_reverse_kl_with_a_padded_student_is_refused_before_work(tiny_tokenizer_dir, tmp_path):
    from tailkd_ray.config import load_config
    from tailkd_ray.pipelines.preflight import check_inputs

    teacher = config_dir(tmp_path / "teacher", 384, tokenizer_from=tiny_tokenizer_dir)

    def config(student_rows: int):
        return load_config(None, [f"teacher.model={teacher}", f"output_dir={tmp_path / 'out'}", "summary.top_m=null",
                                  "loss.kind=rkl", f"student.config={{vocab_size: {student_rows}}}"])

    with pytest.raises(VocabularyError, match="loss.kind = rkl: the student has 32 padding rows beyond the "
                                              "tokenizer's 320 tokens"):
        check_inputs(config(352))
    check_inputs(config(320))


def test_a_student_with_another_token_table_is_refused_naming_both_and_the_token(tiny_tokenizer_dir, tmp_path):
    teacher = config_dir(tmp_path / "teacher", 384, tokenizer_from=tiny_tokenizer_dir)
    student = config_dir(tmp_path / "student", 384, tokenizer_from=tiny_tokenizer_dir)
    spec_path = tmp_path / "student" / "tokenizer.json"
    spec = json.loads(spec_path.read_text())
    vocab = spec["model"]["vocab"]
    token = {i: t for t, i in vocab.items()}[200]
    vocab["renamed"] = vocab.pop(token)
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(VocabularyError, match=rf"token tables differ between the teacher .*teacher tokenizer .* "
                                              rf"and the student .*student tokenizer .*first: id 200: {token!r} vs "
                                              rf"'renamed'; distil into a student of the teacher's tokenizer"):
        check_vocab_compatible(teacher, student, None)


def test_lean_teacher_scores_padded_rows_and_reports_their_mass(tiny_tokenizer_dir, tmp_path, caplog):
    """The pool's scorer (lean: hidden states through the LM head) summarises a 384-row teacher over the 320
    tokens as ``summarize`` does on its full logits, and logs the padding rows and their mass."""
    import numpy as np

    from tailkd_ray.config import load_config
    from tailkd_ray.data.hashing import block_hashes, row_generator_seed
    from tailkd_ray.models import llama_config, load_model, save_random_model
    from tailkd_ray.teacher.pool import TeacherScorer, scorer_kwargs

    teacher = save_random_model(llama_config(vocab=384, layers=1, width=16, heads=2, intermediate=32,
                                             max_positions=64), tmp_path / "teacher", seed=0,
                                tokenizer=tiny_tokenizer_dir)
    cfg = load_config(None, [f"teacher.model={teacher}", "data.seq_len=8", "summary.top_m=6",
                             "summary.tail_samples=3", "loss.k=4"])
    with caplog.at_level("WARNING", logger="tailkd_ray.teacher.pool"):
        scorer = TeacherScorer(**scorer_kwargs(cfg, 320))
    assert scorer.lean is not None
    assert "has 384 embedding rows for 320 tokens: the 64 padding rows are never summary ids" in caplog.text
    blocks = np.random.default_rng(0).integers(0, 320, size=(2, 9)).astype(np.int32)
    rows = scorer({"input_ids": blocks})
    with torch.inference_mode():
        logits = load_model(teacher, trust_remote_code=False)(torch.from_numpy(blocks[:, :-1]).long()).logits
    for row, block_hash in enumerate(block_hashes(blocks)):
        generator = torch.Generator().manual_seed(row_generator_seed(cfg.train.seed, block_hash))
        expected = summarize(logits[row], top_m=6, tail_samples=3, generator=generator, shared_vocab=320)
        np.testing.assert_array_equal(rows["top_ids"][row], expected.top_ids.numpy())
        np.testing.assert_array_equal(rows["tail_ids"][row], expected.tail_ids.numpy())
        np.testing.assert_allclose(rows["rest_logmass"][row], expected.rest_logmass.numpy(), atol=1e-4)
    assert rows["top_ids"].max() < 320 and rows["tail_ids"].max() < 320


def test_cache_identity_holds_the_shared_vocabulary(tiny_tokenizer_dir, builtin_corpus, tmp_path):
    """A cache scored with other summary ids (another shared vocabulary) is never reused."""
    from tailkd_ray.config import load_config
    from tailkd_ray.teacher.cache import cache_identity

    teacher = config_dir(tmp_path / "teacher", 384, tokenizer_from=tiny_tokenizer_dir)
    cfg = load_config(None, [f"teacher.model={teacher}", f"data.train={builtin_corpus[0]}"])
    assert cache_identity(cfg, teacher_id={}, split="train")["shared_vocab"] == 320


# --- end to end ------------------------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.parametrize("mode", ["streamed", "colocated"])
def test_qwen_sized_padded_pair_distils_end_to_end(mode, tiny_tokenizer_dir, builtin_corpus, ray_session, tmp_path):
    """Teacher 152,064 rows, student 151,936 rows (Qwen2.5-7B and -0.5B), one 320-token tokenizer: summaries
    streamed from the pool, or the exact loss on the co-located teacher's full logits."""
    from tailkd_ray.config import load_config
    from tailkd_ray.models import llama_config, save_random_model
    from tailkd_ray.pipelines.distill import distill
    from tailkd_ray.train.runlog import read_records

    teacher = save_random_model(llama_config(vocab=152_064, layers=1, width=8, heads=2, intermediate=16,
                                             max_positions=64), tmp_path / "teacher", seed=0,
                                tokenizer=tiny_tokenizer_dir)
    _, corpus = builtin_corpus
    out = tmp_path / "run"
    cfg = load_config(None, [f"teacher.model={teacher}", f"data.train={corpus}", "data.seq_len=16",
                             "data.val_fraction=0.2", "summary.top_m=8", "summary.tail_samples=2", "loss.k=4",
                             "loss.chunk_tokens=32", "student.config={vocab_size: 151936}",
                             "train.num_workers=1", "train.strategy=ddp", "train.max_steps=2", "train.batch_size=2",
                             "train.eval_every=2", "teacher.batch_size=8", f"output_dir={out}",
                             *(["summary.top_m=null"] if mode == "colocated" else [])])
    metrics = distill(cfg)
    steps = read_records(out, "step")
    assert [r["step"] for r in steps] == [1, 2] and all(r["div"] > 0 for r in steps), steps
    assert metrics["step"] == 2 and metrics["kl_to_teacher"] > 0 and torch.isfinite(torch.tensor(metrics["val_loss"]))
    assert metrics["kl_source"] == ("exact" if mode == "colocated" else "summary")
    exported = json.loads((out / "student" / "config.json").read_text())
    assert exported["vocab_size"] == 151_936
