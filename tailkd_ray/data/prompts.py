"""Prompts and references for task accuracy (``tailkd eval``'s generation metrics, DESIGN §7).

    generation.data --read on the driver, first generation.examples usable records--> PromptSet

A record is a jsonl line or a Parquet row holding ``prompt`` and ``completion`` (the reference), or ``messages``
(a chat: a list of {role, content}). A chat's prompt is the data tokenizer's chat template applied to the turns
before its last assistant turn, with ``add_generation_prompt=True``; its reference is that turn's content. Prompts
are tokenized as the packer tokenizes a sample's text (no special tokens added), after the BOS a document of that
format starts with (``pack.document_bos_id``: a chat starts as its template renders it).

A record without those fields stops the read with a ``DataError`` naming it (the file is not such data); a record
whose fields are malformed (not strings, no assistant turn, a template that refuses the conversation) or whose line
is not UTF-8 is skipped and counted (``PromptSet.skipped``, with the first location per reason).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tailkd_ray.config import DataConfig
from tailkd_ray.data.pack import document_bos_id
from tailkd_ray.data.read import expand_paths
from tailkd_ray.errors import DataError

_PARQUET_BATCH_ROWS = 256


@dataclass
class PromptSet:
    """Tokenized prompts with their reference completions, where each came from, and what was skipped."""

    prompts: list = field(default_factory=list)  # list[str]: the text after the BOS, if any
    prompt_ids: list = field(default_factory=list)  # list[list[int]]
    references: list = field(default_factory=list)  # list[str]
    sources: list = field(default_factory=list)  # file:line (jsonl) or file:row (Parquet, from 1)
    skipped: Counter = field(default_factory=Counter)  # reason -> records
    first_skipped: dict = field(default_factory=dict)  # reason -> "source (why)"

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, where)


class _Malformed(ValueError):
    """A record to skip as ``malformed``; the message says why."""


def read_prompts(pattern: str, tokenizer, data_cfg: DataConfig, *, limit: int) -> PromptSet:
    """The first ``limit`` usable records of the files ``pattern`` names (sorted; ``read.expand_paths``)."""
    found = PromptSet()
    bos = {fmt: document_bos_id(tokenizer, dataclasses.replace(data_cfg, format=fmt))
           for fmt in ("chat", "prompt_completion")}
    for record, where in _records(pattern):
        if record is None:
            found.skip("invalid_utf8", where)
            continue
        fmt = _record_format(record, where)
        try:
            prompt, reference = _chat_prompt(record["messages"], tokenizer) if fmt == "chat" else \
                _prompt_completion(record["prompt"], record["completion"])
        except _Malformed as reason:
            found.skip("malformed", f"{where} ({reason})")
            continue
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        found.prompts.append(prompt)
        found.prompt_ids.append(([] if bos[fmt] is None else [bos[fmt]]) + ids)
        found.references.append(reference)
        found.sources.append(where)
        if len(found.references) == limit:
            break
    return found


def _records(pattern: str) -> Iterator[tuple[Optional[dict], str]]:
    """(record, where) of every file in order; record None for a jsonl line that is not UTF-8."""
    for path in expand_paths(pattern):
        fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        if path.endswith(".parquet"):
            with fs.open_input_file(inner) as f:
                rows = (row for batch in pq.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
                        for row in batch.to_pylist())
                yield from ((row, f"{path}:{number}") for number, row in enumerate(rows, start=1))
            continue
        with fs.open_input_stream(inner) as f:
            lines = f.read().splitlines()
        for number, raw in enumerate(lines, start=1):
            if raw.strip():  # blank lines are not records
                yield _json_record(raw, f"{path}:{number}"), f"{path}:{number}"


def _json_record(raw: bytes, where: str) -> Optional[dict]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}); fix or remove the line")
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    return record


def _record_format(record: dict, where: str) -> str:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise DataError(f"{where}: a generation record holds 'messages', or 'prompt' and 'completion'; it has "
                    f"{', '.join(record) or 'no field'} (check generation.data)")


def _prompt_completion(prompt, completion) -> tuple[str, str]:
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str) or not value:
            raise _Malformed(f"'{name}' is {value!r:.40}, expected a non-empty string")
    return prompt, completion


def _chat_prompt(messages, tokenizer) -> tuple[str, str]:
    """(the prompt before the last assistant turn, that turn's content)."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise _Malformed("'messages' is not a list of {role, content} with string values")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
    if last == 0:
        raise _Malformed("no assistant turn after a prompt")
    if not tokenizer.chat_template:
        raise DataError(f"chat records are prompted through the data tokenizer's chat template, but tokenizer "
                        f"{tokenizer.name_or_path} has none: set data.tokenizer to one with a chat_template")
    try:
        prompt = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=False)
    except Exception as error:  # the template's raise_exception(...) or a jinja error on this conversation
        raise _Malformed(f"the chat template refuses it: {' '.join(str(error).split())[:200]}") from None
    return prompt, messages[last]["content"]
