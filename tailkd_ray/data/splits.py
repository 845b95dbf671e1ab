"""A config's corpora as train and val blocks: read, tokenize and pack, then hold out and shuffle (DESIGN §1).

    data.train --read--> --pack--> blocks --hashing.held_out_mask(train.seed)--> train / val (data.val null)
    data.val   --read--> --pack--> val blocks                                               (data.val set)
    train --random_shuffle(seed=train.seed), materialized once--> shuffled train blocks     (data.shuffle)

A ``datasets.Dataset`` passed through the Python API (``distill(cfg, train_data=..., val_data=...)``) replaces
data.train / data.val: ``with_in_memory_data`` puts its label (``read.InMemoryCorpus``) in the config and returns the
corpora by label, which ``train_val_datasets`` reads where a path would be read.

The tokenizer is the run's data tokenizer (``models.data_tokenizer_path``: data.tokenizer, else the teacher's).
The shuffle comes before any teacher (the pool scores, and a summary cache stores, the blocks in the order they are
trained); each training worker then reshuffles its stream every epoch (``train.loop.micro_batches``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Optional

import ray.data

from tailkd_ray.config import Config, ConfigError
from tailkd_ray.data.hashing import select_split
from tailkd_ray.data.pack import IngestReport, tokenize_and_pack
from tailkd_ray.data.read import HF_PREFIX, InMemoryCorpus, expand_paths, in_memory_corpus, read_documents
from tailkd_ray.data.samples import ChatTemplate
from tailkd_ray.errors import DataError
from tailkd_ray.models import data_tokenizer_path, load_tokenizer, tokenizer_size

log = logging.getLogger(__name__)

Ingest = tuple[ray.data.Dataset, Optional[ray.data.Dataset], IngestReport]  # what train_val_datasets returns
Corpora = dict[str, InMemoryCorpus]  # in-memory corpora by label (with_in_memory_data)


def with_in_memory_data(cfg: Config, train_data: Any = None, val_data: Any = None) -> tuple[Config, Corpora]:
    """(``cfg`` with data.train / data.val set to the labels of the ``datasets.Dataset``s given, the corpora by
    label). A dataset and a path for the same split are refused, naming both."""
    corpora, labels = {}, {}
    for split, dataset in (("train", train_data), ("val", val_data)):
        if dataset is None:
            continue
        if getattr(cfg.data, split) is not None:
            raise ConfigError(f"data.{split} ({getattr(cfg.data, split)}) and {split}_data (a datasets.Dataset) are "
                              f"both given: set data.{split} to null or leave {split}_data out")
        corpus = InMemoryCorpus.of(dataset, f"{split}_data")
        corpora[corpus.label] = corpus
        labels[split] = corpus.label
    return (replace(cfg, data=replace(cfg.data, **labels)) if labels else cfg), corpora


def train_val_datasets(cfg: Config, corpora: Optional[Corpora] = None) -> Ingest:
    """(train, val, report): packed ``input_ids`` blocks of ``data.train`` and of ``data.val``, or, when
    ``data.val`` is null, the blocks whose hash(train.seed, ids) falls below ``data.val_fraction``
    (val is None when that fraction is 0). The train blocks are shuffled when ``data.shuffle`` says so
    (``shuffled_blocks``); val blocks stay in corpus order. Each corpus is announced before it is tokenized, the
    counts (``report.summary()``) once both are packed. ``corpora``: ``with_in_memory_data``'s."""
    train, val, report = _corpus_splits(cfg, corpora or {})
    if cfg.data.shuffle:
        train = shuffled_blocks(train, cfg.train.seed, report.train_blocks)
    return train, val, report


def validation_dataset(cfg: Config, corpora: Optional[Corpora] = None) -> Optional[ray.data.Dataset]:
    """The val blocks of ``train_val_datasets``, reading the training corpus only when they are held out of it.
    ``corpora``: ``with_in_memory_data``'s."""
    if cfg.data.val is None:
        return _corpus_splits(cfg, corpora or {})[1]
    return _packed(cfg, cfg.data.val, IngestReport(), corpora or {})


def shuffled_blocks(blocks: ray.data.Dataset, seed: int, count: int) -> ray.data.Dataset:
    """The ``count`` blocks in one random order seeded by ``seed`` (Ray Data's ``random_shuffle``: the same order
    for the same seed and corpus), computed once and held in the object store, so every epoch and the teacher pool
    read that order without shuffling again (a second copy of the train blocks: 4 bytes a token, 5 with loss_mask,
    9 with position_ids)."""
    started = time.perf_counter()
    shuffled = blocks.random_shuffle(seed=seed).materialize()
    log.info("shuffled %d train blocks (train.seed %d) in %.1f s", count, seed, time.perf_counter() - started)
    return shuffled


def _corpus_splits(cfg: Config, corpora: Corpora) -> tuple[ray.data.Dataset, Optional[ray.data.Dataset], IngestReport]:
    """``train_val_datasets`` before the shuffle: both splits in corpus order."""
    if cfg.data.train is None:
        raise DataError("no training corpus: set data.train to a path, directory or glob (or pass train_data)")
    report = IngestReport()
    train = _packed(cfg, cfg.data.train, report, corpora)
    val = None
    if cfg.data.val is not None:
        report.train_blocks = report.blocks
        val = _packed(cfg, cfg.data.val, report, corpora)
        report.val_blocks = report.blocks - report.train_blocks
    elif cfg.data.val_fraction == 0:
        report.train_blocks = report.blocks
    else:
        train, val = _held_out(cfg, train)
        report.val_blocks = val.count()
        report.train_blocks = report.blocks - report.val_blocks
    log.info("%s", report.summary())
    return train, val, report


def _packed(cfg: Config, pattern: str, report: IngestReport, corpora: Corpora) -> ray.data.Dataset:
    """The blocks of one corpus (files, or the in-memory corpus ``pattern`` labels), its counts added to
    ``report``; a corpus too small for one block is an error."""
    before = report.blocks
    tokenizer = data_tokenizer(cfg)
    if pattern.startswith(HF_PREFIX):
        source = in_memory_corpus(pattern, corpora)
        size = f"{len(source.dataset)} row(s)"
    else:
        source, size = pattern, f"{len(expand_paths(pattern))} file(s)"
    log.info("tokenizing %s: %s with %s, blocks of data.seq_len + 1 = %d ids", pattern, size,
             tokenizer.name_or_path, cfg.data.seq_len + 1)
    chat_template = ChatTemplate.of(tokenizer) if cfg.data.format == "chat" else None
    blocks = tokenize_and_pack(read_documents(source, cfg.data, chat_template), tokenizer, cfg.data,
                               vocab_size=tokenizer_size(tokenizer), stats=report)
    if report.blocks == before:
        raise DataError(f"{pattern!r} gives no complete block of data.seq_len + 1 = {cfg.data.seq_len + 1} "
                        f"ids ({report.summary()}); add documents or lower data.seq_len")
    return blocks


def data_tokenizer(cfg: Config):
    """The tokenizer the corpus is tokenized with (``models.data_tokenizer_path``), or a ``DataError`` saying what to
    set (a teacher directory without tokenizer files, a wrong data.tokenizer)."""
    path = data_tokenizer_path(cfg)
    if path is None:
        raise DataError("no tokenizer: set data.tokenizer or teacher.model")
    try:
        return load_tokenizer(path, trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError) as error:
        key = "data.tokenizer" if cfg.data.tokenizer else "teacher.model"
        reason = " ".join(str(error).split())[:200]
        raise DataError(f"no tokenizer can be loaded from {key} {path} ({reason}); set data.tokenizer to the "
                        f"teacher's tokenizer directory") from None


def _held_out(cfg: Config, blocks: ray.data.Dataset) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(train, val): the blocks on each side of the held-out split."""
    split = {"seed": cfg.train.seed, "fraction": cfg.data.val_fraction}
    val = blocks.map_batches(select_split, fn_kwargs={**split, "held_out": True}, batch_format="numpy")
    train = blocks.map_batches(select_split, fn_kwargs={**split, "held_out": False}, batch_format="numpy")
    return train, val
