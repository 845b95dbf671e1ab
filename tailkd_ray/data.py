"""Corpora in, packed token blocks out, with Ray Data (DESIGN §1).

    files --read_binary_files / read_parquet + a normalising map--> documents (text or ids, source, skip)
          --repartition(exactly `per_batch` documents per block)--> fixed document batches
          --map_batches(_TokenizeAndPack, ActorPoolStrategy)--> full blocks + one tail row per batch
          --materialize--> the tails, in order, packed into the last blocks

Blocks: ``input_ids`` int32 arrays of ``seq_len + 1`` ids. Documents are tokenized without special tokens
(no BOS) and each is followed by EOS; the stream of a batch is cut into blocks and its remainder (the tail,
< seq_len + 1 ids) travels with the batch's counts on one extra row. The driver concatenates the tails in
batch order and packs them too, so only the final partial block of a corpus is dropped (and counted).

Determinism: batches are fixed ranges of documents in file order (sorted paths, rows/lines in file order,
``preserve_order``), independent of read parallelism and cluster size, so a corpus always gives the same
blocks in the same order. The train/val split is a hash of (seed, block ids). Shuffling is left to the
trainer (e.g. ``random_shuffle(seed=train.seed)`` or a seeded local shuffle buffer).

Bad input: a document that is empty, null, invalid UTF-8 (text and jsonl: skipped, not decoded with
replacement characters, which would teach the student garbage) or holds ids outside the vocabulary (tokens
format) is skipped and counted in the ``IngestReport`` with its first locations (file, or file:line). A
missing or mistyped column, invalid JSON, or a corrupt Parquet file stops the run with a ``DataError``
naming the file. A huge document is tokenized in slices of ``_SLICE_CHARS`` characters cut where a
whitespace run starts (exact for byte-level BPE tokenizers) and packs into as many blocks as it needs.

Memory: the packed corpus is materialised once in the object store (Ray spills it to disk when it is
larger than memory): that is what makes the counts exact before training starts, and every epoch and the
teacher pass reuse it without tokenizing again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tailkd_ray.config import Config, DataConfig
from tailkd_ray.errors import DataError  # re-exported: callers import it from here too

if TYPE_CHECKING:
    from ray.data import Dataset

logger = logging.getLogger(__name__)

SKIP_REASONS = ("empty", "null", "invalid_utf8", "out_of_vocab")
# Documents per tokenizer batch: lines are short, whole files can be large. Batch size only sets the
# granularity of parallel work (tails are carried over, not lost).
_DOCS_PER_BATCH = {"line": 8192, "file": 64, "rows": 512}
_SLICE_CHARS = 1 << 20
_EXAMPLES_PER_REASON = 3
_STAT_COLUMNS = ("documents", "tokens", "blocks") + tuple(f"skip_{r}" for r in SKIP_REASONS)


@dataclass
class IngestReport:
    """Exact counts of one ingest, summed over all tokenizer batches (and over the train and val corpora)."""

    documents: int = 0  # documents read, kept or skipped
    skipped: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    skipped_examples: list = field(default_factory=list)  # "reason: file[:line]", the first few per reason
    tokens: int = 0  # ids of the kept documents, one EOS each included
    blocks: int = 0  # packed blocks of seq_len + 1 ids
    dropped_tokens: int = 0  # ids of each corpus's final partial block
    train_blocks: int = 0
    val_blocks: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n) or "none"
        head = (f"ingest: {self.documents} documents read (skipped: {skipped}); {self.tokens} tokens -> "
                f"{self.blocks} blocks ({self.train_blocks} train, {self.val_blocks} val); "
                f"{self.dropped_tokens} tokens dropped in final partial blocks")
        return "\n".join([head] + [f"  skipped {example}" for example in self.skipped_examples])


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """A Hugging Face fast tokenizer with an EOS token (documents are joined with EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise DataError(f"tokenizer {path} has no fast (Rust) version; save it with a tokenizer.json "
                        f"(transformers converts most slow tokenizers) or set data.tokenizer to another one")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {path} has no eos token, which separates packed documents; "
                        f"set eos_token in its tokenizer_config.json")
    return tokenizer


def expand_paths(pattern: str) -> list[str]:
    """Sorted files of a local path, directory (recursive; hidden and _-prefixed entries skipped) or glob.
    URIs such as ``s3://...`` are passed to Ray untouched."""
    if "://" in pattern:
        return [pattern]
    path = Path(pattern).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [f for f in path.rglob("*")
                 if f.is_file() and not any(p.startswith((".", "_")) for p in f.relative_to(path).parts)]
    else:
        files = [Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file()]
    if not files:
        raise DataError(f"data path {pattern!r} matches no file: check data.train / data.val")
    return sorted(str(f.resolve()) for f in files)


def read_documents(pattern: str, data_cfg: DataConfig) -> Dataset:
    """One row per document: ``text`` (or ``input_ids`` for the tokens format), ``source`` (file or
    file:line, for messages) and ``skip`` (a reason from SKIP_REASONS found while reading, else "")."""
    import ray.data

    paths = expand_paths(pattern)
    if data_cfg.format == "text":
        return ray.data.read_binary_files(paths, include_paths=True).map_batches(
            _text_documents, batch_format="pyarrow", fn_kwargs={"by_line": data_cfg.text_document == "line"})
    tokens = data_cfg.format == "tokens"
    column = data_cfg.tokens_column if tokens else data_cfg.text_column
    if data_cfg.format == "parquet" or (tokens and all(p.endswith(".parquet") for p in paths)):
        remote = "://" in pattern
        try:
            ds = ray.data.read_parquet(paths, include_paths=True, **({} if remote else {"file_extensions": None}))
        except Exception as error:  # Ray reads every footer here; find the file at fault
            if not remote:
                _raise_for_bad_parquet(paths, error)
            raise
        scheme = pattern.split("://")[0] + "://" if remote else ""
        return ds.select_columns([column, "path"]).map_batches(
            _parquet_documents, batch_format="pyarrow",
            fn_kwargs={"column": column, "tokens": tokens, "scheme": scheme})
    return ray.data.read_binary_files(paths, include_paths=True).map_batches(
        _jsonl_documents, batch_format="pyarrow", fn_kwargs={"column": column, "tokens": tokens})


def tokenize_and_pack(docs: Dataset, tokenizer_path: str, data_cfg: DataConfig, *,
                      trust_remote_code: bool = False, stats: IngestReport | None = None) -> Dataset:
    """Tokenize ``docs`` (from ``read_documents``) with a pool of tokenizer actors and pack them into blocks
    of ``seq_len + 1`` ids: a Dataset with one column ``input_ids`` (int32). The work is executed here;
    its exact counts are added to ``stats`` when given."""
    import ray.data

    block_len = data_cfg.seq_len + 1
    per_batch = _DOCS_PER_BATCH[_batch_kind(data_cfg)]
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    docs.context.execution_options.preserve_order = True  # batches = fixed ranges of documents
    rows = docs.repartition(target_num_rows_per_block=per_batch, strict=True).map_batches(
        _TokenizeAndPack,
        fn_constructor_kwargs={"tokenizer_json": tokenizer.backend_tokenizer.to_str(),
                               "eos_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer),
                               "block_len": block_len},
        batch_size=per_batch, batch_format="pyarrow", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=data_cfg.tokenizer_actors))
    rows = _execute(rows)
    tails = rows.filter(expr=f"length < {block_len}").take_all()
    report = stats if stats is not None else IngestReport()
    _add_batch_counts(report, tails)
    stream = np.concatenate([t["input_ids"][: t["length"]] for t in tails] or [np.zeros(0, np.int32)])
    n_tail_blocks = len(stream) // block_len
    report.blocks += n_tail_blocks
    report.dropped_tokens += len(stream) - n_tail_blocks * block_len
    blocks = rows.filter(expr=f"length == {block_len}").select_columns(["input_ids"])
    if n_tail_blocks:
        tail_blocks = stream[: n_tail_blocks * block_len].reshape(n_tail_blocks, block_len)
        blocks = blocks.union(ray.data.from_numpy(tail_blocks).rename_columns({"data": "input_ids"}))
    return blocks


def train_val_datasets(cfg: Config) -> tuple[Dataset, Dataset | None, IngestReport]:
    """(train, val, report): packed ``input_ids`` blocks of ``data.train`` and of ``data.val``, or, when
    ``data.val`` is null, the blocks whose hash(train.seed, ids) falls below ``data.val_fraction``
    (val is None when that fraction is 0). Blocks come in corpus order: the trainer shuffles."""
    data = cfg.data
    tokenizer = data.tokenizer or cfg.teacher.model
    if data.train is None:
        raise DataError("no training corpus: set data.train to a path, directory or glob")
    if tokenizer is None:
        raise DataError("no tokenizer: set data.tokenizer or teacher.model")
    report = IngestReport()

    def packed(pattern: str):
        before = report.blocks
        blocks = tokenize_and_pack(read_documents(pattern, data), tokenizer, data,
                                   trust_remote_code=cfg.teacher.trust_remote_code, stats=report)
        if report.blocks == before:
            raise DataError(f"{pattern!r} gives no complete block of data.seq_len + 1 = {data.seq_len + 1} "
                            f"ids ({report.summary()}); add documents or lower data.seq_len")
        return blocks

    train = packed(data.train)
    if data.val is not None:
        report.train_blocks = report.blocks
        val = packed(data.val)
        report.val_blocks = report.blocks - report.train_blocks
        return train, val, report
    if data.val_fraction == 0:
        report.train_blocks = report.blocks
        return train, None, report
    split = {"seed": cfg.train.seed, "fraction": data.val_fraction}
    val = train.map_batches(_select_split, fn_kwargs={**split, "held_out": True}, batch_format="numpy")
    train = train.map_batches(_select_split, fn_kwargs={**split, "held_out": False}, batch_format="numpy")
    report.val_blocks = val.count()
    report.train_blocks = report.blocks - report.val_blocks
    return train, val, report


def held_out_mask(blocks: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True for blocks held out for validation: u = blake2b_64(seed, ids) / 2^64 < fraction.
    A block's fate depends only on its ids and the seed (duplicates land on the same side)."""
    key = seed.to_bytes(8, "little", signed=True)
    threshold = fraction * 2.0 ** 64
    return np.array([int.from_bytes(hashlib.blake2b(np.ascontiguousarray(b, np.int32).tobytes(), digest_size=8,
                                                    key=key).digest(), "little") < threshold for b in blocks],
                    dtype=bool)


def _select_split(batch: dict, *, seed: int, fraction: float, held_out: bool) -> dict:
    keep = held_out_mask(batch["input_ids"], seed, fraction) == held_out
    return {"input_ids": batch["input_ids"][keep]}


# --- reading: one normalising map per format (runs fused with the read tasks) -------------------------

def _documents_table(values, sources: list, skips: list, *, tokens: bool):
    import pyarrow as pa

    name, kind = ("input_ids", pa.list_(pa.int64())) if tokens else ("text", pa.string())
    column = values.cast(kind) if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, kind)
    return pa.table({name: column, "source": pa.array(sources, pa.string()), "skip": pa.array(skips, pa.string())})


def _decode(raw: bytes, where: str) -> tuple[str, str, str]:
    """(text, skip reason, where: with the offending byte when skipped)."""
    try:
        return raw.decode("utf-8"), "", where
    except UnicodeDecodeError as error:
        return "", "invalid_utf8", f"{where} (byte {error.start})"


def _text_documents(batch, *, by_line: bool):
    texts, sources, skips = [], [], []
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist()):
        pieces = data.splitlines() if by_line else [data]
        for number, raw in enumerate(pieces, start=1):
            text, skip, where = _decode(raw, f"{path}:{number}" if by_line else path)
            texts.append(text)
            sources.append(where)
            skips.append(skip)
    return _documents_table(texts, sources, skips, tokens=False)


def _jsonl_documents(batch, *, column: str, tokens: bool):
    values, sources, skips = [], [], []
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist()):
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue  # blank lines are not records
            text, skip, where = _decode(raw, f"{path}:{number}")
            value = None if skip else _json_field(text, column, where, tokens)
            values.append(value)
            sources.append(where)
            skips.append(skip or ("null" if value is None else ""))
    try:
        return _documents_table(values, sources, skips, tokens=tokens)
    except (TypeError, ValueError) as error:  # pyarrow: a value that is not a list of integers
        raise DataError(f"{batch['path'][0]}: field '{column}' must hold lists of integer token ids ({error})")


def _json_field(text: str, column: str, where: str, tokens: bool):
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}); fix or remove the line")
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if column not in record:
        option = "data.tokens_column" if tokens else "data.text_column"
        raise DataError(f"{where}: no field '{column}'; fields: {', '.join(record) or 'none'} (set {option})")
    value = record[column]
    if value is not None and not isinstance(value, list if tokens else str):
        raise DataError(f"{where}: field '{column}' is {type(value).__name__}, expected "
                        f"{'a list of token ids' if tokens else 'a string'}")
    return value


def _parquet_documents(batch, *, column: str, tokens: bool, scheme: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    paths = batch["path"]
    if column not in batch.column_names:  # no file of this batch has it
        _check_parquet_column(scheme + paths[0].as_py(), column, tokens)
    values = batch[column]
    nulls = pc.is_null(values).to_numpy(zero_copy_only=False)
    for path in sorted(set(np.asarray(paths.to_pylist(), dtype=object)[nulls])):
        _check_parquet_column(scheme + path, column, tokens)  # Ray fills a column a file lacks with nulls
    kind = values.type
    if tokens:
        expected = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)
    else:
        expected = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if not (expected or pa.types.is_null(kind)):
        raise DataError(f"{paths[0].as_py()}: column '{column}' has type {kind}, expected "
                        f"{'a list of integer token ids' if tokens else 'a string'}")
    skips = np.where(nulls, "null", "").tolist()
    return _documents_table(values, paths.to_pylist(), skips, tokens=tokens)


def _check_parquet_column(path: str, column: str, tokens: bool) -> None:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if column not in names:
        option = "data.tokens_column" if tokens else "data.text_column"
        raise DataError(f"{path} has no column '{column}'; columns: {', '.join(names)} (set {option})")


def _raise_for_bad_parquet(paths: list[str], error: Exception) -> None:
    """Ray's error for an unreadable Parquet footer does not say which file: find it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in paths:
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as bad:
            raise DataError(f"{path} is not a readable Parquet file ({bad}); remove or rewrite it") from error


# --- tokenizing and packing -----------------------------------------------------------------------------

def _batch_kind(data_cfg: DataConfig) -> str:
    if data_cfg.format == "text":
        return data_cfg.text_document
    return "rows"


class _TokenizeAndPack:
    """Ray Data actor: a batch of documents -> its full blocks, then one tail row (the remaining < block_len
    ids, zero-padded, with ``length`` < block_len) that carries the batch's counts. Full rows count zero.

    It runs the fast tokenizer's own Rust tokenizer (``backend_tokenizer``, what ``tokenizer(texts,
    add_special_tokens=False)`` calls), rebuilt from its JSON: actors start without importing transformers
    and never run repository code."""

    def __init__(self, tokenizer_json: str, eos_id: int, vocab_size: int, block_len: int):
        from tokenizers import Tokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU per actor: no Rust thread pool
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_truncation()  # as the HF wrapper does when no max_length is asked for
        self._tokenizer.no_padding()
        self._eos = np.array([eos_id], np.int32)
        self._vocab_size = vocab_size
        self._block_len = block_len

    def __call__(self, batch) -> dict:
        sources = batch["source"].to_pylist()
        skips = batch["skip"].to_pylist()
        if "text" in batch.column_names:
            ids = self._tokenize(batch["text"].to_pylist(), skips)
        else:
            ids, skips, sources = self._checked_ids(batch["input_ids"], skips, sources)
        counts, examples, stream = Counter(), [], []
        for doc_ids, skip, source in zip(ids, skips, sources):
            skip = skip or ("empty" if len(doc_ids) == 0 else "")
            if skip:
                counts[skip] += 1
                if counts[skip] <= _EXAMPLES_PER_REASON:
                    examples.append(f"{skip}: {source}")
                continue
            stream += [doc_ids, self._eos]
        stream = np.concatenate(stream) if stream else np.zeros(0, np.int32)
        counts.update(documents=len(sources), tokens=len(stream), blocks=len(stream) // self._block_len)
        return _blocks_and_tail(stream, self._block_len, counts, examples)

    def _tokenize(self, texts: list, skips: list) -> list:
        """Token ids per document (empty for skipped ones); long texts are encoded slice by slice."""
        slices, owner = [], []
        for i, (text, skip) in enumerate(zip(texts, skips)):
            if not skip and text:
                pieces = split_text(text, _SLICE_CHARS)
                slices += pieces
                owner += [i] * len(pieces)
        encoded = self._tokenizer.encode_batch_fast(slices, add_special_tokens=False)
        ids = [[] for _ in texts]
        for i, piece in zip(owner, encoded):
            ids[i].append(np.asarray(piece.ids, np.int32))
        return [np.concatenate(parts) if parts else np.zeros(0, np.int32) for parts in ids]

    def _checked_ids(self, column, skips: list, sources: list) -> tuple[list, list, list]:
        """(ids, skips, sources) of pre-tokenized documents; one holding an id outside [0, vocab) is skipped
        as out_of_vocab, its source naming the id."""
        lists = column.combine_chunks()
        values, offsets = lists.values.to_numpy(zero_copy_only=False), lists.offsets.to_numpy()
        ids, checked, located = [], [], []
        for i, (skip, source) in enumerate(zip(skips, sources)):
            doc = values[offsets[i]:offsets[i + 1]]
            bad = (doc < 0) | (doc >= self._vocab_size)
            if not skip and bad.any():
                skip, source = "out_of_vocab", f"{source} (id {doc[bad][0]}, vocabulary {self._vocab_size})"
            ids.append(doc.astype(np.int32))
            checked.append(skip)
            located.append(source)
        return ids, checked, located


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters, each cut at the start of a whitespace run
    (after a non-space) when the second half of the window has one: byte-level BPE pre-tokenizers split there
    anyway, so encoding the pieces gives the ids of the whole text."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = None
        for cut in _WHITESPACE_RUN_START.finditer(text, start + max_chars // 2, end):
            pass
        end = cut.start() if cut else end
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


_WHITESPACE_RUN_START = re.compile(r"(?<=\S)\s")


def _blocks_and_tail(stream: np.ndarray, block_len: int, counts: Counter, examples: list) -> dict:
    n = len(stream) // block_len
    rows = np.zeros((n + 1, block_len), np.int32)
    rows[:n] = stream[: n * block_len].reshape(n, block_len)
    tail = stream[n * block_len:]
    rows[n, : len(tail)] = tail
    out = {"input_ids": rows, "length": np.full(n + 1, block_len, np.int64)}
    out["length"][n] = len(tail)
    for name in _STAT_COLUMNS:
        out[name] = np.zeros(n + 1, np.int64)
        out[name][n] = counts[name.removeprefix("skip_")]
    out["skip_examples"] = np.array([""] * n + ["\n".join(examples)], dtype=object)
    return out


def _add_batch_counts(report: IngestReport, tails: list) -> None:
    """Sum the counts the tail rows carry into ``report``; warn (once, here in the driver) about skips."""
    examples = [e for row in tails for e in row["skip_examples"].split("\n") if e]
    if examples:
        logger.warning("skipped documents (see the ingest report), e.g.\n  %s", "\n  ".join(examples[:10]))
    for row in tails:
        report.documents += int(row["documents"])
        report.tokens += int(row["tokens"])
        report.blocks += int(row["blocks"])
        for reason in SKIP_REASONS:
            report.skipped[reason] += int(row[f"skip_{reason}"])
        for example in filter(None, row["skip_examples"].split("\n")):
            reason = example.split(":", 1)[0]
            if sum(e.startswith(reason + ":") for e in report.skipped_examples) < _EXAMPLES_PER_REASON:
                report.skipped_examples.append(example)


def _execute(ds):
    """Materialise ``ds``; a DataError raised in a Ray worker comes back as itself, not a Ray traceback."""
    try:
        return ds.materialize()
    except DataError:
        raise
    except Exception as error:
        found = re.search(r"DataError: (.+)", str(error))
        if found:
            raise DataError(found.group(1)) from error
        raise
