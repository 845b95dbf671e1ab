"""jobs/chaos.py, small: a streamed distill on the simulated multi-node cluster, a trainer worker and a teacher
actor killed (SIGKILL) at drawn steps, against a clean run of the same config.

Slow (minutes on 2 cores: a cluster start and two distill runs, one with a worker-group restart): skipped unless
pytest runs with ``--run-slow``. The job itself (``python jobs/chaos.py --kills 3 --every 4``) is the full check.
"""

from __future__ import annotations

import pytest

import chaos

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEED = 4  # kill_plan(2, 3, 4): trainer rank 1 after step 1 (before any checkpoint), a teacher actor after step 4


def test_killed_trainer_worker_and_teacher_actor_change_nothing(tmp_path):
    """Both kills are survived; the run trains the clean run's rows at every step on every rank (so every block
    exactly as often) and exports a bit-identical student. The trainer kill comes before the
    first checkpoint, so the restarted group starts over and redoes step 1."""
    import ray

    assert chaos.kill_plan(2, 3, SEED) == [{"step": 1, "victim": "trainer", "rank": 1},
                                           {"step": 4, "victim": "teacher", "rank": None}]
    shared_was_running = ray.is_initialized()
    if shared_was_running:
        ray.shutdown()  # a driver connects to one Ray: the session's is stopped for the cluster, then restarted
    try:
        results = chaos.run_chaos(tmp_path, kills=2, every=3, seed=SEED, checkpoint_every=2)
    finally:
        if shared_was_running:
            from conftest import start_shared_ray

            start_shared_ray()

    assert [(k["step"], k["victim"]) for k in results["kills_done"]] == [(1, "trainer"), (4, "teacher")], results
    assert results["completed"] and results["kills_survived"] == 2, results
    assert results["steps"] == list(range(1, 10)), results
    assert results["resumed_from_steps"] == [], results  # restarted before the first checkpoint: from the start
    assert results["steps_redone"] == 1, results
    assert results["same_rows_per_step_and_rank"] and results["steps_with_other_rows"] == [], results
    assert results["student"]["bit_identical"], results
    assert results["passed"], results
