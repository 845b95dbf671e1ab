"""Benchmarks of the TAD loss, the teacher summary, the teacher actor pool, the student step, the whole training
pipeline, its checkpoints and the summary cache's bytes (``jobs/bench.py``): one subcommand per module of
``BENCHMARKS``.

A benchmark module provides ``NAME`` (the subcommand), ``HELP`` (its one-line help), ``SIZES`` (``{"default":
{...}, "quick": {...}}``: the value of every size flag left unset), ``add_arguments(parser)``, ``run(args) ->
dict`` and ``print_table(result)``. Every subcommand also takes --json (required), --quick, --device and --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import cache, checkpoint, loss, pipeline, student, summary, teacher
from .measure import log, run_metadata

BENCHMARKS = (loss, summary, teacher, student, pipeline, checkpoint, cache)


def build_parser() -> argparse.ArgumentParser:
    """The parser: a subcommand per benchmark, with its own flags and then the common ones."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for benchmark in BENCHMARKS:
        command = commands.add_parser(benchmark.NAME, help=benchmark.HELP)
        benchmark.add_arguments(command)
        command.add_argument("--json", required=True, help="write the results here (JSON)")
        command.add_argument("--quick", action="store_true", help="small sizes: seconds, for tests")
        command.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
        command.add_argument("--seed", type=int, default=0)
    return parser


def resolve_sizes(args, sizes: dict) -> None:
    """Fill every size flag not given on the command line from the default or --quick table."""
    for name, value in sizes["quick" if args.quick else "default"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark named by ``argv`` (default: ``sys.argv[1:]``), print its table and write its JSON
    (the result plus run metadata and total seconds); returns the result."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    benchmark = {module.NAME: module for module in BENCHMARKS}[args.command]
    resolve_sizes(args, benchmark.SIZES)
    started = time.perf_counter()
    result = {"benchmark": args.command, "meta": run_metadata(["jobs/bench.py", *argv], torch.device(args.device)),
              **benchmark.run(args)}
    result["meta"]["seconds"] = time.perf_counter() - started
    benchmark.print_table(result)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"\nwrote {out} ({result['meta']['seconds']:.0f} s)")
    return result
