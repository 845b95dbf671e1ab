"""Summary cache: complete write + manifest, exact round trip, skip when complete, resume after an
interruption, refusal (CacheError) of foreign or mismatched caches, the scoring temperature, identity hashes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tailkd_ray.config import load_config
from tailkd_ray.core.summary import FIELDS, TEMPERATURE_KEY
from tailkd_ray.data.hashing import block_hashes
from tailkd_ray.errors import CacheError
from tailkd_ray.pipelines.distill import teacher_summaries
from tailkd_ray.teacher.cache import MANIFEST, open_cache, score_to_cache, teacher_identity
from tailkd_ray.teacher.pool import score_dataset

SEQ_LEN, TOP_M, TAIL, ROWS, SHARD_ROWS = 16, 6, 3, 14, 4


def make_config(model_dir, cache_dir, data_file, **overrides):
    values = {"teacher.model": str(model_dir), "data.seq_len": SEQ_LEN, "summary.top_m": TOP_M,
              "summary.tail_samples": TAIL, "summary.cache_dir": str(cache_dir), "loss.k": 4,
              "teacher.batch_size": 4, "train.seed": 3, "data.train": str(data_file), **overrides}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def random_blocks(rows: int = ROWS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 320, (rows, SEQ_LEN + 1)).astype(np.int32)


def as_dataset(blocks):
    import ray.data

    return ray.data.from_items([{"input_ids": row} for row in blocks])


def rows_by_hash(rows: list[dict]) -> dict[int, dict]:
    hashes = block_hashes(np.stack([r["input_ids"] for r in rows]))
    assert len(set(hashes.tolist())) == len(rows), "a block appears twice"
    return dict(zip(hashes.tolist(), rows))


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    a, b = rows_by_hash(a), rows_by_hash(b)
    assert a.keys() == b.keys()
    for key in a:
        for name in ("input_ids", *FIELDS):
            np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=name)


def read_manifest(cache_split_dir) -> dict:
    return json.loads((cache_split_dir / MANIFEST).read_text())


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """The file the config's data section names (its fingerprint is part of the cache identity)."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("some text\n")
    return path


@pytest.fixture(scope="module")
def complete_cache(tiny_llama_dir, data_file, ray_session, tmp_path_factory):
    """A cache written in one uninterrupted run: (config, CacheInfo, split directory)."""
    cfg = make_config(tiny_llama_dir, tmp_path_factory.mktemp("cache"), data_file)
    info = score_to_cache(cfg, as_dataset(random_blocks()), teacher_id=teacher_identity(str(tiny_llama_dir)),
                          shard_rows=SHARD_ROWS)
    return cfg, info, Path(info.path)


@pytest.mark.ray
def test_complete_cache_has_manifest_shards_and_exact_rows(complete_cache, tiny_llama_dir):
    cfg, info, split_dir = complete_cache
    manifest = read_manifest(split_dir)
    assert manifest["complete"] is True
    assert info.rows == manifest["rows"] == ROWS and info.scored_rows == ROWS
    assert info.tokens == manifest["tokens"] == ROWS * SEQ_LEN
    assert len(manifest["shards"]) >= 3 and sum(manifest["shards"].values()) == ROWS
    assert sorted(os.listdir(split_dir)) == sorted([MANIFEST, *manifest["shards"]])  # no temporaries left
    assert {name: entry["bytes"] for name, entry in manifest["checksums"].items()} == \
        {name: os.path.getsize(split_dir / name) for name in manifest["shards"]}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["checksums"].values())
    assert manifest["teacher"] == teacher_identity(str(tiny_llama_dir))
    assert (manifest["top_m"], manifest["tail_samples"], manifest["seq_len"], manifest["temperature"],
            manifest["logp_dtype"], manifest["seed"]) == (TOP_M, TAIL, SEQ_LEN, 1.0, "float16", 3)
    assert manifest["data"]["files"] == 1 and len(manifest["tokenizer_sha256"]) == 64
    for shard in manifest["shards"]:  # each shard also records the scoring τ (it can be read without the manifest)
        assert pq.read_schema(split_dir / shard).metadata[TEMPERATURE_KEY] == b"1.0"

    cached = open_cache(cfg).take_all()
    row = cached[0]
    assert row["input_ids"].shape == (SEQ_LEN + 1,)
    assert row["top_ids"].shape == row["top_logp"].shape == (SEQ_LEN, TOP_M)
    assert row["rest_logmass"].shape == (SEQ_LEN,) and row["tail_ids"].shape == (SEQ_LEN, TAIL)
    assert row["top_logp"].dtype == np.float16 and row["tail_ids"].dtype == np.int32
    # Bit-identical to a fresh streamed pass: the Parquet round trip is exact and tail samples are
    # deterministic across runs (different batching too: batch 4 here, 2 there).
    streamed = score_dataset(as_dataset(random_blocks()[::-1]),
                             make_config(tiny_llama_dir, None, cfg.data.train, **{"teacher.batch_size": 2}))
    assert_same_rows(cached, streamed.take_all())

    # A complete cache is reused, not re-scored.
    mtimes = {name: os.path.getmtime(split_dir / name) for name in os.listdir(split_dir)}
    again = score_to_cache(cfg, as_dataset(random_blocks()), teacher_id=manifest["teacher"])
    assert again.scored_rows == 0 and again.rows == ROWS
    assert {name: os.path.getmtime(split_dir / name) for name in os.listdir(split_dir)} == mtimes


@pytest.mark.ray
def test_cache_without_tail_samples_round_trips(tiny_llama_dir, data_file, tmp_path):
    """summary.tail_samples = 0 (top-M and the rest mass only): the tail columns are empty lists in the shards."""
    cfg = make_config(tiny_llama_dir, tmp_path / "cache", data_file, **{"summary.tail_samples": 0})
    info = score_to_cache(cfg, as_dataset(random_blocks()), teacher_id=teacher_identity(str(tiny_llama_dir)),
                          shard_rows=SHARD_ROWS)
    assert info.rows == ROWS
    cached = open_cache(cfg).take_all()
    assert cached[0]["tail_ids"].shape == cached[0]["tail_logp"].shape == (SEQ_LEN, 0)
    assert_same_rows(cached, score_dataset(as_dataset(random_blocks()), cfg).take_all())


@pytest.mark.ray
def test_interrupted_cache_is_refused_then_resumed(complete_cache, tiny_llama_dir, tmp_path):
    cfg, info, split_dir = complete_cache
    # Simulate a run killed mid-way: its first manifest (complete: false), one finished shard, and one
    # shard caught half-written under its temporary name.
    manifest = read_manifest(split_dir)
    first, second = list(manifest["shards"])[:2]
    interrupted = tmp_path / "cache" / "train"
    interrupted.mkdir(parents=True)
    identity = {k: v for k, v in manifest.items()
                if k not in ("complete", "shards", "rows", "tokens", "teacher_path", "tool_version", "finished")}
    (interrupted / MANIFEST).write_text(json.dumps({**identity, "complete": False}))
    shutil.copy(split_dir / first, interrupted / first)
    (interrupted / f".tmp-{second}-0123").write_bytes((split_dir / second).read_bytes()[:100])
    resumed_cfg = make_config(tiny_llama_dir, tmp_path / "cache", cfg.data.train)

    with pytest.raises(CacheError, match="incomplete .*interrupted.*run `tailkd score --config F` again"):
        open_cache(resumed_cfg)
    first_mtime = os.path.getmtime(interrupted / first)

    resumed = teacher_summaries(resumed_cfg, as_dataset(random_blocks()))
    assert read_manifest(interrupted)["complete"] is True
    already = manifest["shards"][first]
    assert not any(name.startswith(".tmp-") for name in os.listdir(interrupted))
    assert os.path.getmtime(interrupted / first) == first_mtime  # the finished shard was kept, not rewritten
    assert read_manifest(interrupted)["rows"] == ROWS
    assert sum(v for k, v in read_manifest(interrupted)["shards"].items() if k != first) == ROWS - already
    assert_same_rows(resumed.take_all(), open_cache(cfg).take_all())


@pytest.mark.ray
def test_mismatched_cache_is_refused_naming_the_fields(complete_cache, tiny_llama_dir, tiny_gpt2_dir, data_file):
    cfg, info, split_dir = complete_cache
    cache_dir = cfg.summary.cache_dir
    other_top_m = make_config(tiny_llama_dir, cache_dir, data_file, **{"summary.top_m": 8, "summary.tail_samples": 2})
    with pytest.raises(CacheError, match=r"differing field\(s\): tail_samples: cache has 3, config gives 2; "
                                         r"top_m: cache has 6, config gives 8\. To fix: set summary.cache_dir to "
                                         r"another directory"):
        score_to_cache(other_top_m, None, teacher_id=info.manifest["teacher"])
    with pytest.raises(CacheError, match="top_m: cache has 6, config gives 8"):
        open_cache(other_top_m, teacher_id=info.manifest["teacher"])

    other_teacher = make_config(tiny_gpt2_dir, cache_dir, data_file)
    with pytest.raises(CacheError, match=r"teacher.config_sha256: .*; teacher.weights_sha256: "):
        open_cache(other_teacher)

    original = data_file.read_text()
    data_file.write_text("the corpus changed\n")
    try:
        with pytest.raises(CacheError, match=r"data.bytes: cache has 10, config gives 19; data.files_sha256"):
            score_to_cache(cfg, None, teacher_id=info.manifest["teacher"])
    finally:
        data_file.write_text(original)


@pytest.mark.ray
def test_cache_at_another_temperature_is_refused_naming_both(complete_cache, tiny_llama_dir, data_file):
    """The cached log-probs are at the scoring τ (manifest ``temperature``): a loss at another τ must not use them."""
    cfg, info, _ = complete_cache
    hotter = make_config(tiny_llama_dir, cfg.summary.cache_dir, data_file, **{"loss.temperature": 2.0})
    expected = (r"differing field\(s\): .*temperature: cache has 1.0, config gives 2.0\. To fix: its teacher log-probs "
                r"are at temperature 1.0: set loss.temperature: 1.0 to train on it, or set summary.cache_dir")
    with pytest.raises(CacheError, match=expected):
        open_cache(hotter, teacher_id=info.manifest["teacher"])
    with pytest.raises(CacheError, match=expected):
        score_to_cache(hotter, None, teacher_id=info.manifest["teacher"])


def test_shards_without_manifest_are_refused(tiny_llama_dir, data_file, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-0.parquet").write_bytes(b"not ours")
    cfg = make_config(tiny_llama_dir, tmp_path, data_file)
    with pytest.raises(CacheError, match="holds Parquet shards but no manifest.json: it is not a tailkd summary cache"):
        score_to_cache(cfg, None, teacher_id={"weights_sha256": "x"})
    with pytest.raises(CacheError, match=r"no summary cache at .*/train \(no manifest.json\): run `tailkd score"):
        open_cache(make_config(tiny_llama_dir, tmp_path / "nothing", data_file), teacher_id={})


def test_teacher_identity_follows_the_weights(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert teacher_identity(str(copy)) == teacher_identity(str(tiny_llama_dir))  # the path is not identity

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)  # a "fine-tuned" teacher: same shapes, every tensor changed
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    identity, original = teacher_identity(str(tuned)), teacher_identity(str(tiny_llama_dir))
    assert identity["config_sha256"] == original["config_sha256"]
    assert identity["weights_sha256"] != original["weights_sha256"]


@pytest.mark.ray
def test_score_command_runs_one_teacher_pass_then_reuses(tiny_llama_dir, builtin_corpus, ray_session, tmp_path,
                                                         caplog, monkeypatch):
    """`tailkd score`: train and val summaries into summary.cache_dir once, each stage announced; a rerun scores
    nothing."""
    from tailkd_ray.config import ConfigError
    from tailkd_ray.pipelines.score import score
    from tailkd_ray.teacher.pool import ScoringProgress

    _, val_dir = builtin_corpus
    cfg = make_config(tiny_llama_dir, tmp_path / "cache", val_dir, **{"data.val_fraction": 0.25})
    monkeypatch.setattr(ScoringProgress, "MIN_LINE_S", 0.0)  # a line at every twentieth, however fast
    monkeypatch.setattr(ScoringProgress, "POLL_S", 0.05)
    with caplog.at_level("INFO", logger="tailkd_ray"):
        first = score(cfg)
    assert first["passes"] == 1 and first["tokens_scored"] == first["cache_tokens"] > 0
    files = len(list(Path(val_dir).rglob("*.txt")))
    assert any(m.startswith(f"tokenizing {val_dir}: {files} file(s) with ") for m in caplog.messages), caplog.messages
    ingest = next(m for m in caplog.messages if m.startswith("ingest: "))
    rows = {split: read_manifest(tmp_path / "cache" / split)["rows"] for split in ("train", "val")}
    assert f"blocks ({rows['train']} train, {rows['val']} val)" in ingest
    for split in ("train", "val"):
        manifest = read_manifest(tmp_path / "cache" / split)
        assert manifest["complete"] is True
        scored = [m for m in caplog.messages if m.startswith(f"teacher scoring {tmp_path / 'cache' / split}: ")]
        assert scored and scored[-1].split(": ")[1].startswith(f"{manifest['rows']}/{manifest['rows']} blocks scored")
        assert len(scored) <= ScoringProgress.LINES
    again = score(cfg)
    assert again["passes"] == 0 and again["tokens_scored"] == 0 and again["cache_tokens"] == first["cache_tokens"]
    with pytest.raises(ConfigError, match="set summary.cache_dir"):
        score(make_config(tiny_llama_dir, "null", val_dir))


@pytest.mark.ray
def test_damaged_shards_are_refused_by_name_then_rescored(tiny_llama_dir, builtin_corpus, ray_session, tmp_path,
                                                           monkeypatch):
    """A truncated shard and a shard with 4 bytes changed (same size): distill's path refuses the cache naming
    the shard; `tailkd score` re-scores exactly those shards, back to the same rows. A manifest without checksums
    (an older tailkd's) is refused too."""
    from tailkd_ray.pipelines.score import score

    import tailkd_ray.teacher.cache

    monkeypatch.setattr(tailkd_ray.teacher.cache, "rows_per_shard", lambda cfg: SHARD_ROWS)
    _, val_dir = builtin_corpus
    cfg = make_config(tiny_llama_dir, tmp_path / "cache", val_dir, **{"data.val_fraction": 0.25})
    first = score(cfg)
    split_dir = tmp_path / "cache" / "train"
    manifest = read_manifest(split_dir)
    before = open_cache(cfg).take_all()
    truncated, changed, *_ = sorted(manifest["shards"])
    data = (split_dir / truncated).read_bytes()
    (split_dir / truncated).write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=rf"shard {split_dir}/{truncated} holds {len(data) // 2} bytes, "
                                         rf"{len(data)} when written: run `tailkd score --config F` to re-score"):
        teacher_summaries(cfg, None, split="train")  # distill's path: the cache is complete, so it is opened
    (split_dir / truncated).write_bytes(data)
    data = bytearray((split_dir / changed).read_bytes())
    data[len(data) // 3: len(data) // 3 + 4] = bytes(255 - b for b in data[len(data) // 3: len(data) // 3 + 4])
    (split_dir / changed).write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"shard {split_dir}/{changed} was changed after it was written"):
        open_cache(cfg)
    (split_dir / truncated).write_bytes((split_dir / truncated).read_bytes()[:-10])

    again = score(cfg)
    rescored = manifest["shards"][truncated] + manifest["shards"][changed]
    assert again["passes"] == 1 and again["tokens_scored"] == rescored * SEQ_LEN
    assert again["cache_tokens"] == first["cache_tokens"]
    assert_same_rows(open_cache(cfg).take_all(), before)

    legacy = read_manifest(split_dir)
    del legacy["checksums"]
    (split_dir / MANIFEST).write_text(json.dumps(legacy))
    with pytest.raises(CacheError, match="has no recorded checksum .*older tailkd.*run `tailkd score"):
        open_cache(cfg)


def test_shards_are_written_in_row_groups_that_read_back_the_same(tmp_path):
    """write_shard cuts a shard into row groups of about row_group_bytes (Ray Data streams a shard a group at a
    time: a training stream's first batch waits for one group, not the whole shard); the rows read back equal those
    of a one-group shard."""
    import torch

    from tailkd_ray.core.summary import summarize
    from tailkd_ray.teacher.cache import ROW_GROUP_BYTES, restore_shapes, write_shard

    rows, seq_len = 12, 8
    ids = np.random.default_rng(0).integers(0, 50, (rows, seq_len + 1), dtype=np.int32)
    summary = summarize(torch.randn(rows, seq_len, 50, generator=torch.Generator().manual_seed(0)), top_m=4,
                        tail_samples=2, generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, **summary.to_numpy()}
    shards = {}
    for name, group_bytes in (("grouped", 1500), ("whole", None), ("default", ROW_GROUP_BYTES)):
        root = tmp_path / name
        root.mkdir()
        shards[name] = root / write_shard(batch, root=str(root), temperature=1.0, row_group_bytes=group_bytes)["shard"][0]
    groups = {name: pq.ParquetFile(path).metadata.num_row_groups for name, path in shards.items()}
    table_bytes = pq.read_table(shards["whole"]).nbytes
    assert groups["whole"] == groups["default"] == 1  # 12 tiny rows: far below 4 MiB
    assert groups["grouped"] == pytest.approx(table_bytes / 1500, abs=2) and groups["grouped"] > 1
    read = {name: restore_shapes(pq.read_table(path), seq_len=seq_len) for name, path in shards.items()}
    for column, values in read["whole"].items():
        np.testing.assert_array_equal(read["grouped"][column], values)
    np.testing.assert_array_equal(read["grouped"]["input_ids"], ids)
