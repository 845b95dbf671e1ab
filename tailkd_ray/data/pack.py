"""Tokenizing and packing with Ray Data: documents in, blocks of ``seq_len + 1`` token ids out (DESIGN §1).

    documents (read.read_documents)
          --repartition(exactly `per_batch` documents per block)--> fixed document batches
          --map_batches(_TokenizeAndPack, ActorPoolStrategy)--> full blocks + one tail row per batch
          --materialize--> the tails, in order, packed into the last blocks

Blocks (``block_columns``): ``input_ids`` int32 arrays of ``seq_len + 1`` ids; where every sample lies whole in
one block (data.format chat | prompt_completion, or data.packing: false) a ``loss_mask`` (uint8: the padding and, with
data.train_on: completion, the prompts masked); where several whole samples share a block (supervised formats,
packing on) ``position_ids`` (int32) restarting at 0 at every sample and padding run, from which transformers builds
its packed-sequence attention mask (no sample attends to another). Documents are tokenized without special tokens,
start with the tokenizer's BOS when ``data.add_bos`` says so (``document_bos_id``: by default when the tokenizer adds
one itself, as Llama 3's does) and each is followed by EOS. Text formats with packing: the stream of a batch is cut
into blocks and its remainder (the tail, < seq_len + 1 ids) travels with the batch's counts on one extra row; the
driver concatenates the tails in batch order and packs them too, so only the final partial block of a corpus is
dropped (and counted). Whole samples: a sample that does not fit in what is left of the current block (or, without
packing, any sample after the first) starts the next one, the rest padded with masked EOS ids; a sample longer than a
block is cut or skipped (data.overlong, counted); a batch's last block is padded and emitted whole, so its tail row
is empty and the driver's tail packing has nothing to do.

Determinism: batches are fixed ranges of documents in file order (sorted paths, rows/lines in file order,
``preserve_order``), independent of read parallelism and cluster size, so a corpus always gives the same
blocks in the same order (the train/val split, ``splits.py``, is a hash of seed and ids). The train blocks are
shuffled after packing (``splits.shuffled_blocks``, seeded by train.seed) and again per epoch by each training
worker.

Bad input: documents the reader marked (empty, null, invalid UTF-8), text documents that are mostly control
characters (a file of NUL bytes, binary data read as text: ``mostly_control``) and pre-tokenized documents holding
ids outside the vocabulary are skipped and counted in the ``IngestReport`` with their first locations (file, or
file:line). A huge document is tokenized in slices of ``_SLICE_CHARS`` characters cut where a whitespace run
starts (exact for byte-level BPE tokenizers) and packs into as many blocks as it needs.

This module imports neither torch nor transformers: the tokenizer actors that unpickle ``_TokenizeAndPack``
start light and never run repository code.

Memory: the packed corpus is materialised once in the object store (Ray spills it to disk when it is
larger than memory): that is what makes the counts exact before training starts, and every epoch and the
teacher pass reuse it without tokenizing again.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import ray.data
from tokenizers import Tokenizer

from tailkd_ray.config import DataConfig
from tailkd_ray.data.read import SKIP_REASONS
from tailkd_ray.errors import DataError

logger = logging.getLogger(__name__)

# Documents per tokenizer batch: lines are short, whole files can be large. Batch size only sets the
# granularity of parallel work (tails are carried over, not lost).
_DOCS_PER_BATCH = {"line": 8192, "file": 64, "rows": 512}
_SLICE_CHARS = 1 << 20
_EXAMPLES_PER_REASON = 3
# A block's columns: its ids; which of them the losses cover (1) or not (0), aligned with the ids: the target
# input_ids[t + 1] counts where loss_mask[t + 1] is 1; each id's position in its sample (``block_columns``).
BLOCK_COLUMNS = ("input_ids", "loss_mask", "position_ids")
BLOCK_DTYPES = {"input_ids": np.int32, "loss_mask": np.uint8, "position_ids": np.int32}
_COUNTS = ("documents", "tokens", "completion_tokens", "blocks", "truncated", "padding_tokens")
_STAT_COLUMNS = _COUNTS + tuple(f"skip_{r}" for r in SKIP_REASONS)


def block_columns(data_cfg: DataConfig) -> tuple[str, ...]:
    """The columns of ``data_cfg``'s blocks (DESIGN §1): ``input_ids``; ``loss_mask`` where every sample lies whole in
    one block, padded (``DataConfig.whole_samples``); ``position_ids`` where several such samples share a block."""
    if not data_cfg.whole_samples():
        return BLOCK_COLUMNS[:1]
    return BLOCK_COLUMNS if data_cfg.packing else BLOCK_COLUMNS[:2]


@dataclass
class IngestReport:
    """Exact counts of one ingest, summed over all tokenizer batches (and over the train and val corpora)."""

    documents: int = 0  # documents read, kept or skipped
    skipped: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    skipped_examples: list = field(default_factory=list)  # "reason: file[:line]", the first few per reason
    tokens: int = 0  # ids of the kept documents, one EOS (and BOS, data.add_bos) each included
    completion_tokens: int = 0  # of those, the ids the losses cover (all of them but with a loss_mask)
    blocks: int = 0  # packed blocks of seq_len + 1 ids
    truncated: int = 0  # whole samples (DataConfig.whole_samples), data.overlong truncate: samples cut to one block
    padding_tokens: int = 0  # whole samples: the masked EOS ids that fill each block's rest
    dropped_tokens: int = 0  # ids of each corpus's final partial block
    train_blocks: int = 0
    val_blocks: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n) or "none"
        trained = f" ({self.completion_tokens} of them trained)" if self.completion_tokens != self.tokens else ""
        trained += f", {self.truncated} samples truncated to one block" if self.truncated else ""
        padding = f", {self.padding_tokens} padding tokens" if self.padding_tokens else ""
        head = (f"ingest: {self.documents} documents read (skipped: {skipped}); {self.tokens} tokens{trained} -> "
                f"{self.blocks} blocks ({self.train_blocks} train, {self.val_blocks} val{padding}); "
                f"{self.dropped_tokens} tokens dropped in final partial blocks")
        return "\n".join([head] + [f"  skipped {example}" for example in self.skipped_examples])


def tokenize_and_pack(docs: ray.data.Dataset, tokenizer, data_cfg: DataConfig, *, vocab_size: int,
                      stats: IngestReport | None = None) -> ray.data.Dataset:
    """Tokenize ``docs`` (from ``read.read_documents``) with a pool of tokenizer actors and pack them into blocks
    of ``seq_len + 1`` ids: a Dataset with the ``block_columns(data_cfg)``. ``tokenizer`` is a Hugging Face fast
    tokenizer with an EOS token (``check_packing_tokenizer``); ``vocab_size`` is the shared vocabulary
    (``models.tokenizer_size``: its largest id + 1, computed by the caller, since this module imports no
    transformers), beyond which pre-tokenized ids are out of vocabulary. The work is executed here; its exact
    counts are added to ``stats`` when given."""
    check_packing_tokenizer(tokenizer)
    bos_id = document_bos_id(tokenizer, data_cfg)
    block_len = data_cfg.seq_len + 1
    per_batch = _DOCS_PER_BATCH[_batch_kind(data_cfg)]
    columns = block_columns(data_cfg)
    docs.context.execution_options.preserve_order = True  # batches = fixed ranges of documents
    rows = docs.repartition(target_num_rows_per_block=per_batch, strict=True).map_batches(
        _TokenizeAndPack,
        fn_constructor_kwargs={"tokenizer_json": tokenizer.backend_tokenizer.to_str(),
                               "eos_id": tokenizer.eos_token_id, "bos_id": bos_id, "vocab_size": vocab_size,
                               "block_len": block_len, "columns": columns,
                               "completion_only": data_cfg.completion_mask(),
                               # a chat turn ends with the template's own end-of-turn token: the EOS only separates
                               "eos_trained": not (data_cfg.completion_mask() and data_cfg.format == "chat"),
                               "packing": data_cfg.packing, "whole_samples": data_cfg.whole_samples(),
                               "overlong": data_cfg.overlong},
        batch_size=per_batch, batch_format="pyarrow", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=data_cfg.tokenizer_actors))
    rows = _execute(rows)
    tails = rows.filter(expr=f"length < {block_len}").take_all()
    report = stats if stats is not None else IngestReport()
    _add_batch_counts(report, tails)
    streams = {name: np.concatenate([t[name][: t["length"]] for t in tails] or [np.zeros(0, BLOCK_DTYPES[name])])
               for name in columns}
    n_tail_blocks = len(streams["input_ids"]) // block_len
    report.blocks += n_tail_blocks
    report.dropped_tokens += len(streams["input_ids"]) - n_tail_blocks * block_len
    blocks = rows.filter(expr=f"length == {block_len}").select_columns(list(columns))
    if n_tail_blocks:
        tail_blocks = {name: stream[: n_tail_blocks * block_len].reshape(n_tail_blocks, block_len)
                       for name, stream in streams.items()}
        blocks = blocks.union(ray.data.from_items([{name: values[i] for name, values in tail_blocks.items()}
                                                   for i in range(n_tail_blocks)]))
    return blocks


def check_packing_tokenizer(tokenizer) -> None:
    """Packing runs the fast tokenizer's Rust core in the actors and joins documents with EOS: refuse a
    tokenizer without either, naming it."""
    name = tokenizer.name_or_path
    if not tokenizer.is_fast:
        raise DataError(f"tokenizer {name} has no fast (Rust) version; save it with a tokenizer.json "
                        f"(transformers converts most slow tokenizers) or set data.tokenizer to another one")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name} has no eos token, which separates packed documents; "
                        f"set eos_token in its tokenizer_config.json")


def document_bos_id(tokenizer, data_cfg: DataConfig) -> Optional[int]:
    """The id every document starts with, or None: ``data.add_bos``, where null follows the tokenizer (BOS when its
    ``add_special_tokens=True`` encoding starts with its BOS token and the plain one does not) for text, and keeps
    ``tokens`` corpora as given and chat samples as their template renders them (Llama 3's starts with BOS). A DataError when BOS is asked for but the tokenizer has none."""
    if data_cfg.add_bos is None:
        if data_cfg.format in ("tokens", "chat") or tokenizer.bos_token_id is None:  # chat: the template's own
            return None
        with_special, plain = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (True, False))
        adds = with_special[:1] == [tokenizer.bos_token_id] and plain[:1] != [tokenizer.bos_token_id]
        return tokenizer.bos_token_id if adds else None
    if data_cfg.add_bos and tokenizer.bos_token_id is None:
        raise DataError(f"data.add_bos is true but tokenizer {tokenizer.name_or_path} has no bos token: set "
                        f"data.add_bos: false (or null), or bos_token in its tokenizer_config.json")
    return tokenizer.bos_token_id if data_cfg.add_bos else None


def _batch_kind(data_cfg: DataConfig) -> str:
    if data_cfg.format == "text":
        return data_cfg.text_document
    return "rows"


class _TokenizeAndPack:
    """Ray Data actor: a batch of documents -> its full blocks, then one tail row (the remaining < block_len
    ids, zero-padded, with ``length`` < block_len; empty for whole samples) that carries the batch's counts. Full
    rows count zero.

    It runs the fast tokenizer's own Rust tokenizer (``backend_tokenizer``, what ``tokenizer(texts,
    add_special_tokens=False)`` calls), rebuilt from its JSON (see the module doc)."""

    def __init__(self, tokenizer_json: str, eos_id: int, bos_id: Optional[int], vocab_size: int, block_len: int,
                 columns: tuple = BLOCK_COLUMNS[:1], completion_only: bool = False, eos_trained: bool = True,
                 packing: bool = True, whole_samples: bool = False, overlong: str = "truncate"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU per actor: no Rust thread pool
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_truncation()  # as the HF wrapper does when no max_length is asked for
        self._tokenizer.no_padding()
        self._eos = np.array([eos_id], np.int32)
        self._bos = np.array([] if bos_id is None else [bos_id], np.int32)  # before each document
        self._vocab_size = vocab_size
        self._block_len = block_len
        self._columns = columns  # block_columns
        self._packing = packing  # several samples per block
        self._whole_samples = whole_samples  # no sample spans two blocks (DataConfig.whole_samples)
        self._overlong = overlong  # data.overlong, for whole samples
        self._completion_only = completion_only  # mask a supervised sample's prompt (data.train_on: completion)
        self._eos_mask = np.array([eos_trained], np.uint8)  # the end of a text or completion: learn to stop
        self._bos_mask = np.zeros(len(self._bos), np.uint8)

    def __call__(self, batch) -> dict:
        sources = batch["source"].to_pylist()
        skips = batch["skip"].to_pylist()
        masks = None
        if "text" in batch.column_names:
            texts = batch["text"].to_pylist()
            skips = [skip or ("control_chars" if mostly_control(text) else "") for text, skip in zip(texts, skips)]
            ids = self._tokenize(texts, skips)
        elif "segments" in batch.column_names:
            ids, masks = self._tokenize_segments(batch["segments"].to_pylist(), batch["trained"].to_pylist(), skips)
        else:
            ids, skips, sources = self._checked_ids(batch["input_ids"], skips, sources)
        counts, examples, tokens = Counter(), [], 0
        runs = {name: [] for name in BLOCK_COLUMNS}  # each column's stream, run by run (samples, padding)
        filled = 0  # ids in the last block so far (whole samples)
        for i, (doc_ids, skip, source) in enumerate(zip(ids, skips, sources)):
            doc = np.concatenate([self._bos, doc_ids, self._eos])
            skip = skip or ("empty" if len(doc_ids) == 0 else "")
            if not skip and self._whole_samples and len(doc) > self._block_len:
                skip = "overlong" if self._overlong == "drop" else ""
                counts["truncated"] += not skip
            if skip:
                counts[skip] += 1
                if counts[skip] <= _EXAMPLES_PER_REASON:
                    examples.append(f"{skip}: {source}" + (f" ({len(doc)} tokens)" if skip == "overlong" else ""))
                continue
            trained = masks[i] if self._completion_only else np.ones(len(doc_ids), np.uint8)
            doc_mask = np.concatenate([self._bos_mask, trained, self._eos_mask])
            if self._whole_samples:  # cut to one block; one that does not fit in the current block starts the next
                doc, doc_mask = doc[: self._block_len], doc_mask[: self._block_len]
                doc_mask[0] = 0  # a sample's first id is no target: nothing of its own comes before it
                if filled and (not self._packing or filled + len(doc) > self._block_len):
                    counts["padding_tokens"] += self._pad(runs, self._block_len - filled)
                    filled = 0
                filled = (filled + len(doc)) % self._block_len
            _add_run(runs, doc, doc_mask)
            tokens += len(doc)
        if self._whole_samples and filled:  # the batch's last block, whole
            counts["padding_tokens"] += self._pad(runs, self._block_len - filled)
        streams = {name: np.concatenate(runs[name] or [np.zeros(0, BLOCK_DTYPES[name])]) for name in self._columns}
        counts.update(documents=len(sources), tokens=tokens, blocks=len(streams["input_ids"]) // self._block_len,
                      completion_tokens=int(streams["loss_mask"].sum()) if "loss_mask" in streams else tokens)
        return _blocks_and_tail(streams, self._block_len, counts, examples)

    def _pad(self, runs: dict, n: int) -> int:
        """Add a run of ``n`` masked EOS ids (their own positions from 0) to ``runs``; returns ``n``."""
        _add_run(runs, np.full(n, self._eos[0], np.int32), np.zeros(n, np.uint8))
        return n

    def _tokenize_segments(self, segments: list, trained: list, skips: list) -> tuple[list, list]:
        """(ids, completion mask) per supervised sample: each segment tokenized on its own (``samples.py``)."""
        texts = [text for pieces in segments for text in pieces]
        kept = [skip for pieces, skip in zip(segments, skips) for _ in pieces]
        pieces_ids = iter(self._tokenize(texts, kept))
        ids, masks = [], []
        for pieces, flags in zip(segments, trained):
            parts = [next(pieces_ids) for _ in pieces]
            ids.append(np.concatenate(parts) if parts else np.zeros(0, np.int32))
            masks.append(np.concatenate([np.full(len(p), flag, np.uint8) for p, flag in zip(parts, flags)])
                         if parts else np.zeros(0, np.uint8))
        return ids, masks

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


# C0 and C1 control characters but tab, newline and carriage return, mapped for deletion by str.translate.
_CONTROLS = dict.fromkeys([*(c for c in range(32) if chr(c) not in "\t\n\r"), *range(127, 160)])
MAX_CONTROL_SHARE = 0.5  # a document with a larger share of them is not text


def mostly_control(text) -> bool:
    """Whether more than ``MAX_CONTROL_SHARE`` of a document's characters are control characters."""
    return bool(text) and len(text) - len(text.translate(_CONTROLS)) > MAX_CONTROL_SHARE * len(text)


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


def _rows(stream: np.ndarray, block_len: int) -> np.ndarray:
    """``stream`` cut into rows of ``block_len``: its full blocks, then the zero-padded rest."""
    n = len(stream) // block_len
    rows = np.zeros((n + 1, block_len), stream.dtype)
    rows[:n] = stream[: n * block_len].reshape(n, block_len)
    rows[n, : len(stream) - n * block_len] = stream[n * block_len:]
    return rows


def _add_run(runs: dict, ids: np.ndarray, mask: np.ndarray) -> None:
    """Append one sample (or padding run) to the column streams: its ids, loss mask and positions from 0."""
    runs["input_ids"].append(ids)
    runs["loss_mask"].append(mask)
    runs["position_ids"].append(np.arange(len(ids), dtype=np.int32))


def _blocks_and_tail(streams: dict, block_len: int, counts: Counter, examples: list) -> dict:
    n = len(streams["input_ids"]) // block_len
    out = {name: _rows(stream, block_len) for name, stream in streams.items()}
    out["length"] = np.full(n + 1, block_len, np.int64)
    out["length"][n] = len(streams["input_ids"]) - n * block_len
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
        for name in _COUNTS:
            setattr(report, name, getattr(report, name) + int(row[name]))
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
