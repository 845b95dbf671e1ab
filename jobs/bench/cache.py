"""``cache``: bytes of the summary cache's shards with the summaries at masked positions blanked, and without.

The losses and metrics read a summary only where the target is trained (``loss_mask[:, 1:]``), so ``write_shard``
zeroes the summary columns elsewhere (prompts, padding) and Parquet's dictionary / RLE encoding and compression
store those runs in a few bytes. This measures what that saves on supervised data: the math demo's prompt /
completion problems (``data/math_problems.py``), packed as ``tailkd distill`` packs them (whole samples, data.seq_len
128), with a BPE tokenizer trained on them and a teacher (``--teacher``: a model directory, e.g. the math demo's
``runs/demo/teacher/student``; default a random Llama of the demo teacher's size: its summaries are as incompressible
as a trained teacher's, which is what the blanked positions no longer hold). The same scored rows are written twice
by ``write_shard``: as they are (blanked), and with an all-ones ``loss_mask`` (nothing blanked); the bytes of the
five summary columns (Parquet column-chunk sizes) compare the two without the loss_mask column's own difference.

Second, the seconds to a training stream's first batch from one shard of all the rows: written in row groups of
``ROW_GROUP_BYTES`` (what ``write_shard`` does) and as one row group (as before), each read the way ``open_cache``
reads it (``read_parquet`` + ``restore_shapes``, 8 rows a batch), interleaved over ``--repeats``: Ray Data reads a
shard a row group at a time, so the first batch waits for one group, not the whole shard.
"""

from __future__ import annotations

import statistics
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray.data
import torch

from tailkd_ray.config import from_dict
from tailkd_ray.core.summary import FIELDS
from tailkd_ray.data.corpus import train_bpe_tokenizer
from tailkd_ray.data.math_problems import write_math_problems
from tailkd_ray.data.splits import train_val_datasets
from tailkd_ray.models import llama_config, load_tokenizer, save_random_model
from tailkd_ray.runtime import init_ray
from tailkd_ray.teacher.cache import ROW_GROUP_BYTES, restore_shapes, write_shard
from tailkd_ray.teacher.pool import TeacherScorer, scorer_kwargs

from .measure import log, paired_ratio, time_interleaved

NAME = "cache"
HELP = "summary cache bytes per row with the summaries at masked positions blanked, and without"

SIZES = {
    "default": dict(problems=4000, vocab=1024, seq_len=128, top_m=64, tail_samples=16, batch=64, repeats=3),
    "quick": dict(problems=200, vocab=512, seq_len=128, top_m=16, tail_samples=4, batch=16, repeats=1),
}


def add_arguments(parser) -> None:
    parser.add_argument("--teacher", default=None, help="teacher model directory (default: a random Llama)")
    parser.add_argument("--problems", type=int, default=None, help="math problems (prompt_completion samples)")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary trained on the problems")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--top-m", type=int, default=None)
    parser.add_argument("--tail-samples", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="blocks per shard")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved first-batch timings per layout")
    parser.add_argument("--shard", default=None, help="time the first batch on this cache shard's rows instead "
                                                       "(e.g. runs/demo/summary_cache/train/part-*.parquet)")


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    write_math_problems(work / "corpus", args.problems, 0, seed=args.seed)
    train_bpe_tokenizer(sorted((work / "corpus" / "train").glob("*.jsonl")), args.vocab, work / "tokenizer")
    teacher = args.teacher or str(save_random_model(
        llama_config(vocab=len(load_tokenizer(work / "tokenizer")), layers=4, width=128, heads=4,
                     intermediate=512, max_positions=args.seq_len + 1), work / "teacher", seed=args.seed,
        tokenizer=work / "tokenizer"))
    cfg = from_dict({"teacher": {"model": teacher},
                     "data": {"train": str(work / "corpus" / "train"), "format": "prompt_completion",
                              "tokenizer": str(work / "tokenizer"), "seq_len": args.seq_len, "val_fraction": 0.0,
                              "shuffle": False, "tokenizer_actors": 1},
                     "summary": {"top_m": args.top_m, "tail_samples": args.tail_samples},
                     "loss": {"k": min(10, args.top_m)}, "train": {"seed": args.seed}})
    init_ray()
    train, _, report = train_val_datasets(cfg)
    rows = train.take_all()
    log(report.summary())
    scorer = TeacherScorer(**scorer_kwargs(cfg))
    sizes = {"blanked": [0, 0], "stored": [0, 0]}  # [file bytes, summary column bytes]
    scored_batches = []
    for start in range(0, len(rows), args.batch):
        chunk = rows[start:start + args.batch]
        scored = scorer({name: np.stack([row[name] for row in chunk]) for name in chunk[0]})
        scored_batches.append(scored)
        for variant, batch in (("blanked", scored), ("stored", {**scored, "loss_mask": np.ones_like(
                scored["loss_mask"])})):
            root = work / variant
            root.mkdir(exist_ok=True)
            name = write_shard(batch, root=str(root), temperature=1.0)["shard"][0]
            path = root / name
            sizes[variant][0] += path.stat().st_size
            sizes[variant][1] += _column_bytes(path, FIELDS)
            path.unlink()
    masks = np.stack([row["loss_mask"] for row in rows])
    blanked, stored = ({"file_bytes_per_row": sizes[v][0] / len(rows), "summary_bytes_per_row": sizes[v][1] / len(rows)}
                       for v in ("blanked", "stored"))
    return {"teacher": args.teacher or "random Llama 4 x 128", "rows": len(rows), "seq_len": args.seq_len,
            "top_m": args.top_m, "tail_samples": args.tail_samples, "logp_dtype": cfg.summary.logp_dtype,
            "masked_target_share": float(1 - masks[:, 1:].mean()), "padding_tokens": report.padding_tokens,
            "tokens": report.tokens, "blanked": blanked, "stored": stored,
            "summary_bytes_ratio": stored["summary_bytes_per_row"] / blanked["summary_bytes_per_row"],
            "file_bytes_ratio": stored["file_bytes_per_row"] / blanked["file_bytes_per_row"],
            "first_batch": _first_batch_seconds(work, scored_batches, args)}


def _first_batch_seconds(work: Path, scored_batches: list, args) -> dict:
    """Seconds to the first batch of 8 rows from one shard of every scored row (or of ``--shard``'s rows), per
    row-group layout, interleaved; one untimed round first (worker start-up, imports)."""
    if args.shard:
        table = pq.read_table(args.shard)
        seq_len = table.schema.field("input_ids").type.list_size - 1
        everything = restore_shapes(table, seq_len=seq_len)
    else:
        seq_len = args.seq_len
        everything = {name: np.concatenate([b[name] for b in scored_batches]) for name in scored_batches[0]}
    paths, groups = {}, {}
    for layout, group_bytes in (("row_groups", ROW_GROUP_BYTES), ("one_row_group", None)):
        root = work / layout
        root.mkdir(exist_ok=True)
        paths[layout] = str(root / write_shard(everything, root=str(root), temperature=1.0,
                                               row_group_bytes=group_bytes)["shard"][0])
        groups[layout] = pq.ParquetFile(paths[layout]).metadata.num_row_groups

    def first_batch(path: str) -> None:
        stream = ray.data.read_parquet([path]).map_batches(restore_shapes, fn_kwargs={"seq_len": seq_len},
                                                           batch_format="pyarrow")
        next(iter(stream.iter_batches(batch_size=8)))

    seconds = time_interleaved({layout: partial(first_batch, path) for layout, path in paths.items()},
                               repeats=args.repeats, warmup=1, device=torch.device("cpu"), progress=log)
    paired = paired_ratio(seconds, "row_groups", "one_row_group")
    return {"shard": args.shard, "rows": len(everything["input_ids"]), "row_group_bytes": ROW_GROUP_BYTES,
            "row_groups": groups, "seconds": seconds, "median_seconds": {k: statistics.median(v) for k, v in
                                                                         seconds.items()},
            "row_groups_over_one_median_of_paired": paired["median_of_paired_ratios"]}


def _column_bytes(path: Path, columns) -> int:
    """Compressed bytes of ``columns`` in the Parquet file (sum over row groups of their column chunks)."""
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups)
               for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema.split(".")[0] in columns)


def print_table(result: dict) -> None:
    log(f"\n{result['rows']} rows of seq_len {result['seq_len']} (M = {result['top_m']}, S = {result['tail_samples']}, "
        f"{result['logp_dtype']}); {result['masked_target_share']:.1%} of the targets masked (prompts, padding)")
    log("| shard | bytes per row | summary columns, bytes per row |\n|---|---|---|")
    for variant in ("stored", "blanked"):
        values = result[variant]
        log(f"| {variant} | {values['file_bytes_per_row']:.0f} | {values['summary_bytes_per_row']:.0f} |")
    log(f"summary columns {result['summary_bytes_ratio']:.2f}x smaller blanked; whole shards "
        f"{result['file_bytes_ratio']:.2f}x")
    first = result["first_batch"]
    log(f"\nseconds to a stream's first batch from one shard of {first['rows']} rows"
        f"{' of ' + first['shard'] if first['shard'] else ''} (median of {len(first['seconds']['row_groups'])}):")
    for layout, seconds in first["median_seconds"].items():
        log(f"  {layout:14s} {first['row_groups'][layout]:4d} row group(s)  {seconds:6.2f} s")
    log(f"  row_groups / one_row_group, median of paired repeats: {first['row_groups_over_one_median_of_paired']:.2f}")
