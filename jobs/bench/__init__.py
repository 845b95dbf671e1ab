"""Benchmarks of the TAD loss, the teacher summary, the teacher actor pool and the whole training pipeline.
Speed targets live here, not in tests.

Run them with ``python jobs/bench.py SUBCOMMAND``; one module each:

- ``loss``: step time ratios and peak memory of the chunked loss;
- ``summary``: summary bytes and loss/gradient fidelity vs the exact loss;
- ``teacher``: teacher tokens/s, Ray Data actor pool vs a bare in-process loop;
- ``student``: the student's step, peak memory and time with / without activation checkpointing (and compile);
- ``pipeline``: student training tokens/s, teacher pool streaming vs Parquet cache vs a single-process loop;
- ``checkpoint``: checkpoint seconds, written in place vs written locally and copied.

``measure`` holds what they share (interleaved timing, peak memory, run metadata, local Ray, small Llamas);
``cli`` the parser and ``main``.
"""
