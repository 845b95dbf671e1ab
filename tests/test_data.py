"""Ray Data ingest (tailkd_ray.data: read, pack, splits, hashing): every format packs into exact seq_len + 1 int32 blocks of the
EOS-joined token stream, deterministically, with bad input skipped-and-counted or refused by name."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tailkd_ray.config import DataConfig, load_config
from tailkd_ray.data import pack
from tailkd_ray.data.hashing import held_out_mask
from tailkd_ray.data.pack import IngestReport, check_packing_tokenizer, split_text, tokenize_and_pack
from tailkd_ray.data.read import read_documents
from tailkd_ray.data.splits import train_val_datasets
from tailkd_ray.errors import DataError
from tailkd_ray.models import load_tokenizer, tokenizer_size

pytestmark = pytest.mark.ray

SEQ_LEN = 31  # blocks of 32 ids
DOCS = [
    "def add(a, b):  return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "Unicode survives: caf\u00e9, na\u00efve, \u65e5\u672c.",
    "x = [i ** 2 for i in range(10)]  # squares",
    "import os; print(os.getcwd())",
    "while True: pass",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _stream(tokenizer, docs) -> np.ndarray:
    """The reference: each document tokenized without special tokens, followed by EOS."""
    ids = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.array(ids, np.int32)


def _pack(pattern, tokenizer_dir, *, fmt="text", **data_fields):
    data_cfg = DataConfig(format=fmt, seq_len=SEQ_LEN, tokenizer_actors=1, **data_fields)
    report, tokenizer = IngestReport(), load_tokenizer(tokenizer_dir)
    blocks = tokenize_and_pack(read_documents(str(pattern), data_cfg), tokenizer, data_cfg,
                               vocab_size=tokenizer_size(tokenizer), stats=report)
    rows = [row["input_ids"] for row in blocks.take_all()]
    return (np.stack(rows) if rows else np.zeros((0, SEQ_LEN + 1), np.int32)), report


def _write_corpus(tmp_path, layout, tokenizer):
    """The DOCS in one of the supported layouts; returns (pattern, format, extra DataConfig fields)."""
    if layout == "text_line":
        (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
        return tmp_path / "docs.txt", "text", {"text_document": "line"}
    if layout == "text_file":
        for i, doc in enumerate(DOCS):
            (tmp_path / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        return tmp_path / "*.txt", "text", {"text_document": "file"}
    if layout == "jsonl":
        lines = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(DOCS)]
        (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return tmp_path, "jsonl", {"text_column": "body"}
    if layout == "parquet":  # two files: the glob's sorted order is the document order
        pq.write_table(pa.table({"text": DOCS[:4]}), tmp_path / "a.parquet")
        pq.write_table(pa.table({"text": DOCS[4:]}), tmp_path / "b.parquet")
        return tmp_path / "*.parquet", "parquet", {}
    ids = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in DOCS]
    (tmp_path / "tokens.jsonl").write_text("\n".join(json.dumps({"ids": x}) for x in ids), encoding="utf-8")
    return tmp_path / "tokens.jsonl", "tokens", {"tokens_column": "ids"}


# tokens in Parquet: test_out_of_vocab_and_null_rows_are_counted (each Parquet read costs ~10 s here)
@pytest.mark.parametrize("layout", ["text_line", "text_file", "jsonl", "parquet", "tokens_jsonl"])
def test_each_format_packs_the_eos_joined_stream(ray_session, tiny_tokenizer_dir, tokenizer, tmp_path, layout):
    pattern, fmt, fields = _write_corpus(tmp_path, layout, tokenizer)
    blocks, report = _pack(pattern, tiny_tokenizer_dir, fmt=fmt, **fields)
    stream = _stream(tokenizer, DOCS)
    n = len(stream) // (SEQ_LEN + 1)
    assert n >= 3 and blocks.dtype == np.int32 and blocks.shape == (n, SEQ_LEN + 1)
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: n * (SEQ_LEN + 1)])
    assert (report.documents, report.tokens, report.blocks) == (len(DOCS), len(stream), n)
    assert report.dropped_tokens == len(stream) - n * (SEQ_LEN + 1)
    assert sum(report.skipped.values()) == 0
    assert tokenizer.decode(blocks[0]).startswith(DOCS[0])


def test_tails_of_many_batches_are_packed_not_lost(ray_session, tiny_tokenizer_dir, tokenizer, tmp_path,
                                                   monkeypatch):
    docs = DOCS * 5
    (tmp_path / "docs.txt").write_text("\n".join(docs), encoding="utf-8")
    monkeypatch.setitem(pack._DOCS_PER_BATCH, "line", 4)  # 8 batches, each leaving a tail
    blocks, report = _pack(tmp_path / "docs.txt", tiny_tokenizer_dir, text_document="line")
    stream = _stream(tokenizer, docs)
    assert report.blocks == len(blocks) == len(stream) // (SEQ_LEN + 1)  # only the final partial block drops
    assert report.dropped_tokens == len(stream) % (SEQ_LEN + 1)
    kept = Counter(blocks.reshape(-1).tolist())
    assert not kept - Counter(stream.tolist()) and sum(kept.values()) == len(stream) - report.dropped_tokens


def test_split_is_deterministic_disjoint_and_sized(ray_session, builtin_corpus, tiny_tokenizer_dir):
    train_dir, _ = builtin_corpus
    cfg = load_config(None, [f"data.train={train_dir}", f"data.tokenizer={tiny_tokenizer_dir}", "data.seq_len=63",
                             "data.val_fraction=0.2", "train.seed=3"])

    def run():
        train, val, report = train_val_datasets(cfg)
        return ([r["input_ids"].tobytes() for r in train.take_all()],
                [r["input_ids"].tobytes() for r in val.take_all()], report)

    train, val, report = run()
    assert run()[:2] == (train, val)
    assert not set(train) & set(val)
    assert (len(train), len(val)) == (report.train_blocks, report.val_blocks)
    assert len(train) + len(val) == report.blocks > 4000
    assert abs(len(val) / report.blocks - 0.2) < 0.03
    assert report.tokens == report.blocks * 64 + report.dropped_tokens


def test_train_blocks_are_shuffled_by_the_seed_and_val_blocks_are_not(ray_session, builtin_corpus,
                                                                      tiny_tokenizer_dir):
    _, val_dir = builtin_corpus  # the same files as train and val corpus: val keeps the corpus order

    def blocks(*overrides):
        cfg = load_config(None, [f"data.train={val_dir}", f"data.val={val_dir}", f"data.tokenizer={tiny_tokenizer_dir}",
                                 "data.seq_len=31", *overrides])
        train, val, _ = train_val_datasets(cfg)
        return [r["input_ids"].tobytes() for r in train.take_all()], [r["input_ids"].tobytes() for r in val.take_all()]

    corpus_order, _ = blocks("data.shuffle=false")
    shuffled, val = blocks()
    assert len(shuffled) > 100 and sorted(shuffled) == sorted(corpus_order) and shuffled != corpus_order
    assert val == corpus_order
    assert blocks()[0] == shuffled  # the same seed, the same order
    other_seed = blocks("train.seed=1")[0]
    assert sorted(other_seed) == sorted(shuffled) and other_seed != shuffled


def test_pretokenized_ids_are_checked_against_the_largest_id(ray_session, tmp_path):
    """The offline Qwen2.5 tokenizer keeps its special tokens at the published ids (from 151,643) above a gap:
    ids in the gap are below the shared vocabulary (largest id + 1 = 151,665) and kept; from there on skipped."""
    qwen = Path(__file__).parent / "fixtures" / "configs" / "qwen2.5-0.5b"
    assert len(load_tokenizer(qwen)) < 1000 < tokenizer_size(load_tokenizer(qwen)) == 151_665
    docs = [[5, 1000, 6] * 6, [7, 151_665, 8] * 6, [151_664, 9] * 10]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"input_ids": doc}) + "\n" for doc in docs))
    cfg = load_config(None, [f"data.train={tmp_path / 't.jsonl'}", "data.format=tokens", f"data.tokenizer={qwen}",
                             "data.seq_len=15", "data.val_fraction=0", "data.shuffle=false"])
    train, _, report = train_val_datasets(cfg)
    assert report.skipped["out_of_vocab"] == 1 and report.documents == 3
    assert report.skipped_examples == [f"out_of_vocab: {tmp_path / 't.jsonl'}:2 (id 151665, vocabulary 151665)"]
    kept = np.concatenate([row["input_ids"] for row in train.take_all()]).tolist()
    assert kept[:20] == docs[0] + [load_tokenizer(qwen).eos_token_id] + [151_664]


def test_separate_val_corpus(ray_session, builtin_corpus, tiny_tokenizer_dir):
    train_dir, val_dir = builtin_corpus
    cfg = load_config(None, [f"data.train={train_dir}", f"data.val={val_dir}", f"data.tokenizer={tiny_tokenizer_dir}",
                             "data.seq_len=63"])
    train, val, report = train_val_datasets(cfg)
    assert (train.count(), val.count()) == (report.train_blocks, report.val_blocks)
    files = len(list(train_dir.glob("*.txt"))) + len(list(val_dir.glob("*.txt")))
    assert report.val_blocks > 50 and report.documents == files
    assert "0 val" not in report.summary()


def test_held_out_mask_depends_on_seed_and_ids_only():
    blocks = np.random.default_rng(0).integers(0, 320, size=(4000, 16), dtype=np.int32)
    mask = held_out_mask(blocks, 7, 0.1)
    assert abs(mask.mean() - 0.1) < 0.02
    np.testing.assert_array_equal(held_out_mask(blocks[::-1], 7, 0.1), mask[::-1])
    assert (held_out_mask(blocks, 8, 0.1) != mask).sum() > 100
    assert not held_out_mask(blocks, 7, 0.0).any()


def test_split_text_keeps_the_tokenization(tokenizer):
    text = " ".join(DOCS) * 40 + "   spaces\n\n  and\ttabs " * 30
    pieces = split_text(text, 200)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 200 and len(pieces) > 10
    joined = [i for p in pieces for i in tokenizer(p, add_special_tokens=False)["input_ids"]]
    assert joined == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_bad_text_files_are_counted_and_a_huge_document_packs(ray_session, tiny_tokenizer_dir, tokenizer, tmp_path):
    huge = ("lorem ipsum dolor sit amet " * 80_000)[:2_000_000]  # ~2 MB, one line
    (tmp_path / "a_good.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "b_empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "c_bad.txt").write_bytes(b"caf\xe9 in latin-1")
    (tmp_path / "d_huge.txt").write_text(huge, encoding="utf-8")
    (tmp_path / "e_nul.txt").write_bytes(b"\0" * 100_000 + b"a few words")  # issue 18: trained on as NUL tokens
    blocks, report = _pack(tmp_path, tiny_tokenizer_dir, text_document="file")
    stream = _stream(tokenizer, [DOCS[0], huge])
    n = len(stream) // (SEQ_LEN + 1)
    assert len(blocks) == n > 10_000
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: n * (SEQ_LEN + 1)])
    assert report.documents == 5 and report.skipped == {"empty": 1, "null": 0, "invalid_utf8": 1, "control_chars": 1,
                                                        "out_of_vocab": 0, "malformed": 0,
                                                        "overlong": 0}
    assert report.skipped_examples == [f"empty: {tmp_path / 'b_empty.txt'}",
                                       f"invalid_utf8: {tmp_path / 'c_bad.txt'} (byte 3)",
                                       f"control_chars: {tmp_path / 'e_nul.txt'}"]
    assert "1 empty, 1 invalid_utf8, 1 control_chars" in report.summary()


def test_mostly_control_characters():
    assert pack.mostly_control("\0" * 6 + "abcde") and pack.mostly_control("\x1b\x7f\x85")
    assert not pack.mostly_control("\0" * 5 + "abcde") and not pack.mostly_control("a\tb\n\r\n") and not pack.mostly_control("")


def test_bad_lines_are_counted_with_their_line(ray_session, tiny_tokenizer_dir, tokenizer, tmp_path):
    (tmp_path / "docs.txt").write_bytes(b"first good line\n\nbad \xff\xfe line\nlast good line\n")
    blocks, report = _pack(tmp_path / "docs.txt", tiny_tokenizer_dir, text_document="line")
    assert report.documents == 4 and report.skipped["empty"] == 1 and report.skipped["invalid_utf8"] == 1
    stream = _stream(tokenizer, ["first good line", "last good line"])
    assert report.tokens == len(stream) and blocks.size == len(stream) - report.dropped_tokens
    assert report.skipped_examples == [f"empty: {tmp_path / 'docs.txt'}:2",
                                       f"invalid_utf8: {tmp_path / 'docs.txt'}:3 (byte 4)"]


def test_out_of_vocab_and_null_rows_are_counted(ray_session, tiny_tokenizer_dir, tokenizer, tmp_path):
    good = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in DOCS]
    pq.write_table(pa.table({"input_ids": good[:3] + [[5, 320, 6], [-1], None, []] + good[3:]}),
                   tmp_path / "t.parquet")
    blocks, report = _pack(tmp_path / "t.parquet", tiny_tokenizer_dir, fmt="tokens")
    assert report.skipped == {"empty": 1, "null": 1, "invalid_utf8": 0, "control_chars": 0, "out_of_vocab": 2,
                              "malformed": 0, "overlong": 0}
    stream = _stream(tokenizer, DOCS)
    assert report.documents == len(DOCS) + 4 and report.tokens == len(stream)
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: blocks.size])
    assert len(blocks) == len(stream) // (SEQ_LEN + 1)
    assert f"out_of_vocab: {tmp_path / 't.parquet'} (id 320, vocabulary 320)" in report.skipped_examples
    assert f"out_of_vocab: {tmp_path / 't.parquet'} (id -1, vocabulary 320)" in report.skipped_examples


def test_a_file_without_the_column_is_named(ray_session, tiny_tokenizer_dir, tmp_path):
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet has no column 'text'; columns: body, n"):
        _pack(tmp_path, tiny_tokenizer_dir, fmt="parquet")
    with pytest.raises(DataError, match=r"b\.parquet has no column 'text'; columns: body, n"):
        _pack(tmp_path / "b.parquet", tiny_tokenizer_dir, fmt="parquet")  # no file has it


def test_jsonl_errors_name_the_line(ray_session, tiny_tokenizer_dir, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:2: no field 'text'; fields: body"):
        _pack(tmp_path / "a.jsonl", tiny_tokenizer_dir, fmt="jsonl")
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": "cut\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
        _pack(tmp_path / "a.jsonl", tiny_tokenizer_dir, fmt="jsonl")


def test_a_corrupt_parquet_file_is_named(ray_session, tiny_tokenizer_dir, tmp_path):
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"b\.parquet is not a readable Parquet file"):
        read_documents(str(tmp_path / "*.parquet"), DataConfig(format="parquet"))


def test_a_pattern_without_files_is_named(tmp_path):
    with pytest.raises(DataError, match="nothing-here/\\*.txt' matches no file"):
        read_documents(str(tmp_path / "nothing-here" / "*.txt"), DataConfig())


def test_a_tokenizer_without_eos_is_refused(tiny_tokenizer_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(tiny_tokenizer_dir / "tokenizer.json")).save_pretrained(tmp_path)
    with pytest.raises(DataError, match="has no eos token"):
        check_packing_tokenizer(load_tokenizer(tmp_path))


# --- BOS per document (data.add_bos) -----------------------------------------------------------------------------
FIXTURES = Path(__file__).parent / "fixtures" / "configs"
LLAMA3, QWEN = FIXTURES / "meta-llama-3-8b", FIXTURES / "qwen2.5-7b"  # the tokenizer adds BOS / does not


@pytest.mark.parametrize("tokenizer_dir, fields, bos", [
    (LLAMA3, {}, 128000), (LLAMA3, {"add_bos": False}, None), (LLAMA3, {"format": "tokens"}, None),
    (LLAMA3, {"format": "tokens", "add_bos": True}, 128000), (QWEN, {}, None), (QWEN, {"add_bos": False}, None),
])
def test_document_bos_follows_the_tokenizer_unless_set(tokenizer_dir, fields, bos):
    assert pack.document_bos_id(load_tokenizer(tokenizer_dir), DataConfig(**fields)) == bos


def test_bos_asked_of_a_tokenizer_without_one_is_refused(tiny_tokenizer_dir):
    for tokenizer_dir in (QWEN, tiny_tokenizer_dir):
        with pytest.raises(DataError, match="data.add_bos is true but tokenizer .* has no bos token"):
            pack.document_bos_id(load_tokenizer(tokenizer_dir), DataConfig(add_bos=True))


@pytest.mark.parametrize("add_bos", [None, False])
def test_packed_documents_start_with_bos_when_the_tokenizer_adds_one(ray_session, tmp_path, add_bos):
    tokenizer = load_tokenizer(LLAMA3)
    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    blocks, report = _pack(tmp_path / "docs.txt", LLAMA3, text_document="line", add_bos=add_bos)
    bos = [] if add_bos is False else [tokenizer.bos_token_id]
    stream = np.array([i for doc in DOCS for i in bos + tokenizer(doc, add_special_tokens=False)["input_ids"]
                       + [tokenizer.eos_token_id]], np.int32)
    n = len(stream) // (SEQ_LEN + 1)
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: n * (SEQ_LEN + 1)])
    assert report.tokens == len(stream)
    if add_bos is None:  # what the tokenizer itself gives for the first document, then its EOS
        first = tokenizer(DOCS[0])["input_ids"]
        assert blocks[0, : len(first) + 1].tolist() == first + [tokenizer.eos_token_id]


def test_cache_identity_records_whether_documents_start_with_bos(builtin_corpus):
    from tailkd_ray.teacher.cache import cache_identity

    def identity(*overrides):
        cfg = load_config(None, [f"teacher.model={LLAMA3}", f"data.train={builtin_corpus[0]}", *overrides])
        return cache_identity(cfg, teacher_id={}, split="train")

    assert identity()["document_bos"] is True and identity("data.add_bos=false")["document_bos"] is False
