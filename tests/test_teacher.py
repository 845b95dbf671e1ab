"""Teacher actor pool: summaries equal a direct ``summarize()`` (from hidden states, or from full logits for models
that post-process theirs), alignment, exactly-once scoring under an actor death, vocabulary checks, bad teacher
input (non-finite logits, out-of-vocabulary ids), the batch size in tokens."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from tailkd_ray.config import load_config
from tailkd_ray.core.summary import FIELDS, summarize
from tailkd_ray.data.hashing import block_hashes, format_block_hash, row_generator_seed
from tailkd_ray.errors import ConfigError, DataError, NonFiniteLogitsError, VocabularyError, find_tailkd_error
from tailkd_ray.models import check_vocab_compatible
from tailkd_ray.teacher.pool import ScoringProgress, TeacherScorer, score_dataset, scorer_kwargs, teacher_map_args

SEQ_LEN, TOP_M, TAIL = 24, 8, 4


def make_config(model_dir, **overrides):
    values = {"teacher.model": str(model_dir), "data.seq_len": SEQ_LEN, "summary.top_m": TOP_M,
              "summary.tail_samples": TAIL, "loss.k": 4, "teacher.batch_size": 3, "train.seed": 7, **overrides}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def tokenized_blocks(model_dir, builtin_corpus, rows: int) -> np.ndarray:
    """Packed [rows, SEQ_LEN + 1] blocks of real tokenized text from the built-in corpus."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_dir, _ = builtin_corpus
    ids: list[int] = []
    for path in sorted(train_dir.glob("*.txt")):
        ids += tokenizer(path.read_text())["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= rows * (SEQ_LEN + 1):
            break
    return np.array(ids[: rows * (SEQ_LEN + 1)], dtype=np.int32).reshape(rows, SEQ_LEN + 1)


def as_dataset(blocks: np.ndarray):
    import ray.data

    return ray.data.from_items([{"input_ids": row} for row in blocks])


def reference_summaries(model_dir, blocks: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The teacher run in-process on all blocks at once; summarize() per block with the block's generator."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(blocks[:, :-1]).long()).logits
    rows = []
    for row, block_hash in enumerate(block_hashes(blocks)):
        generator = torch.Generator().manual_seed(row_generator_seed(seed, block_hash))
        rows.append(summarize(logits[row], top_m=TOP_M, tail_samples=TAIL, generator=generator).to_numpy())
    return {name: np.stack([r[name] for r in rows]) for name in FIELDS}


def by_block(rows: list[dict]) -> dict[bytes, dict]:
    return {np.asarray(r["input_ids"], dtype=np.int32).tobytes(): r for r in rows}


def assert_rows_match_reference(rows: list[dict], blocks: np.ndarray, reference: dict[str, np.ndarray]) -> None:
    scored = by_block(rows)
    assert len(rows) == len(scored) == len(blocks)
    for i, block in enumerate(blocks):
        row = scored[block.tobytes()]
        np.testing.assert_array_equal(row["top_ids"], reference["top_ids"][i])
        np.testing.assert_array_equal(row["tail_ids"], reference["tail_ids"][i])
        np.testing.assert_allclose(row["top_logp"].astype(np.float32), reference["top_logp"][i].astype(np.float32),
                                   atol=1e-2, rtol=1e-3)
        np.testing.assert_allclose(row["tail_logp"].astype(np.float32),
                                   reference["tail_logp"][i].astype(np.float32), atol=1e-2, rtol=1e-3)
        np.testing.assert_allclose(row["rest_logmass"], reference["rest_logmass"][i], atol=1e-4, rtol=1e-4)


@pytest.mark.ray
@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_pool_summaries_equal_direct_summarize(model_fixture, request, ray_session, builtin_corpus, caplog):
    from tailkd_ray.pipelines.distill import teacher_summaries

    model_dir = request.getfixturevalue(model_fixture)
    blocks = tokenized_blocks(model_dir, builtin_corpus, rows=10)
    cfg = make_config(model_dir, **{"teacher.max_actors": 2})
    assert cfg.summary.cache_dir is None  # streaming mode: the pool's output itself
    with caplog.at_level("INFO", logger="tailkd_ray"), ScoringProgress("pool", SEQ_LEN) as progress:
        rows = teacher_summaries(cfg, as_dataset(blocks), progress=progress).take_all()
    # both actors count into one counter; the driver announces the total
    assert re.search(r"^pool: 10 blocks scored, [\d,]+ tokens/s, \d+ s$", caplog.messages[-1]), caplog.messages

    row = rows[0]
    assert row["input_ids"].shape == (SEQ_LEN + 1,) and row["input_ids"].dtype == np.int32
    assert row["top_ids"].shape == (SEQ_LEN, TOP_M) and row["top_logp"].shape == (SEQ_LEN, TOP_M)
    assert row["rest_logmass"].shape == (SEQ_LEN,)
    assert row["tail_ids"].shape == row["tail_logp"].shape == (SEQ_LEN, TAIL)
    assert_rows_match_reference(rows, blocks, reference_summaries(model_dir, blocks, seed=7))

    # Alignment: position t is the teacher's prediction from tokens 0..t, i.e. for the target token t + 1.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    block = blocks[3]
    scored = by_block(rows)[block.tobytes()]
    for t in (0, 5, SEQ_LEN - 1):
        with torch.inference_mode():
            last = model(torch.from_numpy(block[None, : t + 1]).long()).logits[:, -1]
        expected = summarize(last, top_m=TOP_M)
        np.testing.assert_array_equal(scored["top_ids"][t], expected.top_ids[0].numpy())
        np.testing.assert_allclose(scored["rest_logmass"][t], expected.rest_logmass[0].numpy(), atol=1e-4)


def tiny_model_dir(out_dir, kind: str):
    """A tiny random teacher whose logits are post-processed after its LM head: Gemma 2's final-logit softcap (at
    0.5, well inside tanh's curve for these logits) or Granite's division by logits_scaling."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = (Gemma2Config(**common, head_dim=16, final_logit_softcapping=0.5) if kind == "gemma2"
              else GraniteConfig(**common, logits_scaling=8.0))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("teacher, lean", [("tiny_llama_dir", True), ("tiny_gpt2_dir", True), ("gemma2", True),
                                           ("granite", False)])
def test_scorer_summaries_equal_summarize_on_the_models_full_logits(teacher, lean, request, tmp_path, caplog):
    """The actor summarises from the decoder's last hidden states through the LM head (Gemma 2: and its softcap),
    or, when the model post-processes its logits otherwise (Granite), from its full logits after a warning: either
    way the summaries of ``summarize`` on the model's own logits."""
    model_dir = (request.getfixturevalue(teacher) if teacher.endswith("_dir")
                 else tiny_model_dir(tmp_path / teacher, teacher))
    blocks = np.random.default_rng(0).integers(0, 320, (3, SEQ_LEN + 1), dtype=np.int32)
    with caplog.at_level("WARNING", logger="tailkd_ray.teacher.pool"):
        scorer = TeacherScorer(**scorer_kwargs(make_config(model_dir)))
    assert (scorer.lean is not None) == lean
    if not lean:
        assert "from the full [batch, T, V] logits" in caplog.text and "its logits are not its LM head's" in caplog.text
    out = scorer({"input_ids": blocks})
    rows = [{name: values[i] for name, values in out.items()} for i in range(len(blocks))]
    assert_rows_match_reference(rows, blocks, reference_summaries(model_dir, blocks, seed=7))


def test_teacher_batch_in_tokens(tiny_llama_dir):
    assert teacher_map_args(make_config(tiny_llama_dir))["batch_size"] == 3
    assert teacher_map_args(make_config(tiny_llama_dir, **{"teacher.tokens_per_batch": 100}))["batch_size"] == 4


class DiesOnFirstCall(TeacherScorer):
    """A scorer whose process dies (like a preempted node) on the first batch any actor receives."""

    def __init__(self, *, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = marker

    def __call__(self, batch):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().__call__(batch)
        os._exit(1)


@pytest.mark.ray
def test_every_block_scored_exactly_once_when_an_actor_dies(tiny_llama_dir, ray_session, builtin_corpus, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests directory
    blocks = tokenized_blocks(tiny_llama_dir, builtin_corpus, rows=12)
    cfg = make_config(tiny_llama_dir, **{"teacher.batch_size": 2, "teacher.max_actors": 2})
    args = teacher_map_args(cfg)
    marker = tmp_path / "died"
    args["fn_constructor_kwargs"] = {**args["fn_constructor_kwargs"], "marker": str(marker)}
    rows = as_dataset(blocks).map_batches(DiesOnFirstCall, **args).take_all()

    assert marker.exists(), "no actor died: the test did not exercise a failure"
    counts = Counter(np.asarray(r["input_ids"], dtype=np.int32).tobytes() for r in rows)
    assert counts == Counter(block.tobytes() for block in blocks)  # each block once, none lost or duplicated
    assert_rows_match_reference(rows, blocks, reference_summaries(tiny_llama_dir, blocks, seed=7))


def nan_embedding_teacher(model_dir, out_dir, token_id: int):
    """A copy of the teacher whose embedding of ``token_id`` is NaN: blocks holding that token get NaN logits
    (0 · NaN in masked attention spreads it over the whole block), other blocks stay finite."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = float("nan")
    model.save_pretrained(out_dir)
    for name in os.listdir(model_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(model_dir, name), out_dir)
    return out_dir


def test_non_finite_logits_error_names_the_row(tiny_llama_dir, builtin_corpus, tmp_path):
    blocks = tokenized_blocks(tiny_llama_dir, builtin_corpus, rows=4)
    poison = 319
    blocks[blocks == poison] = 1
    blocks[2, 10] = poison
    teacher = nan_embedding_teacher(tiny_llama_dir, tmp_path / "nan_teacher", poison)
    scorer = TeacherScorer(**scorer_kwargs(make_config(teacher)))
    block_hash = block_hashes(blocks)[2]
    with pytest.raises(NonFiniteLogitsError, match=rf"teacher .*: block_hash={format_block_hash(block_hash)} "
                                                   rf"\(row 2 of its batch.*not finite at position") as raised:
        scorer({"input_ids": blocks})
    assert raised.value.position[0] == 2
    # Blocks without the poisoned token are fine with the same teacher.
    assert scorer({"input_ids": blocks[:2]})["top_ids"].shape == (2, SEQ_LEN, TOP_M)


@pytest.mark.ray
def test_non_finite_logits_fail_the_pool_run_instead_of_retrying(tiny_llama_dir, builtin_corpus, tmp_path, ray_session):
    blocks = tokenized_blocks(tiny_llama_dir, builtin_corpus, rows=4)
    blocks[blocks == 319] = 1
    blocks[1, 3] = 319
    teacher = nan_embedding_teacher(tiny_llama_dir, tmp_path / "nan_teacher", 319)
    with pytest.raises(Exception, match=f"block_hash={format_block_hash(block_hashes(blocks)[1])}") as raised:
        score_dataset(as_dataset(blocks), make_config(teacher)).take_all()
    # What the CLI prints: the actor's error, found again behind Ray Data's wrapping.
    found = find_tailkd_error(raised.value)
    assert isinstance(found, NonFiniteLogitsError)
    assert f"block_hash={format_block_hash(block_hashes(blocks)[1])}" in str(found)


def test_out_of_vocabulary_and_misshapen_blocks_are_refused(tiny_llama_dir, builtin_corpus):
    scorer = TeacherScorer(**scorer_kwargs(make_config(tiny_llama_dir)))
    blocks = tokenized_blocks(tiny_llama_dir, builtin_corpus, rows=3)
    blocks[1, 7] = 320
    with pytest.raises(VocabularyError, match=r"row 1 of its batch.*token id 320 at position 7 is outside the "
                                              r"teacher's vocabulary \[0, 320\)"):
        scorer({"input_ids": blocks})
    with pytest.raises(DataError, match=r"shape \(3, 20\).*data.seq_len \+ 1 = 25"):
        scorer({"input_ids": blocks[:, :20]})
    ragged = np.empty(2, dtype=object)
    ragged[:] = [blocks[0], blocks[0][:-3]]
    with pytest.raises(DataError, match="row 1 of this batch has 22 tokens"):
        scorer({"input_ids": ragged})


def test_blocks_longer_than_the_teacher_context_are_refused_before_work(tiny_gpt2_dir):
    cfg = make_config(tiny_gpt2_dir, **{"data.seq_len": 300})
    with pytest.raises(ConfigError, match="data.seq_len = 300 exceeds the teacher's context window \\(256"):
        score_dataset(None, cfg)


# --- vocabulary compatibility -------------------------------------------------------------------------

def model_config_dir(path, vocab_size: int, tokenizer_from=None):
    """A directory with only a config.json (the checks never load weights) and optionally a tokenizer."""
    from transformers import GPT2Config

    path.mkdir()
    GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=1, n_head=2).save_pretrained(path)
    if tokenizer_from is not None:
        for name in os.listdir(tokenizer_from):
            if name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(tokenizer_from, name), path)
    return str(path)


def test_models_need_a_row_for_every_token(tiny_llama_dir, tmp_path):
    student = model_config_dir(tmp_path / "student256", 256)
    with pytest.raises(VocabularyError, match=r"student .*student256 has vocab_size 256 but the tokenizer .* has 320 "
                                              r"tokens"):
        check_vocab_compatible(str(tiny_llama_dir), student, None)
    assert check_vocab_compatible(str(tiny_llama_dir), str(tiny_llama_dir), None) == 320
    assert check_vocab_compatible(str(tiny_llama_dir), {"num_hidden_layers": 1}, str(tiny_llama_dir)) == 320


def test_padded_model_vocab_is_accepted_but_too_small_is_refused(tiny_llama_dir, tmp_path):
    padded = model_config_dir(tmp_path / "padded", 384, tokenizer_from=tiny_llama_dir)
    assert check_vocab_compatible(padded, model_config_dir(tmp_path / "padded_student", 352), None) == 320
    small = model_config_dir(tmp_path / "small", 256, tokenizer_from=tiny_llama_dir)
    with pytest.raises(VocabularyError, match=r"teacher .*small has vocab_size 256 but the tokenizer .* has 320"):
        check_vocab_compatible(small, None, None)


def test_token_table_mismatch_names_the_differing_tokens(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    swapped = tmp_path / "swapped_tokenizer"
    shutil.copytree(tiny_llama_dir, swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[100], by_id[101]
    vocab[a], vocab[b] = 101, 100
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    assert AutoTokenizer.from_pretrained(swapped).get_vocab()[a] == 101

    expected = f"at 2 id(s), first: id 100: {a!r} vs {b!r}, id 101: {b!r} vs {a!r}; tokenize the data with"
    with pytest.raises(VocabularyError, match="token tables differ .* " + re.escape(expected)):
        check_vocab_compatible(str(tiny_llama_dir), None, str(swapped))
    # score_dataset runs the same check before any work.
    cfg = make_config(tiny_llama_dir, **{"data.tokenizer": str(swapped)})
    with pytest.raises(VocabularyError, match="token tables differ"):
        score_dataset(None, cfg)


@pytest.mark.ray
def test_pool_that_no_node_can_host_is_refused_before_work(tiny_llama_dir, ray_session):
    from tailkd_ray.placement import PlacementError

    cfg = make_config(tiny_llama_dir, **{"teacher.resources": "{tailkd_inference: 1}"})
    with pytest.raises(PlacementError, match="teacher actors need .*tailkd_inference.* no alive node offers"):
        score_dataset(None, cfg)
