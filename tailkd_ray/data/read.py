"""Reading corpora with Ray Data: files in, one row per document out (DESIGN §1).

    files --read_binary_files / read_parquet + a normalising map per format--> documents

A document row holds ``text`` (or ``input_ids`` for the tokens format), ``source`` (file or file:line, for
messages) and ``skip``: a reason from ``SKIP_REASONS`` found while reading, else "". The maps run fused with the
read tasks. Bad input: an empty or null document, or invalid UTF-8 (text and jsonl: skipped, not decoded with
replacement characters, which would teach the student garbage) is marked for skipping and counted later
(``pack.IngestReport``); a missing or mistyped column, invalid JSON, or a corrupt Parquet file stops the run
with a ``DataError`` naming the file (and line). Files come in sorted order, rows and lines in file order.

A Hugging Face ``datasets.Dataset`` passed through the Python API (``InMemoryCorpus``, ``distill(cfg,
train_data=...)``) takes a path's place: ``ray.data.from_huggingface`` reads it and the same maps make its rows
documents, each ``source`` naming it and the row (``hf:NAME[row 12]``); the config names it by a label,
``hf:NAME@FINGERPRINT``, datasets' own ``_fingerprint`` (for a dataset built in memory, a hash of its Arrow data;
for a loaded one, of its cache files and the transforms applied), which pins its content in the summary cache's
identity.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from tailkd_ray.config import SUPERVISED_FORMATS, DataConfig
from tailkd_ray.data.samples import ChatTemplate, MalformedSample, completion_columns, sample_segments
from tailkd_ray.errors import DataError

SKIP_REASONS = ("empty", "null", "invalid_utf8", "control_chars", "out_of_vocab", "malformed", "overlong")


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


HF_PREFIX = "hf:"  # the label of an in-memory corpus
_ROW_COLUMN = "__tailkd_row"  # the row number of an in-memory corpus, added before Ray reads it


@dataclass(frozen=True)
class InMemoryCorpus:
    """A ``datasets.Dataset`` read in place of a data.train / data.val path; ``label`` stands for it in the config."""

    dataset: Any
    name: str  # the dataset's name, or "dataset" when it has none

    @classmethod
    def of(cls, dataset: Any, argument: str) -> "InMemoryCorpus":
        """``dataset`` (passed as ``argument``) when it is a ``datasets.Dataset``, else a ``DataError`` saying so."""
        import datasets  # only where a user passed one

        if not isinstance(dataset, datasets.Dataset):
            hint = " (a DatasetDict: pass one split, e.g. dataset['train'])" if isinstance(
                dataset, datasets.DatasetDict) else ""
            raise DataError(f"{argument} must be a datasets.Dataset, got {type(dataset).__name__}{hint}")
        return cls(dataset, dataset.info.dataset_name or dataset.builder_name or "dataset")

    @property
    def label(self) -> str:
        return f"{HF_PREFIX}{self.name}@{self.dataset._fingerprint}"


def in_memory_corpus(label: str, corpora: dict[str, InMemoryCorpus]) -> InMemoryCorpus:
    """The corpus an ``hf:`` label in data.train / data.val names, or a ``DataError`` when this call was not given it."""
    if label not in corpora:
        raise DataError(f"{label} names a datasets.Dataset passed through the Python API (train_data= / val_data=), "
                        f"which this call was not given: pass it, or set a path")
    return corpora[label]


def row_source(name: str, row: int) -> str:
    """Where a record of an in-memory corpus came from, in messages and reports: ``hf:NAME[row N]`` (from 0)."""
    return f"{HF_PREFIX}{name}[row {row}]"


def read_documents(source: str | InMemoryCorpus, data_cfg: DataConfig, chat_template: Optional[ChatTemplate] = None
                   ) -> ray.data.Dataset:
    """One row per document: ``text`` (``input_ids`` for the tokens format; ``segments`` and ``trained`` for the
    supervised formats, ``samples.py``, whose chat conversations ``chat_template`` renders), ``source`` (file or
    file:line, for messages; ``hf:NAME[row N]`` for an in-memory corpus) and ``skip`` (a reason from SKIP_REASONS
    found while reading, else "")."""
    if isinstance(source, InMemoryCorpus):
        return _read_in_memory(source, data_cfg, chat_template)
    pattern = source
    paths = expand_paths(pattern)
    if data_cfg.format == "text":
        return ray.data.read_binary_files(paths, include_paths=True).map_batches(
            _text_documents, batch_format="pyarrow", fn_kwargs={"by_line": data_cfg.text_document == "line"})
    if data_cfg.format in SUPERVISED_FORMATS:
        return _read_samples(pattern, paths, data_cfg.format, chat_template)
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


def _read_samples(pattern: str, paths: list[str], fmt: str, chat_template: Optional[ChatTemplate]) -> ray.data.Dataset:
    """Supervised samples (jsonl, or parquet when every file is): one row of segments each."""
    kwargs = {"fmt": fmt, "chat_template": chat_template}
    if not all(p.endswith(".parquet") for p in paths):
        return ray.data.read_binary_files(paths, include_paths=True).map_batches(
            _jsonl_samples, batch_format="pyarrow", fn_kwargs=kwargs)
    columns = list(completion_columns(fmt))
    remote = "://" in pattern
    scheme = pattern.split("://")[0] + "://" if remote else ""
    for path in paths:
        for column in columns:
            _check_parquet_column(scheme + path, column, f"data.format = {fmt}")
    ds = ray.data.read_parquet(paths, include_paths=True, **({} if remote else {"file_extensions": None}))
    return ds.select_columns([*columns, "path"]).map_batches(_parquet_samples, batch_format="pyarrow",
                                                              fn_kwargs=kwargs)


def _read_in_memory(corpus: InMemoryCorpus, data_cfg: DataConfig, chat_template: Optional[ChatTemplate]
                    ) -> ray.data.Dataset:
    """A ``datasets.Dataset``'s rows as documents: its columns as a jsonl record's fields, the row number added so
    that each source names its row."""
    dataset, fmt = corpus.dataset, data_cfg.format
    if fmt in SUPERVISED_FORMATS:
        columns, setting, tokens = list(completion_columns(fmt)), f"data.format = {fmt}", False
    else:
        tokens = fmt == "tokens"
        columns, setting = [data_cfg.tokens_column if tokens else data_cfg.text_column], f"set {_column_key(tokens)}"
    for column in columns:
        if column not in dataset.column_names:
            raise DataError(f"{corpus.label} has no column '{column}'; columns: {', '.join(dataset.column_names)} "
                            f"({setting})")
    numbered = dataset.select_columns(columns).add_column(_ROW_COLUMN, np.arange(len(dataset), dtype=np.int64))
    kwargs = {"name": corpus.name}
    if fmt in SUPERVISED_FORMATS:
        return ray.data.from_huggingface(numbered).map_batches(
            _in_memory_samples, batch_format="pyarrow", fn_kwargs={**kwargs, "fmt": fmt, "chat_template": chat_template})
    return ray.data.from_huggingface(numbered).map_batches(
        _in_memory_documents, batch_format="pyarrow", fn_kwargs={**kwargs, "column": columns[0], "tokens": tokens})


def _row_sources(batch, name: str) -> list[str]:
    return [row_source(name, row) for row in batch[_ROW_COLUMN].to_pylist()]


def _in_memory_samples(batch, *, name: str, fmt: str, chat_template: Optional[ChatTemplate]):
    return _samples_table(_column_records(batch, fmt), _row_sources(batch, name), fmt, chat_template)


def _in_memory_documents(batch, *, name: str, column: str, tokens: bool):
    values = batch[column]
    _check_column_type(values.type, column, tokens, f"{HF_PREFIX}{name}")
    skips = np.where(pc.is_null(values).to_numpy(zero_copy_only=False), "null", "").tolist()
    return _documents_table(values, _row_sources(batch, name), skips, tokens=tokens)


def _jsonl_samples(batch, *, fmt: str, chat_template: Optional[ChatTemplate]):
    records, sources = [], []
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist()):
        for number, raw in enumerate(data.splitlines(), start=1):
            if raw.strip():  # blank lines are not records
                text, skip, where = _decode(raw, f"{path}:{number}")
                records.append(None if skip else json_record(text, where))
                sources.append(where)
    return _samples_table(records, sources, fmt, chat_template)


def _parquet_samples(batch, *, fmt: str, chat_template: Optional[ChatTemplate]):
    return _samples_table(_column_records(batch, fmt), batch["path"].to_pylist(), fmt, chat_template)


def _column_records(batch, fmt: str) -> list[dict]:
    """The records of a columnar batch: one dict of ``completion_columns(fmt)`` per row."""
    columns = completion_columns(fmt)
    return [dict(zip(columns, values)) for values in zip(*(batch[c].to_pylist() for c in columns))]


def _samples_table(records: list, sources: list, fmt: str, chat_template: Optional[ChatTemplate]):
    """Segments of each record (None: undecodable, skipped as invalid_utf8); a malformed one is skipped, its
    source naming the reason."""
    segments, trained, located, skips = [], [], [], []
    for record, source in zip(records, sources):
        pieces, flags, skip = [], [], "invalid_utf8" if record is None else ""
        if record is not None:
            try:
                pieces, flags = sample_segments(record, fmt, chat_template)
            except MalformedSample as error:
                skip, source = "malformed", f"{source} ({error})"
        segments.append(pieces)
        trained.append(flags)
        located.append(source)
        skips.append(skip)
    return pa.table({"segments": pa.array(segments, pa.list_(pa.string())),
                     "trained": pa.array(trained, pa.list_(pa.bool_())),
                     "source": pa.array(located, pa.string()), "skip": pa.array(skips, pa.string())})


def _documents_table(values, sources: list, skips: list, *, tokens: bool):
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


def json_record(text: str, where: str) -> dict:
    """The JSON object of one jsonl line; a DataError naming ``where`` when it is not one."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}); fix or remove the line")
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    return record


def _json_field(text: str, column: str, where: str, tokens: bool):
    record = json_record(text, where)
    if column not in record:
        raise DataError(f"{where}: no field '{column}'; fields: {', '.join(record) or 'none'} "
                        f"(set {_column_key(tokens)})")
    value = record[column]
    if value is not None and not isinstance(value, list if tokens else str):
        raise DataError(f"{where}: field '{column}' is {type(value).__name__}, expected "
                        f"{'a list of token ids' if tokens else 'a string'}")
    return value


def _parquet_documents(batch, *, column: str, tokens: bool, scheme: str):
    paths = batch["path"]
    if column not in batch.column_names:  # no file of this batch has it
        _check_parquet_column(scheme + paths[0].as_py(), column, f"set {_column_key(tokens)}")
    values = batch[column]
    nulls = pc.is_null(values).to_numpy(zero_copy_only=False)
    for path in sorted(set(np.asarray(paths.to_pylist(), dtype=object)[nulls])):
        _check_parquet_column(scheme + path, column, f"set {_column_key(tokens)}")  # Ray fills a column a file lacks with nulls
    _check_column_type(values.type, column, tokens, paths[0].as_py())
    skips = np.where(nulls, "null", "").tolist()
    return _documents_table(values, paths.to_pylist(), skips, tokens=tokens)


def _check_column_type(kind: pa.DataType, column: str, tokens: bool, where: str) -> None:
    """A DataError naming ``where`` unless ``column`` holds strings (token id lists for the tokens format)."""
    if tokens:
        expected = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)
    else:
        expected = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if not (expected or pa.types.is_null(kind)):
        raise DataError(f"{where}: column '{column}' has type {kind}, expected "
                        f"{'a list of integer token ids' if tokens else 'a string'}")


def _check_parquet_column(path: str, column: str, setting: str) -> None:
    """A DataError naming the file when it lacks ``column``, which ``setting`` asks for."""
    names = pq.read_schema(path).names
    if column not in names:
        raise DataError(f"{path} has no column '{column}'; columns: {', '.join(names)} ({setting})")


def _column_key(tokens: bool) -> str:
    return "data.tokens_column" if tokens else "data.text_column"


def _raise_for_bad_parquet(paths: list[str], error: Exception) -> None:
    """Ray's error for an unreadable Parquet footer does not say which file: find it."""
    for path in paths:
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as bad:
            raise DataError(f"{path} is not a readable Parquet file ({bad}); remove or rewrite it") from error
