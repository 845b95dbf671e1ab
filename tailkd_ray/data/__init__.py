"""Corpora in, packed token blocks out (DESIGN §1): ``read.py`` → ``pack.py`` → ``splits.py``; ``hashing.py``
names blocks by content; ``corpus.py`` is the built-in corpus of the demo (DESIGN §6)."""

from tailkd_ray.errors import DataError  # re-exported: `from tailkd_ray.data import DataError` predates the package
