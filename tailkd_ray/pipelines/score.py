"""``tailkd score``: one teacher pass over the train and val splits into ``summary.cache_dir`` (DESIGN §3, §10).

    preflight     the config's models, paths and placement, before any work (pipelines.preflight)
    drop_damaged_shards  a complete cache's shards are hashed; damaged ones are deleted, to be re-scored
    is_complete?  a matching complete, intact cache of both splits: nothing to read or score
    _blocks       else the corpus's train / val blocks (data.splits)
    score_to_cache per split: score what the cache lacks (resuming an interrupted pass), then mark it complete
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Optional

from tailkd_ray.config import Config, ConfigError
from tailkd_ray.data.splits import Corpora, train_val_datasets, with_in_memory_data
from tailkd_ray.pipelines.preflight import check_inputs, require_resources
from tailkd_ray.runtime import init_ray
from tailkd_ray.teacher.cache import SPLITS, drop_damaged_shards, is_complete, score_to_cache, teacher_identity

log = logging.getLogger(__name__)


@dataclass
class TeacherPasses:
    """What the teacher cost: passes run by this call (0 when the cache was reused) and tokens."""

    passes: int
    tokens_scored: int  # teacher tokens scored by this call (train + val)
    cache_tokens: int  # tokens in the cache (train + val)
    cache_dir: str


def score(cfg: Config, *, train_data: Any = None, val_data: Any = None) -> dict:
    """The teacher pass; returns the ``TeacherPasses`` as a dict. ``train_data`` / ``val_data``: a Hugging Face
    ``datasets.Dataset`` in place of data.train / data.val (``data.splits.with_in_memory_data``)."""
    if cfg.summary.cache_dir is None or cfg.summary.top_m is None:
        raise ConfigError("tailkd score writes the summary cache: set summary.cache_dir (and summary.top_m)")
    cfg, corpora = with_in_memory_data(cfg, train_data, val_data)
    check_inputs(cfg)
    init_ray()
    require_resources(cfg, "score")
    passes = score_splits(cfg, teacher_identity(cfg.teacher.model), repair=True, corpora=corpora)
    log.info("teacher passes: %d, tokens scored: %d, tokens in the cache: %d", passes.passes,
             passes.tokens_scored, passes.cache_tokens)
    return asdict(passes)


def score_splits(cfg: Config, teacher_id: dict, *, repair: bool = False, corpora: Optional[Corpora] = None
                 ) -> TeacherPasses:
    """Make sure the cache holds the train and val summaries: score what is missing (one pass), reuse a
    matching complete cache (no pass, corpus not even read), refuse an incompatible one. ``repair`` (``tailkd
    score``) hashes a complete cache's shards first and re-scores the damaged ones; without it (distill, tune)
    they are refused when the cache is opened (``cache.check_cache``). ``corpora``: ``with_in_memory_data``'s."""
    if repair:
        for split in SPLITS:
            drop_damaged_shards(cfg, split, teacher_id=teacher_id)
    blocks = _blocks(cfg, corpora)
    infos = {split: score_to_cache(cfg, blocks[split], teacher_id=teacher_id, split=split)
             for split in SPLITS if blocks[split] is not None or is_complete(cfg, split)}
    scored_rows = sum(info.scored_rows for info in infos.values())
    return TeacherPasses(passes=int(scored_rows > 0), tokens_scored=scored_rows * cfg.data.seq_len,
                         cache_tokens=sum(info.tokens for info in infos.values()),
                         cache_dir=cfg.summary.cache_dir)


def _blocks(cfg: Config, corpora: Optional[Corpora]) -> dict:
    """Split -> its packed blocks, or None for every split when both are complete in the cache already."""
    blocks: dict = dict.fromkeys(SPLITS)
    if not all(is_complete(cfg, split) for split in SPLITS):
        blocks["train"], blocks["val"], _ = train_val_datasets(cfg, corpora)
    return blocks
