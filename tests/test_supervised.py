"""Supervised data (issue 15): chat and prompt/completion samples, their completion-only loss mask from tokenizing
through packing, the teacher pool, the cache, training and evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tailkd_ray.config import ConfigError, DataConfig, load_config
from tailkd_ray.data.pack import IngestReport, tokenize_and_pack
from tailkd_ray.data.read import read_documents
from tailkd_ray.data.samples import (ChatTemplate, MalformedSample, chat_segments, prompt_completion_segments)
from tailkd_ray.errors import DataError
from tailkd_ray.models import load_tokenizer, tokenizer_size

SEQ_LEN = 24
LONG = 64  # tokens per block: room for several short samples
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"}]
# What each template renders as the assistant turns: the content and the end-of-turn text.
ASSISTANT_TURNS = {"qwen2.5": ["It is 4.<|im_end|>\n", "6<|im_end|>\n"], "llama3": ["It is 4.<|eot_id|>", "6<|eot_id|>"]}


@pytest.mark.parametrize("name", sorted(ASSISTANT_TURNS))
def test_chat_segments_are_the_rendered_conversation_cut_at_the_assistant_turns(chat_tokenizer_dirs, name):
    tokenizer = load_tokenizer(chat_tokenizer_dirs[name])
    segments, trained = chat_segments(CONVERSATION, ChatTemplate.of(tokenizer))
    assert "".join(segments) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert [s for s, t in zip(segments, trained) if t] == ASSISTANT_TURNS[name]
    assert trained == [False, True, False, True]


def test_a_template_with_generation_marks_gives_its_own_assistant_spans(chat_tokenizer_dirs):
    tokenizer = load_tokenizer(chat_tokenizer_dirs["qwen2.5"])
    marked = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
              "{% endfor %}")
    template = ChatTemplate(template=marked, special_tokens={}, tokenizer="marked")
    segments, trained = chat_segments(CONVERSATION, template)
    assert [s for s, t in zip(segments, trained) if t] == ["It is 4.<|im_end|>", "6<|im_end|>"]
    # the same spans transformers' assistant-token mask covers
    out = tokenizer.apply_chat_template(CONVERSATION, chat_template=marked, return_assistant_tokens_mask=True,
                                        return_dict=True, tokenize=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "It is 4.<|im_end|>6<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    rewriting = "{% for m in messages %}{{ m.role }}{% if loop.last %}!{% endif %}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(DataError, match="does not render a conversation prefix by prefix"):
        chat_segments(CONVERSATION, ChatTemplate(template=rewriting, special_tokens={}, tokenizer="t"))


@pytest.mark.parametrize("messages, reason", [
    ("hello", "'messages' is str"), ([], "'messages' is list"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "message 1 has role 'robot'"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "message 0 is dict"),
    ([{"role": "assistant", "content": "x"}], "starts with an assistant turn"),
])
def test_malformed_conversations_say_what_is_wrong(chat_tokenizer_dirs, messages, reason):
    template = ChatTemplate.of(load_tokenizer(chat_tokenizer_dirs["qwen2.5"]))
    with pytest.raises(MalformedSample, match=reason):
        chat_segments(messages, template)


def test_prompt_completion_segments():
    assert prompt_completion_segments("Q: 2+2?\nA:", " 4") == (["Q: 2+2?\nA:", " 4"], [False, True])
    with pytest.raises(MalformedSample, match="'completion' is int"):
        prompt_completion_segments("Q", 4)
    with pytest.raises(MalformedSample, match="empty completion"):
        prompt_completion_segments("Q", "")


def test_train_on_completion_needs_a_supervised_format():
    with pytest.raises(ConfigError, match="data.train_on = completion needs data.format chat or prompt_completion"):
        load_config(None, ["data.format=jsonl", "data.train_on=completion"])
    assert DataConfig(format="chat").completion_mask() and not DataConfig(format="chat", train_on="all").completion_mask()
    assert not DataConfig(format="jsonl").completion_mask()


# --- through Ray: reading and packing ------------------------------------------------------------------------------
def _pack(pattern, tokenizer_dir, **fields):
    data_cfg = DataConfig(**{"seq_len": SEQ_LEN, "tokenizer_actors": 1, **fields})
    tokenizer = load_tokenizer(tokenizer_dir)
    template = ChatTemplate.of(tokenizer) if data_cfg.format == "chat" else None
    report = IngestReport()
    rows = tokenize_and_pack(read_documents(str(pattern), data_cfg, template), tokenizer, data_cfg,
                             vocab_size=tokenizer_size(tokenizer), stats=report).take_all()
    return rows, report


def _expected(tokenizer, samples):
    """(ids, mask) of the packed stream: each sample's segments tokenized on their own, then EOS."""
    ids, mask = [], []
    for segments, trained, eos_trained in samples:
        for text, flag in zip(segments, trained):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [int(flag)] * len(piece)
        ids.append(tokenizer.eos_token_id)
        mask.append(int(eos_trained))
    return np.array(ids), np.array(mask)


def _stacked(rows, column):
    return np.concatenate([np.asarray(row[column]) for row in rows])


def _whole_samples(rows, samples, eos_id) -> int:
    """Check packed blocks against ``samples`` [(ids, mask)], in order: each block holds whole samples, its position
    ids restarting at 0 at each, then padding (masked EOS ids) only where the next sample does not fit. Returns the
    number of padding ids."""
    pending, padding = list(samples), 0
    for row in rows:
        ids, mask, positions = (np.asarray(row[name]) for name in ("input_ids", "loss_mask", "position_ids"))
        starts = [*np.flatnonzero(positions == 0), len(positions)]
        assert starts[0] == 0
        for start, end in zip(starts, starts[1:]):
            np.testing.assert_array_equal(positions[start:end], np.arange(end - start))
            if pending and len(pending[0][0]) == end - start and (ids[start:end] == pending[0][0]).all():
                np.testing.assert_array_equal(mask[start:end], pending.pop(0)[1])
            else:  # padding: the rest of the block, too short for the next sample
                assert end == len(ids) and (ids[start:end] == eos_id).all() and not mask[start:end].any()
                assert not pending or end - start < len(pending[0][0])
                padding += end - start
    assert not pending
    return padding


@pytest.mark.parametrize("name", sorted(ASSISTANT_TURNS))
def test_chat_jsonl_packs_with_its_assistant_mask_and_counts_malformed_lines(ray_session, chat_tokenizer_dirs,
                                                                             tmp_path, name):
    tokenizer_dir = chat_tokenizer_dirs[name]
    tokenizer = load_tokenizer(tokenizer_dir)
    good = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]] * 4
    lines = [json.dumps({"messages": m}) for m in good]
    lines[2:2] = [json.dumps({"text": "no messages"}), json.dumps({"messages": [{"role": "user", "content": "?"}]})]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    seq_len = 160  # the templates' system prompts make long samples
    rows, report = _pack(tmp_path / "chat.jsonl", tokenizer_dir, format="chat", seq_len=seq_len)
    template = ChatTemplate.of(tokenizer)
    whole = [_expected(tokenizer, [(*chat_segments(m, template), False)]) for m in good]
    samples = [(ids[: seq_len + 1], mask[: seq_len + 1]) for ids, mask in whole]  # data.overlong: truncate
    padding = _whole_samples(rows, samples, tokenizer.eos_token_id)
    assert padding == report.padding_tokens > 0 and report.truncated == sum(len(i) > seq_len + 1 for i, _ in whole)
    assert len(rows) == report.blocks and report.blocks * (seq_len + 1) == report.tokens + padding
    assert report.skipped["malformed"] == 2 and report.documents == len(good) + 2
    assert report.completion_tokens == sum(m.sum() for _, m in samples)
    assert report.tokens == sum(len(i) for i, _ in samples)
    assert report.skipped_examples == [f"malformed: {tmp_path / 'chat.jsonl'}:3 (no field 'messages'; fields: text)",
                                       f"malformed: {tmp_path / 'chat.jsonl'}:4 (no assistant turn (nothing to train on))"]


def test_prompt_completion_parquet_trains_the_completion_and_its_eos(ray_session, tiny_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    pairs = [(f"Question {i}: what is {i} plus {i}?\nAnswer:", f" {2 * i}. Done") for i in range(12)]
    pq.write_table(pa.table({"prompt": [p for p, _ in pairs] + ["no completion"],
                             "completion": [c for _, c in pairs] + [None]}), tmp_path / "pc.parquet")
    rows, report = _pack(tmp_path / "pc.parquet", tiny_tokenizer_dir, format="prompt_completion", seq_len=LONG)
    samples = [_expected(tokenizer, [([p, c], [False, True], True)]) for p, c in pairs]
    assert _whole_samples(rows, samples, tokenizer.eos_token_id) == report.padding_tokens
    assert report.skipped["malformed"] == 1
    # train_on: all trains every id but a sample's first (nothing of its own before it) and the padding
    all_rows, all_report = _pack(tmp_path / "pc.parquet", tiny_tokenizer_dir, format="prompt_completion",
                                 train_on="all", seq_len=LONG)
    everything = [(ids, np.arange(len(ids)) > 0) for ids, _ in samples]
    assert _whole_samples(all_rows, everything, tokenizer.eos_token_id) == all_report.padding_tokens
    assert all_report.completion_tokens == all_report.tokens - len(samples)


def test_a_parquet_file_without_the_column_is_named(ray_session, tiny_tokenizer_dir, tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"]}), tmp_path / "pc.parquet")
    with pytest.raises(DataError, match=r"pc.parquet has no column 'completion'.*data.format = prompt_completion"):
        _pack(tmp_path / "pc.parquet", tiny_tokenizer_dir, format="prompt_completion")


def test_chat_needs_a_tokenizer_with_a_template(tiny_tokenizer_dir):
    with pytest.raises(DataError, match="has none: set data.tokenizer to a tokenizer with a chat_template"):
        ChatTemplate.of(load_tokenizer(tiny_tokenizer_dir))


# --- the loss mask through the teacher pool, the cache, the loss and the metrics -----------------------------------
def _masked_blocks():
    """Two blocks differing only in their last id, a masked target (1 marks completion; the first id is no target)."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 320, (2, SEQ_LEN + 1)).astype(np.int32)
    ids[1, :-1] = ids[0, :-1]
    ids[1, -1] = (ids[0, -1] + 1) % 320
    mask = np.zeros((2, SEQ_LEN + 1), np.uint8)
    mask[:, 5:12] = mask[:, 15:SEQ_LEN] = 1  # two completions; the last target is prompt
    return ids, mask


def _objective(student, batch, kind):
    import torch

    from tailkd_ray.core.losses import distill_objective
    from tailkd_ray.core.metrics import target_mask
    from tailkd_ray.core.summary import TeacherSummary

    ids = torch.as_tensor(batch["input_ids"]).long()
    teacher = TeacherSummary.from_batch(batch)
    student.zero_grad()
    out = student(ids[:, :-1], lambda h, w, b: distill_objective(
        h, w, ids[:, 1:], teacher, kind=kind, k=4, mask=target_mask(batch, "cpu")))
    out.loss.backward()
    return out, [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("kind", ["tad", "kd", "clm"])
def test_a_masked_position_changes_nothing_from_the_teacher_pool_to_the_metrics(tiny_llama_dir, tmp_path, kind):
    """Flip a masked target: the teacher's summaries (scored over every position), the cached rows, the loss, its
    gradient and the eval metrics are unchanged, and the loss and metrics count only the completion targets. (The
    far-tail samples are drawn with a seed of the whole block's content, so a block with another last id draws
    others: an equally valid estimate, but not the same numbers: the loss compares both blocks with the first one's.)"""
    import torch

    from tailkd_ray.core.metrics import evaluate
    from tailkd_ray.models import StudentWithHead, load_model
    from tailkd_ray.teacher.cache import restore_shapes, write_shard
    from tailkd_ray.teacher.pool import TeacherScorer, scorer_kwargs

    cfg = load_config(None, [f"teacher.model={tiny_llama_dir}", f"data.seq_len={SEQ_LEN}", "summary.top_m=8",
                             "summary.tail_samples=4", "loss.k=4", "data.format=chat"])
    ids, mask = _masked_blocks()
    scored = TeacherScorer(**scorer_kwargs(cfg))({"input_ids": ids, "loss_mask": mask})
    np.testing.assert_array_equal(scored["loss_mask"], mask)
    write_shard(scored, root=str(tmp_path), temperature=1.0)
    (shard,) = tmp_path.glob("part-*.parquet")
    cached = restore_shapes(pq.read_table(shard), seq_len=SEQ_LEN)
    np.testing.assert_array_equal(cached["loss_mask"], mask)
    np.testing.assert_array_equal(cached["input_ids"], ids)
    for name in ("top_ids", "top_logp", "rest_logmass"):
        np.testing.assert_array_equal(cached[name][0], cached[name][1])  # the teacher never sees the last id
    tails = ("tail_ids", "tail_logp")
    rows = [{name: values[0 if name in tails else i][None] for name, values in cached.items()} for i in range(2)]
    student = StudentWithHead(load_model(str(tiny_llama_dir), device=torch.device("cpu"), dtype=torch.float32,
                                          trust_remote_code=False)).requires_grad_(True)
    (out_a, grads_a), (out_b, grads_b) = (_objective(student, row, kind) for row in rows)
    assert out_a.tokens == mask[0, 1:].sum() == 16
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=0)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    # Without the mask the loss reads every position's summary: as scored (the cache blanks masked ones to zeros,
    # which are no summary: tail ids inside the top M with α_M = 1 make the divergence inf).
    unmasked = [{name: values[0 if name in tails else i][None] for name, values in scored.items()
                 if name != "loss_mask"} for i in range(2)]
    loss_a, loss_b = (_objective(student, row, kind)[0].loss for row in unmasked)
    assert torch.isfinite(loss_a) and torch.isfinite(loss_b) and loss_a != loss_b
    metrics_a, metrics_b = (evaluate(student, [row], k=4) for row in rows)
    assert metrics_a == metrics_b and metrics_a["tokens"] == 16
    assert evaluate(student, [unmasked[0]], k=4)["val_loss"] != evaluate(student, [unmasked[1]], k=4)["val_loss"]


@pytest.mark.parametrize("kind", ["tad", "kd"])
def test_the_cache_blanks_the_summaries_of_masked_targets_and_nothing_reads_them(tiny_llama_dir, tmp_path, kind):
    """``write_shard`` zeroes the summary at masked targets (prompts, padding): the cached rows give the loss, its
    gradient and the eval metrics of the summaries as scored; the shard verifies and is smaller."""
    import torch

    from tailkd_ray.core.metrics import evaluate
    from tailkd_ray.core.summary import FIELDS
    from tailkd_ray.models import StudentWithHead, load_model
    from tailkd_ray.teacher.cache import restore_shapes, write_shard
    from tailkd_ray.teacher.pool import TeacherScorer, scorer_kwargs

    cfg = load_config(None, [f"teacher.model={tiny_llama_dir}", f"data.seq_len={SEQ_LEN}", "summary.top_m=8",
                             "summary.tail_samples=4", "loss.k=4", "data.format=chat"])
    ids, mask = _masked_blocks()
    scored = TeacherScorer(**scorer_kwargs(cfg))({"input_ids": ids, "loss_mask": mask})
    shards = {}
    for name, batch in (("blanked", scored), ("stored", {**scored, "loss_mask": np.ones_like(mask)})):
        (tmp_path / name).mkdir()
        shards[name] = tmp_path / name / write_shard(batch, root=str(tmp_path / name), temperature=1.0)["shard"][0]
    cached = restore_shapes(pq.read_table(shards["blanked"]), seq_len=SEQ_LEN)
    masked = mask[:, 1:] == 0
    for field in FIELDS:
        assert not cached[field][masked].any() and scored[field][masked].any()
        np.testing.assert_array_equal(cached[field][~masked], scored[field][~masked])
    student = StudentWithHead(load_model(str(tiny_llama_dir), device=torch.device("cpu"), dtype=torch.float32,
                                          trust_remote_code=False)).requires_grad_(True)
    (out_cached, grads_cached), (out_scored, grads_scored) = (_objective(student, rows, kind)
                                                              for rows in (cached, scored))
    torch.testing.assert_close(out_cached.loss, out_scored.loss, rtol=0, atol=0)
    for grad_cached, grad_scored in zip(grads_cached, grads_scored):
        torch.testing.assert_close(grad_cached, grad_scored, rtol=0, atol=0)
    assert evaluate(student, [cached], k=4) == evaluate(student, [scored], k=4)
    assert shards["blanked"].stat().st_size < shards["stored"].stat().st_size


def test_beta_averages_the_teacher_tail_mass_over_the_completion_tokens_of_each_sequence():
    """TAD with a mask equals TAD on the completion tokens alone, sequence by sequence (β(X) = β / mean α_K over
    the sequence's completion tokens), weighted by their counts."""
    import torch

    from tailkd_ray.core.losses import distill_objective

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 10, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    teacher, targets = torch.randn(2, 10, 30, dtype=torch.float64) * 3, torch.randint(0, 30, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 2:5] = mask[1, 4:10] = True
    args = dict(kind="tad", k=3, beta=1.5, chunk_tokens=4)
    masked = distill_objective(hidden, weight, targets, teacher, mask=mask, **args)
    parts = [distill_objective(hidden[i, mask[i]][None], weight, targets[i, mask[i]][None], teacher[i, mask[i]][None],
                               **args) for i in range(2)]
    expected = sum(p.loss * p.tokens for p in parts) / sum(p.tokens for p in parts)
    torch.testing.assert_close(masked.loss, expected)
    assert masked.tokens == 9


# --- end to end: chat data through tokenizing, the summary cache, Ray Train and validation -------------------------
def _conversations(n: int, offset: int) -> list[str]:
    return [json.dumps({"messages": [{"role": "system", "content": "Add."},
                                     {"role": "user", "content": f"What is {i} plus {i + 1}?"},
                                     {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}]})
            for i in range(offset, offset + n)]


@pytest.mark.ray
def test_chat_distillation_trains_and_evaluates_on_the_completion_tokens(ray_session, chat_tokenizer_dirs,
                                                                         tmp_path_factory):
    from tailkd_ray.config import from_dict
    from tailkd_ray.models import llama_config, save_random_model
    from tailkd_ray.pipelines.distill import distill
    from tailkd_ray.train.runlog import read_records

    tokenizer_dir = chat_tokenizer_dirs["qwen2.5"]
    teacher = save_random_model(
        llama_config(vocab=len(load_tokenizer(tokenizer_dir)), layers=1, width=32, heads=2, kv_heads=1,
                     intermediate=64, max_positions=256), tmp_path_factory.mktemp("chat_teacher"), seed=0,
        tokenizer=tokenizer_dir)
    data = tmp_path_factory.mktemp("chat_data")
    (data / "train.jsonl").write_text("\n".join(_conversations(40, 0)) + "\n")
    (data / "val.jsonl").write_text("\n".join(_conversations(8, 100)) + "\n")
    out = tmp_path_factory.mktemp("chat_run")
    cfg = from_dict({
        "output_dir": str(out / "run"), "teacher": {"model": str(teacher)},
        "student": {"config": {"num_hidden_layers": 1}, "init": "random"},
        "data": {"train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"), "format": "chat",
                 "seq_len": 160, "tokenizer_actors": 1},
        "summary": {"top_m": 16, "tail_samples": 2, "cache_dir": str(out / "cache")},
        "loss": {"kind": "tad", "k": 4, "chunk_tokens": 160},
        "train": {"num_workers": 1, "strategy": "ddp", "max_steps": 3, "batch_size": 2, "warmup_steps": 1,
                  "eval_every": 100, "checkpoint_every": 100, "loggers": []},
    })
    metrics = distill(cfg)
    report = json.loads((out / "run" / "data_report.json").read_text())
    assert 0 < report["completion_tokens"] < report["tokens"] / 2  # the prompts (and system prompt) are longer
    assert report["padding_tokens"] > 0 and report["truncated"] == 0
    val = [pq.read_table(shard) for shard in (out / "cache" / "val").glob("part-*.parquet")]
    val_mask, val_positions = (np.concatenate([np.stack(t.column(name).to_numpy(zero_copy_only=False)).reshape(-1, 161)
                                               for t in val]) for name in ("loss_mask", "position_ids"))
    assert metrics["tokens"] == val_mask[:, 1:].sum() > 0
    assert (val_positions[:, 0] == 0).all() and (val_positions == 0).sum(1).max() > 2  # two samples and padding
    steps = read_records(out / "run", "step")
    assert len(steps) == 3 and all(r["tokens"] < 2 * 160 for r in steps) and sum(r["tokens"] for r in steps) > 0
    # tailkd eval's Python API on the same val conversations as a datasets.Dataset: the token metrics and the
    # completions of the path's
    import datasets

    from tailkd_ray.pipelines.evaluate import evaluate_student

    generation = replace(cfg.generation, examples=4, max_new_tokens=4)
    by_path = evaluate_student(replace(cfg, generation=generation), out / "run" / "student")
    conversations = datasets.Dataset.from_list([json.loads(line) for line in _conversations(8, 100)])
    in_memory = evaluate_student(replace(cfg, generation=generation, data=replace(cfg.data, val=None)),
                                 out / "run" / "student", val_data=conversations)
    assert by_path["tokens"] == in_memory["tokens"] == metrics["tokens"]
    for name in ("val_loss", "kl_to_teacher", "exact_match", "rouge_l", "teacher_exact_match"):
        assert by_path[name] == in_memory[name], name
    generated = [json.loads(line) for line in Path(in_memory["generation"]["generations"]).read_text().splitlines()]
    assert [g["source"] for g in generated] == [f"hf:dataset[row {i}]" for i in range(4)]


def test_a_batch_without_completion_tokens_gives_zero_gradients_everywhere():
    """A micro-batch of prompt only still reaches every parameter (DDP requires it), with zero gradients."""
    import torch

    from tailkd_ray.core.losses import distill_objective

    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight, bias = torch.randn(30, 8, requires_grad=True), torch.randn(30, requires_grad=True)
    out = distill_objective(hidden, weight, torch.zeros(1, 4, dtype=torch.long), None, kind="clm",
                            mask=torch.zeros(1, 4, dtype=torch.bool), lm_head_bias=bias)
    out.loss.backward()
    assert out.tokens == 0 and all(t.grad is not None and not t.grad.any() for t in (hidden, weight, bias))


# --- data.packing: false: one sample per block, no attention across samples ----------------------------------------
def _pairs(n: int) -> list[tuple[str, str]]:
    return [(f"Question {i}: what is {i} plus {i}?\nAnswer:", f" {2 * i}." + " Indeed" * (i % 3)) for i in range(n)]


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_without_packing_each_sample_is_one_padded_block(ray_session, tiny_tokenizer_dir, tmp_path, overlong):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    pairs = _pairs(6) + [("A long prompt " * 20, " and its completion")]
    (tmp_path / "pc.jsonl").write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in pairs) + "\n")
    rows, report = _pack(tmp_path / "pc.jsonl", tiny_tokenizer_dir, format="prompt_completion", packing=False,
                         overlong=overlong, seq_len=LONG)
    kept = pairs if overlong == "truncate" else pairs[:-1]
    assert len(rows) == len(kept) == report.blocks and "position_ids" not in rows[0]
    padding = 0
    for row, (prompt, completion) in zip(rows, kept):
        ids, mask = _expected(tokenizer, [([prompt, completion], [False, True], True)])
        n = min(len(ids), LONG + 1)
        np.testing.assert_array_equal(row["input_ids"][:n], ids[:n])
        np.testing.assert_array_equal(row["loss_mask"], np.concatenate([mask[:n], np.zeros(LONG + 1 - n)]))
        assert (row["input_ids"][n:] == tokenizer.eos_token_id).all()
        padding += LONG + 1 - n
    assert (report.truncated, report.skipped["overlong"]) == ((1, 0) if overlong == "truncate" else (0, 1))
    assert report.padding_tokens == padding
    # packed (blocks of three short samples): whole samples, the long one cut or skipped, counted the same way
    packed, packed_report = _pack(tmp_path / "pc.jsonl", tiny_tokenizer_dir, format="prompt_completion",
                                  overlong=overlong, seq_len=2 * LONG)
    samples = [tuple(a[: 2 * LONG + 1] for a in _expected(tokenizer, [([p, c], [False, True], True)]))
               for p, c in kept]
    assert _whole_samples(packed, samples, tokenizer.eos_token_id) == packed_report.padding_tokens < padding
    assert (packed_report.truncated, packed_report.skipped["overlong"]) == (report.truncated, report.skipped["overlong"])
    assert len(packed) == packed_report.blocks < len(rows)
    text_rows, _ = _pack(tmp_path / "pc.jsonl", tiny_tokenizer_dir, format="jsonl", text_column="prompt",
                         packing=False, seq_len=LONG)
    length = len(tokenizer(pairs[0][0], add_special_tokens=False)["input_ids"]) + 1
    assert text_rows[0]["loss_mask"].tolist() == [0] + [1] * (length - 1) + [0] * (LONG + 1 - length)
    assert "position_ids" not in text_rows[0]


@pytest.mark.parametrize("kind", ["clm", "kd"])
def test_the_loss_of_a_padded_batch_is_the_loss_of_its_samples_one_by_one(tiny_llama_dir, tiny_tokenizer_dir, kind):
    """Blocks of one right-padded sample each: the batch's loss (the teacher scoring the same blocks) equals the
    token-weighted losses of the samples run alone, unpadded."""
    import torch

    from tailkd_ray.core.losses import distill_objective
    from tailkd_ray.core.metrics import target_mask
    from tailkd_ray.models import StudentWithHead, load_model

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    samples = [_expected(tokenizer, [([p, c], [False, True], True)]) for p, c in _pairs(4)]
    ids = np.full((len(samples), LONG + 1), tokenizer.eos_token_id)
    mask = np.zeros((len(samples), LONG + 1), np.uint8)
    for row, (sample_ids, sample_mask) in enumerate(samples):
        ids[row, : len(sample_ids)], mask[row, : len(sample_mask)] = sample_ids, sample_mask
    model = load_model(str(tiny_llama_dir), device=torch.device("cpu"), dtype=torch.float64, trust_remote_code=False)
    student = StudentWithHead(model)

    def loss(block, block_mask):
        block = torch.as_tensor(block).long()
        teacher = None if kind == "clm" else model(input_ids=block[:, :-1]).logits  # the same blocks
        return student(block[:, :-1], lambda h, w, b: distill_objective(h, w, block[:, 1:], teacher, kind=kind,
                                                                         mask=block_mask))

    batch = loss(ids, target_mask({"loss_mask": mask}, "cpu"))
    alone = [loss(sample_ids[None], torch.as_tensor(sample_mask[1:], dtype=torch.bool)[None])
             for sample_ids, sample_mask in samples]
    assert batch.tokens == sum(a.tokens for a in alone) == mask[:, 1:].sum()
    torch.testing.assert_close(batch.loss, sum(a.loss * a.tokens for a in alone) / batch.tokens)


@pytest.mark.parametrize("fmt", ["prompt_completion", "chat", "jsonl", "tokens"])
def test_a_hugging_face_dataset_gives_the_blocks_of_its_rows_read_from_jsonl(ray_session, chat_tokenizer_dirs,
                                                                            tmp_path, fmt):
    """``train_data=`` (a datasets.Dataset, read with ray.data.from_huggingface) packs exactly as its rows written to
    jsonl and read by path: same ids, loss mask and counts; its bad row is skipped and named by its row."""
    import datasets

    from tailkd_ray.config import from_dict
    from tailkd_ray.data.splits import train_val_datasets, with_in_memory_data
    from tailkd_ray.teacher.cache import data_fingerprint

    if fmt == "chat":
        records = [{"messages": m} for m in [CONVERSATION[1:3], [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": "Hello, friend."}]] * 5]
        bad, reason = {"messages": [{"role": "user", "content": "?"}]}, "no assistant turn (nothing to train on)"
    elif fmt == "prompt_completion":
        records = [{"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}. Done"}
                   for i in range(12)]
        bad, reason = {"prompt": "no completion", "completion": None}, "'completion' is NoneType, expected a string"
    elif fmt == "jsonl":
        records, bad = [{"text": f"Document {i} says {i} plus {i} is {2 * i}."} for i in range(12)], {"text": None}
    else:
        records, bad = [{"input_ids": list(range(i + 5, i + 15))} for i in range(12)], {"input_ids": None}
    records.insert(3, bad)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = {"format": fmt, "tokenizer": str(chat_tokenizer_dirs["qwen2.5"]), "seq_len": SEQ_LEN,
            "tokenizer_actors": 1, "val_fraction": 0.0, "shuffle": False}
    by_path, _, path_report = train_val_datasets(from_dict({"data": {**data, "train": str(tmp_path / "train.jsonl")}}))
    dataset = datasets.Dataset.from_list(records)
    cfg, corpora = with_in_memory_data(from_dict({"data": data}), train_data=dataset)
    assert cfg.data.train == f"hf:dataset@{dataset._fingerprint}"
    in_memory, _, report = train_val_datasets(cfg, corpora)
    expected, got = by_path.take_all(), in_memory.take_all()
    assert len(got) == len(expected) > 0
    supervised = fmt in ("chat", "prompt_completion")
    for column in ("input_ids", "loss_mask", "position_ids") if supervised else ("input_ids",):
        np.testing.assert_array_equal(_stacked(got, column), _stacked(expected, column))
    assert (report.documents, report.tokens, report.skipped) == (path_report.documents, path_report.tokens,
                                                                 path_report.skipped)
    if fmt in ("chat", "prompt_completion"):
        assert report.skipped["malformed"] == 1
        assert report.skipped_examples == [f"malformed: hf:dataset[row 3] ({reason})"]
    else:
        assert report.skipped["null"] == 1 and report.skipped_examples == ["null: hf:dataset[row 3]"]
        assert path_report.skipped_examples == [f"null: {tmp_path / 'train.jsonl'}:4"]
    # The summary cache's identity pins the content: another row, another fingerprint
    other, _ = with_in_memory_data(from_dict({"data": data}), train_data=dataset.select(range(len(records) - 1)))
    assert data_fingerprint(other) != data_fingerprint(cfg)
    assert data_fingerprint(with_in_memory_data(from_dict({"data": data}),
                                                train_data=datasets.Dataset.from_list(records))[0]) == data_fingerprint(cfg)


def test_a_dataset_and_a_path_for_one_split_are_refused(tmp_path):
    import datasets

    from tailkd_ray.config import from_dict
    from tailkd_ray.data.splits import with_in_memory_data
    from tailkd_ray.pipelines.distill import distill
    from tailkd_ray.pipelines.evaluate import evaluate_student
    from tailkd_ray.pipelines.score import score

    cfg = from_dict({"data": {"format": "prompt_completion", "train": "train.jsonl"},
                     "summary": {"cache_dir": str(tmp_path / "cache"), "top_m": 16}})
    rows = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}])
    with pytest.raises(ConfigError, match=r"data.train \(train.jsonl\) and train_data .* both given"):
        with_in_memory_data(cfg, train_data=rows)
    with pytest.raises(DataError, match="val_data must be a datasets.Dataset, got DatasetDict .* dataset\\['train'\\]"):
        with_in_memory_data(cfg, val_data=datasets.DatasetDict({"train": rows}))
    for run in (distill, score, lambda *args, **kwargs: evaluate_student(*args, tmp_path / "student", **kwargs)):
        with pytest.raises(ConfigError, match=r"data.train \(train.jsonl\) and train_data"):  # before any work
            run(cfg, train_data=rows)
    with_val, corpora = with_in_memory_data(cfg, val_data=rows)
    assert with_val.data.train == "train.jsonl" and list(corpora) == [with_val.data.val]
    assert cfg.data.val is None  # the caller's config is left as it was
