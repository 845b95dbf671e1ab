"""Packed supervised samples without cross-talk (issue 15, DESIGN §1): a block of whole samples with position ids
restarting at each one gives, for the student, the teacher and the loss, what each sample gives run alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tailkd_ray.core.losses import distill_objective
from tailkd_ray.core.metrics import block_tensors
from tailkd_ray.models import StudentWithHead

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
VOCAB = 320  # conftest's TINY_VOCAB
BLOCK = 26  # seq_len + 1: three samples of 7, 5 and 9 ids, then 5 ids of padding
LENGTHS, PROMPTS = (7, 5, 9), (3, 2, 4)  # ids per sample (BOS first, EOS last); of them, the prompt's
EOS = 0
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64}


def _model(architecture: str, attention: str, seed: int):
    """A random tiny float64 causal LM: Llama, or Qwen2 (biased q/k/v) from its published config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tailkd_ray.models import llama_config

    if architecture == "llama":
        config = llama_config(vocab=VOCAB, layers=2, width=32, heads=4, kv_heads=2, intermediate=64, max_positions=64)
    else:
        config = AutoConfig.from_pretrained(FIXTURES / "qwen2.5-0.5b")
        config.update({**TINY, "tie_word_embeddings": False})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float64).eval()


def _samples(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss_mask) per sample: a prompt (masked, the first id too), then a completion ending in EOS."""
    rng = np.random.default_rng(seed)
    out = []
    for length, prompt in zip(LENGTHS, PROMPTS):
        ids = np.concatenate([rng.integers(1, VOCAB, length - 1), [EOS]]).astype(np.int32)
        out.append((ids, (np.arange(length) >= prompt).astype(np.uint8)))
    return out


def _block(samples) -> dict[str, torch.Tensor]:
    """One packed block of ``samples`` and its padding, as the packer lays it out (``data.pack``)."""
    pad = BLOCK - sum(len(ids) for ids, _ in samples)
    ids = np.concatenate([s[0] for s in samples] + [np.full(pad, EOS, np.int32)])
    mask = np.concatenate([s[1] for s in samples] + [np.zeros(pad, np.uint8)])
    positions = np.concatenate([np.arange(len(s[0])) for s in samples] + [np.arange(pad)]).astype(np.int32)
    return {"input_ids": torch.as_tensor(ids)[None], "loss_mask": torch.as_tensor(mask)[None],
            "position_ids": torch.as_tensor(positions)[None]}


def _run(student, teacher, batch: dict, kind: str):
    """(loss · tokens, tokens, the student's logits [T, V]) of a batch of one block, the teacher at its positions."""
    inputs, targets, mask, positions = block_tensors(batch, "cpu")
    with torch.no_grad():
        reference = None if kind == "clm" else teacher(input_ids=inputs, position_ids=positions, use_cache=False).logits
        logits = student.model(input_ids=inputs, position_ids=positions, use_cache=False).logits[0]
        out = student(inputs, lambda h, w, b: distill_objective(h, w, targets, reference, kind=kind, k=4, beta=1.5,
                                                                mask=mask, position_ids=positions),
                      position_ids=positions)
    return out.loss * out.tokens, out.tokens, logits


def _alone(ids, mask) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.as_tensor(ids)[None], "loss_mask": torch.as_tensor(mask)[None]}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["clm", "kd", "tad"])
def test_a_packed_block_gives_what_its_samples_give_alone(architecture, attention, kind):
    student = StudentWithHead(_model(architecture, attention, seed=0))
    teacher = _model(architecture, attention, seed=1)
    samples = _samples(0)
    packed_sum, packed_tokens, packed_logits = _run(student, teacher, _block(samples), kind)
    alone = [_run(student, teacher, _alone(ids, mask), kind) for ids, mask in samples]
    assert packed_tokens == sum(a[1] for a in alone) == sum(int(m[1:].sum()) for _, m in samples)
    torch.testing.assert_close(packed_sum, sum(a[0] for a in alone), rtol=0, atol=1e-5)
    starts = np.cumsum([0, *LENGTHS[:-1]])
    for start, (ids, _), (_, _, logits) in zip(starts, samples, alone):
        torch.testing.assert_close(packed_logits[start:start + len(ids) - 1], logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_changing_one_sample_leaves_the_next_ones_unchanged(attention):
    student = StudentWithHead(_model("llama", attention, seed=0))
    samples = _samples(0)
    changed = [_samples(1)[0], *samples[1:]]
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1] - 1)
    logits, changed_logits = (_run(student, None, _block(s), "clm")[2][second] for s in (samples, changed))
    torch.testing.assert_close(logits, changed_logits, rtol=0, atol=1e-10)
    causal = [{**_block(s), "position_ids": None} for s in (samples, changed)]  # one sequence: cross-talk
    logits, changed_logits = (student.model(input_ids=b["input_ids"][:, :-1]).logits[0, second] for b in causal)
    assert not torch.allclose(logits, changed_logits)


def test_the_teacher_scores_each_packed_sample_as_it_scores_it_alone(tiny_llama_dir):
    """The scorer's deterministic summary fields (top ids, their log-probs, the rest mass) at a packed sample's
    positions equal those of the sample scored alone (in a block of its own, padded); the far-tail samples are drawn
    with a seed of the whole block, so they are not compared. The block's mask and positions travel on; without the
    positions, the second sample's summaries differ."""
    from tailkd_ray.config import load_config
    from tailkd_ray.teacher.pool import TeacherScorer, scorer_kwargs

    cfg = load_config(None, [f"teacher.model={tiny_llama_dir}", f"data.seq_len={BLOCK - 1}", "summary.top_m=8",
                             "summary.tail_samples=2", "summary.logp_dtype=float32", "loss.k=4",
                             "data.format=chat"])
    scorer = TeacherScorer(**scorer_kwargs(cfg))
    samples = _samples(0)
    packed = {name: values.numpy() for name, values in _block(samples).items()}
    scored = scorer(packed)
    for name in ("loss_mask", "position_ids"):
        np.testing.assert_array_equal(scored[name], packed[name])
    start = 0
    for ids, mask in samples:
        alone = scorer({name: values.numpy() for name, values in _block([(ids, mask)]).items()})
        for name in ("top_ids", "top_logp", "rest_logmass"):
            np.testing.assert_allclose(scored[name][0, start:start + len(ids)], alone[name][0, :len(ids)],
                                       rtol=0, atol=1e-5)
        start += len(ids)
    without = scorer({"input_ids": packed["input_ids"]})  # one sequence: the second sample sees the first
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    assert not np.allclose(scored["top_logp"][0, second], without["top_logp"][0, second], rtol=0, atol=1e-3)

