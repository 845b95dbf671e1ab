"""The summary cache: one teacher pass written to Parquet, read by many training runs (DESIGN §1, §3, §10).

What it does, and nothing else: the cache's identity (what it was computed from), writing it (scoring what is
missing with the teacher pool, ``pool.score_dataset``), resuming an interrupted write, and opening a complete one.

Layout of ``summary.cache_dir/<split>/`` (split = ``train`` or ``val``):

- ``part-<hash>.parquet``: scored rows with fixed-size-list columns ``input_ids`` (seq_len + 1; and ``loss_mask``,
  uint8, and ``position_ids``, int32, as ``pack.block_columns`` gives them),
  ``top_ids``/``top_logp`` (seq_len·M), ``rest_logmass`` (seq_len), ``tail_ids``/``tail_logp`` (seq_len·S)
  and ``block_hash`` (int64 content hash of the row's ids). A shard's name is a hash of the set of blocks
  it holds, so a retried write task replaces its own file instead of duplicating rows.
- ``manifest.json``: what the cache was computed from (teacher identity and weights hash, tokenizer hash, whether
  documents start with BOS, the shared vocabulary (the tokenizer's length, where summary ids stop), top_m, tail_samples, seq_len, temperature, logp_dtype, seed, data fingerprint), the shards and their
  row counts, each shard's size and SHA-256 (``checksums``), and ``complete``.

Crash safety: the manifest is written first with ``complete: false``; every shard is written under a
temporary name and renamed when whole; the manifest with ``complete: true`` replaces the first one last
(atomic rename). A cache is only read when complete. Re-running resumes: the blocks already in finished
shards (by content hash) are skipped and only the rest is scored; a complete cache is not re-scored. A
cache whose identity differs from the config is refused with the list of differing fields.

Integrity: opening a cache checks every shard's size and hashes it, once per run (``check_cache``: one Ray
task per shard, in parallel; ~1.4 s per GB per CPU): a damaged or changed shard is refused by name
(``CacheError``) and ``tailkd score`` re-scores it (``drop_damaged_shards``). A manifest written before shards
had checksums lists none: such a cache is refused until ``tailkd score`` re-scores its shards.
Blocks are identified by content: if the corpus repeats a whole packed block and one copy of it is in a
finished shard already, a resumed run skips the other copies too (an uninterrupted run keeps them all).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch
from huggingface_hub import snapshot_download

from tailkd_ray import __version__
from tailkd_ray.config import Config, differing_fields
from tailkd_ray.core.summary import FIELDS, TeacherSummary, bytes_per_position
from tailkd_ray.data.hashing import block_hashes, stream_sha256
from tailkd_ray.data.pack import BLOCK_COLUMNS, block_columns, document_bos_id
from tailkd_ray.data.read import HF_PREFIX, expand_paths
from tailkd_ray.data.splits import data_tokenizer
from tailkd_ray.errors import CacheError, ConfigError, DataError
from tailkd_ray.models import tokenizer_size
from tailkd_ray.teacher.pool import ScoringProgress, input_ids_matrix, score_dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # bump when the shard layout changes; older caches are then refused (2: whole supervised samples)
SHARD_BYTES = 256 * 2**20  # target Parquet shard size
# Target Parquet row-group size. Ray Data reads a shard row group by row group, so a training stream's first batch
# waits for one group, not the whole shard (`jobs/bench.py cache --shard`, README "Fixed costs of a run").
ROW_GROUP_BYTES = 4 * 2**20
_SAMPLE_BYTES = 64 * 2**10
_SAMPLES_PER_FILE = 32
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model")


@dataclass
class CacheInfo:
    """A complete cache: where it is, what it holds, and how many rows this call scored."""

    path: str
    rows: int
    tokens: int
    shards: dict  # shard file name -> rows
    scored_rows: int  # rows scored by this call (0 when the cache was already complete)
    manifest: dict


# --- identity: what a cache was computed from ---------------------------------------------------------

def teacher_identity(model_path: str) -> dict:
    """Teacher identity: hashes of its config.json and of its weight files.

    The weights hash covers each weight file's name and size, its first MiB (the whole safetensors header:
    tensor names, dtypes, shapes, offsets) and 32 evenly spaced 64 KiB samples of its bytes: a few MiB read
    per file, yet any retrained or fine-tuned checkpoint (whose tensors all change) hashes differently.
    """
    directory = _local_model_dir(model_path)
    weights = sorted(name for name in os.listdir(directory) if name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise ConfigError(f"teacher {model_path} has no weight files ({', '.join(_WEIGHT_SUFFIXES)}): set "
                          f"teacher.model to a directory holding the teacher's weights")
    digest = hashlib.sha256()
    for name in weights:
        digest.update(name.encode() + b"\0")
        _update_with_samples(digest, os.path.join(directory, name))
    with open(os.path.join(directory, "config.json"), "rb") as f:
        config_hash = hashlib.sha256(f.read()).hexdigest()
    return {"config_sha256": config_hash, "weights_sha256": digest.hexdigest()}


def _local_model_dir(model_path: str) -> str:
    if os.path.isdir(model_path):
        return model_path
    return snapshot_download(model_path, local_files_only=True)


def _update_with_samples(digest, path: str) -> None:
    size = os.path.getsize(path)
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(2**20))
        for offset in np.linspace(0, max(size - _SAMPLE_BYTES, 0), _SAMPLES_PER_FILE, dtype=np.int64):
            f.seek(int(offset))
            digest.update(f.read(_SAMPLE_BYTES))


def tokenizer_hash(tokenizer_path: str) -> str:
    """SHA-256 over the tokenizer's files (vocabulary, merges, special tokens, settings)."""
    directory = _local_model_dir(tokenizer_path)
    digest = hashlib.sha256()
    names = [name for name in _TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name))]
    if not names:
        raise DataError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tokenizer_path}; set "
                        f"data.tokenizer to the teacher's tokenizer")
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def data_fingerprint(cfg: Config) -> dict:
    """The data section of the config plus the count, total size and a hash of (path, size, mtime) of the
    files it reads (``read.expand_paths``; a URI is listed recursively through its pyarrow filesystem). An
    in-memory corpus has no files: its label in the data section holds its datasets fingerprint (``read``)."""
    files = sorted(entry for pattern in (cfg.data.train, cfg.data.val) if pattern and not pattern.startswith(HF_PREFIX)
                   for path in expand_paths(pattern) for entry in _file_stats(path))
    return {"config": asdict(cfg.data), "files": len(files), "bytes": sum(size for _, size, _ in files),
            "files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


def _file_stats(uri: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of a file, or of every file under a directory."""
    fs, path = _filesystem(uri)
    info = fs.get_file_info(path)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.type == pafs.FileType.Directory \
        else [info]
    return [(i.path, i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File]


def cache_identity(cfg: Config, *, teacher_id: dict, split: str) -> dict:
    """Everything a cache's content depends on; a cache is reused only when all of it matches. How documents were
    tokenized is resolved here (``document_bos_id``: data.add_bos null follows the tokenizer), so the identity holds
    what was done, not the setting."""
    tokenizer = data_tokenizer(cfg)
    return {"format_version": FORMAT_VERSION, "split": split, "teacher": teacher_id,
            "tokenizer_sha256": tokenizer_hash(cfg.data.tokenizer or cfg.teacher.model),
            "document_bos": document_bos_id(tokenizer, cfg.data) is not None,
            "shared_vocab": tokenizer_size(tokenizer),  # summary ids stop there: padding rows beyond it (DESIGN §3)
            "top_m": cfg.summary.top_m, "tail_samples": cfg.summary.tail_samples, "seq_len": cfg.data.seq_len,
            "temperature": cfg.loss.temperature, "logp_dtype": cfg.summary.logp_dtype, "seed": cfg.train.seed,
            "data": data_fingerprint(cfg)}


def _require_match(manifest: dict, identity: dict, root: str) -> None:
    differing = differing_fields({k: manifest.get(k) for k in identity}, identity, recorded_as="cache")
    if differing:
        remedy = "set summary.cache_dir to another directory (or delete this one) to score a new cache"
        # τ is the setting a user most expects to vary on one cache, but the teacher's log-probs are fixed at the
        # scoring τ: say so rather than leave "temperature" among the other fields.
        scored_at = manifest.get("temperature")
        if scored_at != identity["temperature"]:
            remedy = (f"its teacher log-probs are at temperature {scored_at}: set loss.temperature: {scored_at} to "
                      f"train on it, or {remedy}")
        raise CacheError(f"summary cache {root} was computed from other inputs than this config; differing "
                         f"field(s): {'; '.join(differing)}. To fix: {remedy}")


# --- files ------------------------------------------------------------------------------------------

def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def split_dir(cfg: Config, split: str) -> str:
    if cfg.summary.cache_dir is None:
        raise ConfigError("summary.cache_dir is null (streaming mode): set it to a directory to use a cache")
    return f"{cfg.summary.cache_dir.rstrip('/')}/{split}"


def _read_manifest(fs: pafs.FileSystem, base: str) -> Optional[dict]:
    if fs.get_file_info(f"{base}/{MANIFEST}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
        return json.loads(f.read())


def _write_atomically(fs: pafs.FileSystem, path: str, write) -> None:
    """Write through ``write(stream)`` under a temporary name, then rename: readers never see half a file."""
    directory, _, name = path.rpartition("/")
    temporary = f"{directory}/.tmp-{name}-{uuid.uuid4().hex}"
    with fs.open_output_stream(temporary) as stream:
        write(stream)
    fs.move(temporary, path)


def _write_manifest(fs: pafs.FileSystem, base: str, manifest: dict) -> None:
    _write_atomically(fs, f"{base}/{MANIFEST}",
                      lambda stream: stream.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))


def _entries(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)) if i.type == pafs.FileType.File]


def _shard_paths(fs: pafs.FileSystem, base: str) -> list[str]:
    """The whole shards present (temporaries excluded)."""
    return sorted(i.path for i in _entries(fs, base)
                  if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))


def _shard_checksum(root: str, name: str) -> dict:
    """A shard's size and SHA-256, as the manifest records them."""
    fs, base = _filesystem(root)
    with fs.open_input_stream(f"{base}/{name}") as stream:
        return {"bytes": fs.get_file_info(f"{base}/{name}").size, "sha256": stream_sha256(stream)}


def _checksums(root: str, names: list[str]) -> dict[str, dict]:
    """Shard name -> size and SHA-256 for ``names``, hashed in parallel Ray tasks (one per shard)."""
    task = ray.remote(num_cpus=1)(_shard_checksum)
    return dict(zip(names, ray.get([task.remote(root, name) for name in names])))


def shard_problems(root: str, manifest: dict, *, hashes: bool = True) -> dict[str, str]:
    """Shard name -> what is wrong with it, for the complete cache's shards that are missing, of another size
    than written or (``hashes``) of other contents, or have no recorded checksum; empty when all are intact."""
    fs, base = _filesystem(root)
    recorded = manifest.get("checksums", {})
    problems, to_hash = {}, []
    for name in manifest["shards"]:
        info = fs.get_file_info(f"{base}/{name}")
        if name not in recorded:
            problems[name] = "has no recorded checksum (the cache was written by an older tailkd)"
        elif info.type != pafs.FileType.File:
            problems[name] = "is missing"
        elif info.size != recorded[name]["bytes"]:
            problems[name] = f"holds {info.size} bytes, {recorded[name]['bytes']} when written"
        elif hashes:
            to_hash.append(name)
    for name, checksum in _checksums(root, to_hash).items():
        if checksum["sha256"] != recorded[name]["sha256"]:
            problems[name] = "was changed after it was written (SHA-256 differs)"
    return problems


def drop_damaged_shards(cfg: Config, split: str, *, teacher_id: dict) -> int:
    """``tailkd score``'s check of a complete cache matching ``cfg``: delete every shard ``shard_problems`` finds
    damaged and mark the cache incomplete, so that scoring resumes and re-scores their blocks; returns the shards
    dropped. A cache computed from other inputs is refused before any shard is touched."""
    root = split_dir(cfg, split)
    fs, base = _filesystem(root)
    manifest = _read_manifest(fs, base)
    if not (manifest and manifest.get("complete")):
        return 0
    _require_match(manifest, cache_identity(cfg, teacher_id=teacher_id, split=split), root)
    problems = shard_problems(root, manifest)
    if not problems:
        return 0
    log.warning("summary cache %s: re-scoring %d damaged shard(s): %s", root, len(problems),
                "; ".join(f"{name} {problem}" for name, problem in problems.items()))
    for name in problems:
        if fs.get_file_info(f"{base}/{name}").type == pafs.FileType.File:
            fs.delete_file(f"{base}/{name}")
    intact = {name: entry for name, entry in manifest.get("checksums", {}).items() if name not in problems}
    _write_manifest(fs, base, {**{k: v for k, v in manifest.items() if k not in ("shards", "rows", "tokens")},
                               "complete": False, "checksums": intact})
    return len(problems)


def _finished_shards(fs: pafs.FileSystem, base: str) -> dict[str, int]:
    """Shard file name -> rows, from the Parquet footers."""
    shards = {}
    for path in _shard_paths(fs, base):
        try:
            with fs.open_input_file(path) as f:
                shards[path.rpartition("/")[2]] = pq.ParquetFile(f).metadata.num_rows
        except pa.ArrowInvalid as err:
            raise CacheError(f"summary cache shard {path} is not a readable Parquet file ({err}); delete it and "
                             f"re-run `tailkd score` to re-score its blocks") from err
    return shards


def _remove_temporaries(fs: pafs.FileSystem, base: str) -> int:
    stale = [i.path for i in _entries(fs, base) if i.base_name.startswith(".tmp-")]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def _cached_block_hashes(fs: pafs.FileSystem, base: str, shards: dict[str, int]) -> np.ndarray:
    hashes = [np.empty(0, dtype=np.int64)]
    for name in shards:
        with fs.open_input_file(f"{base}/{name}") as f:
            hashes.append(pq.read_table(f, columns=["block_hash"]).column("block_hash").to_numpy())
    return np.unique(np.concatenate(hashes))


def write_shard(batch: dict[str, np.ndarray], *, root: str, temperature: float,
                row_group_bytes: Optional[int] = ROW_GROUP_BYTES) -> dict[str, np.ndarray]:
    """Ray Data task: write one batch of scored rows as a Parquet shard of row groups of about ``row_group_bytes``
    (None: one group, for comparison in ``jobs/bench/cache.py``); returns its name and row count.
    ``temperature`` (the scoring τ) goes into the shard's schema metadata, so a shard read alone knows it."""
    hashes = block_hashes(batch["input_ids"])
    extra = {name: batch[name] for name in BLOCK_COLUMNS if name in batch}
    record = TeacherSummary.from_batch(blank_masked(batch), temperature=temperature).to_arrow(extra=extra)
    table = pa.Table.from_batches([record]).append_column("block_hash", pa.array(hashes))
    name = f"part-{hashlib.blake2b(np.sort(hashes).tobytes(), digest_size=10).hexdigest()}.parquet"
    fs, base = _filesystem(root)
    group_rows = max(1, len(table) if row_group_bytes is None else row_group_bytes * len(table) // max(1, table.nbytes))
    _write_atomically(fs, f"{base}/{name}", lambda stream: pq.write_table(table, stream, row_group_size=group_rows))
    return {"shard": np.array([name]), "rows": np.array([len(hashes)])}


def blank_masked(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The summary columns of ``batch`` zeroed where the target is masked (``loss_mask[:, 1:] == 0``: prompts,
    padding): the losses and metrics read a summary only where the target counts (they select those positions by
    index), and runs of zeros take a few bytes in Parquet (DESIGN §10). Without a loss_mask, ``batch`` as it is."""
    if "loss_mask" not in batch:
        return batch
    masked = np.asarray(batch["loss_mask"])[:, 1:] == 0  # [B, T], a summary's leading dimensions
    blanked = {name: np.array(batch[name]) for name in FIELDS}  # copies: the caller's batch stays as it is
    for values in blanked.values():
        values[masked] = 0
    return blanked


def drop_cached(batch: dict[str, np.ndarray], *, cached: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Ray Data task: keep only the blocks whose content hash is not among the cached ones."""
    ids = input_ids_matrix(batch, seq_len)
    keep = ~np.isin(block_hashes(ids), cached)
    return {name: (ids if name == "input_ids" else batch[name])[keep] for name in BLOCK_COLUMNS if name in batch}


def rows_per_shard(cfg: Config) -> int:
    """Rows per Parquet shard for about ``SHARD_BYTES`` per file."""
    logp_dtype = getattr(torch, cfg.summary.logp_dtype)
    row_bytes = cfg.data.seq_len * bytes_per_position(cfg.summary.top_m, cfg.summary.tail_samples, logp_dtype) \
        + 4 * (cfg.data.seq_len + 1)
    return max(1, SHARD_BYTES // row_bytes)


# --- the public entry points ------------------------------------------------------------------------

def score_to_cache(cfg: Config, blocks, *, teacher_id: dict, split: str = "train",
                   shard_rows: Optional[int] = None) -> CacheInfo:
    """Score ``blocks`` (packed ``input_ids``) with the teacher pool into the cache; resume or skip if begun.

    ``teacher_id`` comes from ``teacher_identity(cfg.teacher.model)``; ``shard_rows`` overrides the rows per
    shard (default: ``rows_per_shard(cfg)``).
    """
    root = split_dir(cfg, split)
    fs, base = _filesystem(root)
    identity = cache_identity(cfg, teacher_id=teacher_id, split=split)
    complete = _begin(fs, base, root, identity)
    if complete is not None:
        return _info(root, complete, scored_rows=0)
    scored_rows = _score_missing(cfg, blocks, fs, base, root, shard_rows or rows_per_shard(cfg))
    return _info(root, _finish(cfg, fs, base, root, identity, split), scored_rows=scored_rows)


def _begin(fs: pafs.FileSystem, base: str, root: str, identity: dict) -> Optional[dict]:
    """The manifest of a complete cache with this identity, else None once the cache is begun (its manifest
    written with ``complete: false``) or found begun; a foreign or mismatched directory is refused."""
    manifest = _read_manifest(fs, base)
    if manifest is not None:
        _require_match(manifest, identity, root)
        if manifest.get("complete"):
            log.info("summary cache %s is complete (%d rows in %d shards): nothing to score", root,
                     manifest["rows"], len(manifest["shards"]))
            return manifest
    elif _shard_paths(fs, base):
        raise CacheError(f"{root} holds Parquet shards but no {MANIFEST}: it is not a tailkd summary cache "
                         f"(or its manifest was deleted); set summary.cache_dir to another directory or empty it")
    else:
        fs.create_dir(base, recursive=True)
        _write_manifest(fs, base, {**identity, "complete": False})
    return None


def _score_missing(cfg: Config, blocks, fs: pafs.FileSystem, base: str, root: str, shard_rows: int) -> int:
    """Score the blocks not yet in a finished shard into new shards; returns the rows scored."""
    removed = _remove_temporaries(fs, base)
    done = _finished_shards(fs, base)
    todo = blocks
    if done:
        log.info("resuming summary cache %s: %d shards (%d rows) already written, %d stale temporary file(s) "
                 "removed; scoring the remaining blocks", root, len(done), sum(done.values()), removed)
        todo = blocks.map_batches(drop_cached, fn_kwargs={"cached": _cached_block_hashes(fs, base, done),
                                                          "seq_len": cfg.data.seq_len}, batch_format="numpy")
    with ScoringProgress(f"teacher scoring {root}", cfg.data.seq_len, todo.count()) as progress:
        written = score_dataset(todo, cfg, progress).map_batches(
            write_shard, fn_kwargs={"root": root, "temperature": cfg.loss.temperature}, batch_size=shard_rows,
            batch_format="numpy").take_all()
    return sum(int(r["rows"]) for r in written)


def _finish(cfg: Config, fs: pafs.FileSystem, base: str, root: str, identity: dict, split: str) -> dict:
    """Replace the manifest by the complete one, listing every finished shard with its checksum (the atomic last
    step). Checksums an earlier, re-scored pass recorded are kept; the new shards are hashed (in parallel)."""
    shards = _finished_shards(fs, base)
    rows = sum(shards.values())
    if rows == 0:
        raise DataError(f"no packed blocks to score for split {split!r}: the corpus produced no blocks of "
                        f"data.seq_len + 1 = {cfg.data.seq_len + 1} tokens; check data.{split} and data.seq_len")
    recorded = (_read_manifest(fs, base) or {}).get("checksums", {})
    checksums = {name: recorded[name] for name in shards if name in recorded}
    checksums.update(_checksums(root, [name for name in shards if name not in recorded]))
    manifest = {**identity, "complete": True, "shards": shards, "checksums": dict(sorted(checksums.items())),
                "rows": rows, "tokens": rows * cfg.data.seq_len,
                "teacher_path": str(cfg.teacher.model), "tool_version": __version__,
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _write_manifest(fs, base, manifest)
    log.info("summary cache %s complete: %d rows in %d shards", root, rows, len(shards))
    return manifest


def _info(root: str, manifest: dict, *, scored_rows: int) -> CacheInfo:
    return CacheInfo(path=root, rows=manifest["rows"], tokens=manifest["tokens"], shards=manifest["shards"],
                     scored_rows=scored_rows, manifest=manifest)


def is_complete(cfg: Config, split: str) -> bool:
    """Whether ``summary.cache_dir/<split>`` holds a finished cache (whose identity is checked when used):
    lets a caller skip reading the corpus when nothing is left to score."""
    fs, base = _filesystem(split_dir(cfg, split))
    manifest = _read_manifest(fs, base)
    return bool(manifest and manifest.get("complete"))


def open_cache(cfg: Config, *, split: str = "train", teacher_id: Optional[dict] = None, hashes: bool = True):
    """The complete cache as a Dataset with ``input_ids`` [B, T+1] and the five summary columns, once
    ``check_cache`` passed (``hashes=False``: sizes only, for a cache this run hashed already: Tune's trials)."""
    root = split_dir(cfg, split)
    manifest = check_cache(cfg, split=split, teacher_id=teacher_id, hashes=hashes)
    paths = [f"{root}/{name}" for name in manifest["shards"]]
    blocks = block_columns(cfg.data)  # the identity pins the data settings
    return ray.data.read_parquet(paths, columns=[*blocks, *FIELDS]).map_batches(
        restore_shapes, fn_kwargs={"seq_len": manifest["seq_len"]}, batch_format="pyarrow")


def check_cache(cfg: Config, *, split: str = "train", teacher_id: Optional[dict] = None, hashes: bool = True) -> dict:
    """The manifest of the complete, intact cache of ``split`` matching ``cfg``, else a ``CacheError``.

    The manifest is checked against ``cfg`` (teacher, tokenizer, summary settings, scoring τ = loss.temperature,
    data; the config itself holds loss.k ≤ summary.top_m, which the identity pins to the cache's top_m);
    ``teacher_id`` defaults to ``teacher_identity(cfg.teacher.model)``. The rows (numpy batches) do not carry τ:
    this check is what ties them to the loss's temperature. Then every shard's size and (``hashes``) SHA-256.
    """
    root = split_dir(cfg, split)
    fs, base = _filesystem(root)
    manifest = _read_manifest(fs, base)
    if manifest is None:
        raise CacheError(f"no summary cache at {root} (no {MANIFEST}): run `tailkd score --config F` first")
    if not manifest.get("complete"):
        raise CacheError(f"summary cache {root} is incomplete (its scoring run was interrupted): run "
                         f"`tailkd score --config F` again to finish it")
    identity = cache_identity(cfg, teacher_id=teacher_id or teacher_identity(cfg.teacher.model), split=split)
    _require_match(manifest, identity, root)
    problems = shard_problems(root, manifest, hashes=hashes)
    if problems:
        name, problem = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more shard(s))" if len(problems) > 1 else ""
        raise CacheError(f"summary cache shard {root}/{name} {problem}{more}: run `tailkd score --config F` to "
                         f"re-score the damaged shard(s)")
    return manifest


def restore_shapes(table: pa.Table, *, seq_len: int) -> dict[str, np.ndarray]:
    """Ray Data task: flat fixed-size-list columns -> [B, T+1] ids (loss_mask, position_ids) and [B, T, ...] summary
    arrays."""
    blocks = {name: table.column(name).combine_chunks().flatten().to_numpy().reshape(len(table), seq_len + 1)
              for name in BLOCK_COLUMNS if name in table.column_names}
    return {**blocks, **TeacherSummary.from_arrow(table, tokens_per_row=seq_len).to_numpy()}
