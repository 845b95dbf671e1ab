"""Multi-node on one machine (``ray.cluster_utils.Cluster``): placement, node loss, teacher pool autoscaling.

The cluster mirrors ``cluster/*.yaml``: a head with no CPUs for work, one inference node offering
``tailkd_inference: 2`` and training nodes offering ``tailkd_training: 1`` each, all with CPUs (so a
request without the custom resources could land anywhere but the head). Where things ran is recorded by
the things themselves: a ``TeacherScorer`` subclass writes its node id when an actor starts, and a
``step_hook`` writes (step, rank, node, pid) after every optimizer step of every trainer worker.

A driver connects to one Ray instance only, so the session's shared Ray (``ray_session``) is stopped while
this module runs and restarted afterwards (as in test_placement.py).

Slow: ~3 min on 2 cores (cluster start, one scoring run, one distill run with a node loss).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ray import cloudpickle

from tailkd_ray.config import from_dict
from tailkd_ray.teacher.pool import TeacherScorer
from tailkd_ray.train import runlog

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # recorders travel to actors and workers by value

SEQ_LEN = 32
CHECKPOINT_EVERY = 2
KILL_AFTER_STEP = 3  # one step past the step-2 checkpoint: exactly one step is trained twice


# ---- recorders ----------------------------------------------------------------------------------------------
def _append_record(path: str, record: dict) -> None:
    """One JSON line, written with a single O_APPEND write (records from several processes do not interleave)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class RecordingScorer(TeacherScorer):
    """The real teacher scorer, plus: each actor records its node id and pid when it starts, and sleeps
    ``delay_s`` per batch (a slow teacher, to load the pool). ``record_path``/``delay_s`` are set per test by
    ``recording_scorer`` (the constructor arguments are the config's, passed by ``score_dataset``)."""

    record_path = ""
    delay_s = 0.0

    def __init__(self, **kwargs):
        import ray

        super().__init__(**kwargs)
        _append_record(self.record_path, {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()})

    def __call__(self, batch):
        time.sleep(self.delay_s)
        return super().__call__(batch)


def recording_scorer(record_path: Path, delay_s: float = 0.0) -> type:
    return type("RecordingScorer", (RecordingScorer,), {"record_path": str(record_path), "delay_s": delay_s})


class StepRecorder:
    """``step_hook``: records (step, rank, node, pid) per worker step. With ``stall_at`` = (step, rank), that
    worker, on the run's first attempt, records ``stalled`` and then waits (bounded) for its node to be
    removed, so the test kills it at a known step instead of racing the training loop."""

    def __init__(self, path: Path, stall_at: tuple[int, int] | None = None, stall_s: float = 180.0):
        self.path, self.stall_at, self.stall_s = str(path), stall_at, stall_s

    def __call__(self, step: int, rank: int) -> None:
        import ray

        record = {"step": step, "rank": rank, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        _append_record(self.path, record)
        first_attempt = not any(r.get("stalled") for r in read_records(Path(self.path)))
        if (step, rank) == self.stall_at and first_attempt:
            _append_record(self.path, {**record, "stalled": True})
            time.sleep(self.stall_s)  # killed with its node long before this ends; if not, the test fails


# ---- the cluster ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """Head {CPU: 0}, inference node {CPU: 3, tailkd_inference: 2}, two training nodes {CPU: 2,
    tailkd_training: 1}; the driver is connected. Tests may add nodes (the node-loss test adds a spare)."""
    import ray
    from ray.cluster_utils import Cluster

    shared_was_running = ray.is_initialized()
    if shared_was_running:
        ray.shutdown()
    local = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        inference = local.add_node(num_cpus=3, resources={"tailkd_inference": 2})
        training = [local.add_node(num_cpus=2, resources={"tailkd_training": 1}) for _ in range(2)]
        ray.init(address=local.address, log_to_driver=False)
        local.wait_for_nodes()
        yield SimpleNamespace(cluster=local, head=local.head_node.node_id, inference=inference.node_id,
                              training=training)
    finally:
        ray.shutdown()
        local.shutdown()
        if shared_was_running:
            from conftest import start_shared_ray

            start_shared_ray()


def make_cfg(out: Path, teacher_dir, corpus_dir, teacher: dict | None = None, **train):
    """Streamed summaries (no cache, no val split: train only), teacher actors on inference nodes, 2 DDP
    workers on training nodes."""
    return from_dict({
        "output_dir": str(out),
        "teacher": {"model": str(teacher_dir), "batch_size": 4, "min_actors": 1, "max_actors": 1,
                    "resources": {"tailkd_inference": 1}, **(teacher or {})},
        "student": {"config": {"num_hidden_layers": 1}, "init": "random"},
        "data": {"train": None if corpus_dir is None else str(corpus_dir), "val": None, "val_fraction": 0.0,
                 "seq_len": SEQ_LEN, "tokenizer_actors": 1},
        "summary": {"top_m": 16, "tail_samples": 2},
        "loss": {"kind": "tad", "k": 5, "beta": 1.0},
        "train": {"num_workers": 2, "strategy": "ddp", "batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                  "checkpoint_every": CHECKPOINT_EVERY, "eval_every": 100, "seed": 0, "run_name": "multinode",
                  "resources_per_worker": {"tailkd_training": 1}, **train},
    })


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in runlog.read_records(out, "step")]


# ---- tests ---------------------------------------------------------------------------------------------------
def test_teacher_pool_grows_from_its_minimum_under_load(cluster, tiny_llama_dir, tmp_path, monkeypatch):
    """min_actors 1, max_actors 2, a slow teacher and a backlog of batches: Ray Data adds the second actor,
    on the inference node (the only one offering tailkd_inference)."""
    import ray

    from tailkd_ray.teacher import pool

    records = tmp_path / "scorers.jsonl"
    monkeypatch.setattr(pool, "TeacherScorer", recording_scorer(records, delay_s=1.0))
    cfg = make_cfg(tmp_path, tiny_llama_dir, corpus_dir=None, teacher={"min_actors": 1, "max_actors": 2,
                                                                        "batch_size": 1})
    ids = np.random.default_rng(0).integers(0, 320, size=(24, SEQ_LEN + 1), dtype=np.int32)
    blocks = ray.data.from_items([{"input_ids": row} for row in ids], override_num_blocks=24)
    scored = pool.score_dataset(blocks, cfg).take_all()

    assert sorted(tuple(r["input_ids"]) for r in scored) == sorted(tuple(row) for row in ids)  # each block once
    scorers = read_records(records)
    assert len({s["pid"] for s in scorers}) == 2, scorers
    assert {s["node"] for s in scorers} == {cluster.inference}


def test_trainer_that_the_cluster_cannot_host_fails_fast(cluster, tiny_llama_dir, tmp_path):
    """3 workers that each need a training node, 2 training nodes: a PlacementError before any work, not a
    run that waits forever for resources."""
    import ray

    from tailkd_ray.placement import PlacementError
    from tailkd_ray.train.loop import run_training

    cfg = make_cfg(tmp_path, tiny_llama_dir, corpus_dir=None, num_workers=3)
    rows = ray.data.from_items([{"input_ids": np.zeros(SEQ_LEN + 1, np.int32)}])
    with pytest.raises(PlacementError, match=r"3 trainer workers need \{CPU: 1, tailkd_training: 1\} each, but "
                                             r"the alive nodes can host only 2"):
        run_training(cfg, rows, teacher_mode="summary")  # fails before it would look at the rows
    assert not (tmp_path / "ray_train").exists()


def test_placement_and_training_node_loss(cluster, tiny_llama_dir, builtin_corpus, tmp_path, monkeypatch):
    """One streamed distill run (teacher pool -> 2 DDP workers, checkpoints every 2 steps, max_failures 2):

    - teacher actors run only on the inference node, trainer workers only on training nodes, one per node;
    - after step 3, rank 1's training node is removed. A spare training node was added before the run, so the
      worker group restarts (FailureConfig) on the surviving node and the spare and resumes from the step-2
      checkpoint: only step 3 is trained twice (less than one checkpoint interval), and the run completes.
    """
    from tailkd_ray.pipelines.distill import distill
    from tailkd_ray.teacher import pool

    _, corpus = builtin_corpus
    spare = cluster.cluster.add_node(num_cpus=2, resources={"tailkd_training": 1})
    cluster.cluster.wait_for_nodes()
    training = {node.node_id: node for node in [*cluster.training, spare]}
    scorers, steps = tmp_path / "scorers.jsonl", tmp_path / "steps.jsonl"
    monkeypatch.setattr(pool, "TeacherScorer", recording_scorer(scorers))
    removed: list[str] = []
    stop = threading.Event()

    def remove_stalled_worker_node() -> None:
        while not stop.is_set():
            stalled = [r for r in read_records(steps) if r.get("stalled")]
            if stalled:
                removed.append(stalled[0]["node"])
                cluster.cluster.remove_node(training[stalled[0]["node"]])
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=remove_stalled_worker_node, daemon=True)
    watcher.start()
    out = tmp_path / "run"
    try:
        distill(make_cfg(out, tiny_llama_dir, corpus, max_steps=5, max_failures=2),
                step_hook=StepRecorder(steps, stall_at=(KILL_AFTER_STEP, 1)))
    finally:
        stop.set()
        watcher.join(timeout=30)

    # placement
    assert {s["node"] for s in read_records(scorers)} == {cluster.inference}
    workers = read_records(steps)
    first = [r for r in workers if r["pid"] in {w["pid"] for w in workers if w["step"] == 1}]
    after = [r for r in workers if r not in first]  # a restarted worker starts at the resumed step
    first_nodes = {r["rank"]: r["node"] for r in first}
    assert set(first_nodes) == {0, 1} and len(set(first_nodes.values())) == 2, first
    assert set(first_nodes.values()) <= set(training), (first, training)  # never the head or the inference node

    # node loss
    assert removed == [first_nodes[1]], (removed, first)
    log = runlog.read_records(out)
    assert [r["resumed_from_step"] for r in runlog.read_records(out, "resume")] == [CHECKPOINT_EVERY], log
    assert train_steps(out) == [1, 2, 3, 4, 5], log  # one record per step
    every = [json.loads(line) for line in (out / runlog.METRICS_FILE).read_text().splitlines()]
    # step 3 redone (less than one checkpoint interval): the first attempt's record is kept, marked superseded
    assert [(r["step"], r.get(runlog.SUPERSEDED, False)) for r in every if r["kind"] == "step"] == [
        (1, False), (2, False), (3, True), (3, False), (4, False), (5, False)], log
    assert json.loads((out / "eval.json").read_text())["step"] == 5
    assert (out / "student" / "config.json").is_file()
    after_nodes = {r["rank"]: r["node"] for r in after}
    assert {r["step"] for r in after} == {3, 4, 5} and set(after_nodes) == {0, 1}, workers
    assert set(after_nodes.values()) == set(training) - set(removed), (after, removed, training)
