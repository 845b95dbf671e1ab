"""Benchmarks of the TAD loss, the teacher summary, the teacher actor pool and the whole training pipeline.
Speed targets live here, not in tests.

    python jobs/bench.py loss --json runs/bench_loss.json          # step time ratios, peak memory
    python jobs/bench.py summary --json runs/bench_summary.json    # summary bytes, loss/grad fidelity
    python jobs/bench.py teacher --json runs/bench_teacher.json    # actor pool vs bare loop tokens/s
    python jobs/bench.py pipeline --json runs/bench_pipeline.json  # training tok/s: stream vs cache vs plain loop
    python jobs/bench.py checkpoint --json runs/bench_ckpt.json    # checkpoint seconds: in place vs copied
    python jobs/bench.py cache --json runs/bench_cache.json         # cache bytes: masked summaries blanked or not
    python jobs/bench.py loss --quick --json /tmp/l.json           # small sizes (seconds)

What each subcommand measures and its goals: the docstring of ``jobs/bench/<subcommand>.py``. The benchmarks are
not part of the installed package: ``import bench`` finds the ``bench/`` package next to this script (Python
prefers a package directory to a module of the same name, so this file does not import itself).
Every result records the command line, torch version, device, date and the raw per-repeat numbers.
"""

import os

# Keep every Ray process on 127.0.0.1 (DESIGN §5). Ray reads this when it is first imported (by the benchmarks'
# modules), so it is set here, before any of them is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
