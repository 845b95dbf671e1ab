"""Shared argument handling of the ``ray job submit`` entrypoints: ``--config F [key=value ...]``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir shipped by `ray job submit`

from tailkd_ray.cli import main  # noqa: E402


def run(command: str) -> None:
    """Run ``tailkd COMMAND`` with this script's arguments; exit with its status."""
    sys.exit(main([command, *sys.argv[1:]]))
