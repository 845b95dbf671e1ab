"""Prompts and references for task accuracy (``tailkd eval``'s generation metrics, DESIGN §7).

    generation.data --read on the driver, first generation.examples usable records--> PromptSet

A record is a jsonl line, a Parquet row or a row of a ``datasets.Dataset`` (``tailkd eval``'s Python API) holding
``prompt`` and ``completion`` (the reference), or ``messages`` (a chat: a list of {role, content}). A chat's prompt
is the data tokenizer's chat template applied to the turns before its last assistant turn, with
``add_generation_prompt=True``; its reference is that turn's content. Prompts are tokenized as the packer tokenizes
a sample's text (no special tokens added), after the BOS a document of that format starts with
(``pack.document_bos_id``: a chat starts as its template renders it).

A record without those fields stops the read with a ``DataError`` naming it (the file is not such data); a record
whose fields are malformed (the checks of training's ``samples.py``: not strings, an empty completion, an unknown
role, no assistant turn, a template that refuses the conversation; here also an empty prompt) or whose line is not
UTF-8 is skipped and counted (``PromptSet.skipped``, with the first location per reason).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tailkd_ray.config import DataConfig
from tailkd_ray.data.pack import document_bos_id
from tailkd_ray.data.read import HF_PREFIX, InMemoryCorpus, expand_paths, in_memory_corpus, json_record, row_source
from tailkd_ray.data.samples import ChatTemplate, MalformedSample, check_messages, check_prompt_completion
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


def read_prompts(pattern: str, tokenizer, data_cfg: DataConfig, *, limit: int,
                 corpora: Optional[dict[str, InMemoryCorpus]] = None) -> PromptSet:
    """The first ``limit`` usable records of the files ``pattern`` names (sorted; ``read.expand_paths``), or of the
    rows of the in-memory corpus it labels (``hf:...``; ``corpora``: ``splits.with_in_memory_data``'s)."""
    found = PromptSet()
    bos = {fmt: document_bos_id(tokenizer, dataclasses.replace(data_cfg, format=fmt))
           for fmt in ("chat", "prompt_completion")}
    template = None  # the data tokenizer's chat template, once a chat record needs it
    for record, where in _records(pattern, corpora or {}):
        if record is None:
            found.skip("invalid_utf8", where)
            continue
        fmt = _record_format(record, where)
        if fmt == "chat" and template is None:
            template = ChatTemplate.of(tokenizer)
        try:
            prompt, reference = _chat_prompt(record["messages"], template) if fmt == "chat" else \
                _prompt_completion(record["prompt"], record["completion"])
        except MalformedSample as reason:
            found.skip("malformed", f"{where} ({reason})")
            continue
        ids = ([] if bos[fmt] is None else [bos[fmt]]) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            found.skip("malformed", f"{where} (empty prompt)")
            continue
        found.prompts.append(prompt)
        found.prompt_ids.append(ids)
        found.references.append(reference)
        found.sources.append(where)
        if len(found.references) == limit:
            break
    return found


def _records(pattern: str, corpora: dict[str, InMemoryCorpus]) -> Iterator[tuple[Optional[dict], str]]:
    """(record, where) of every file in order, or of every row of an in-memory corpus; record None for a jsonl line
    that is not UTF-8."""
    if pattern.startswith(HF_PREFIX):
        corpus = in_memory_corpus(pattern, corpora)
        yield from ((row, row_source(corpus.name, number)) for number, row in enumerate(corpus.dataset))
        return
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
    """The record of a jsonl line, None when it is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return json_record(text, where)


def _record_format(record: dict, where: str) -> str:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise DataError(f"{where}: a generation record holds 'messages', or 'prompt' and 'completion'; it has "
                    f"{', '.join(record) or 'no field'} (check generation.data)")


def _prompt_completion(prompt, completion) -> tuple[str, str]:
    check_prompt_completion(prompt, completion)
    return prompt, completion


def _chat_prompt(messages, template: ChatTemplate) -> tuple[str, str]:
    """(the prompt before the last assistant turn, that turn's content)."""
    check_messages(messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt, _ = template.render(messages[:last], add_generation_prompt=True)
    return prompt, messages[last]["content"]
