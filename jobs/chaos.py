"""Chaos check: a streamed distill on a simulated multi-node cluster survives killed workers, exactly.

    python jobs/chaos.py --kills 3 --every 4 --seed 0 --out runs/chaos [--json jobs/results/<date>-cpu/chaos.json]

One ``ray.cluster_utils.Cluster`` on this machine, shaped like ``cluster/*.yaml``: a head with no CPUs for work,
an inference node (``tailkd_inference``) for the teacher pool and two training nodes (``tailkd_training``) for 2
DDP workers. The same streamed distill (teacher pool scoring on the fly, ``summary.cache_dir: null``; tiny random
Llama teacher, the built-in corpus) runs twice on it:

- clean: uninterrupted;
- chaos: in each window of ``--every`` steps, after a step drawn by ``--seed``, one victim drawn by ``--seed`` (a
  trainer worker of a drawn rank, or a teacher actor) is killed with SIGKILL, as a crashed process or lost
  machine would end. Every rank waits in a ``step_hook`` after that step until the kill is done, so a victim
  dies at a known step, not wherever the race left it. A killed trainer worker fails the worker group; Ray Train
  restarts it (``train.max_failures``) from the latest checkpoint. A killed teacher actor is restarted by Ray Data,
  which retries its batches.

Then it checks that the chaos run completed, that every block was trained exactly as often as in the clean run
(each step record's ``rows_fingerprint``, per rank; superseded records, the steps redone, left out): the same rows
at the same steps on the same ranks, and that the final student equals the clean one: bit for bit is
expected, since a resume restores model, optimizer, schedule and RNG states exactly and two workers of DDP on gloo
sum gradients in a fixed order; the JSON reports the largest difference in any case. It reports the kills
survived, the steps redone and both wall times, and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: the package beside jobs/

from tailkd_ray.config import Config, from_dict  # noqa: E402
from tailkd_ray.runtime import configure_logging, free_local_port, is_quiet, ray_env  # noqa: E402
from tailkd_ray.train import runlog  # noqa: E402

log = logging.getLogger("chaos")

NUM_WORKERS = 2
SEQ_LEN = 32
VOCAB = 320
CORPUS_BYTES = 60_000  # ~1,400 blocks: no run here finishes an epoch
DOCUMENT_BYTES = 100  # ~1 block per document, 64 documents per Ray Data block
DATA_BUDGET_BYTES = 2**20
TEACHER_ACTORS = 2  # batches finish out of order: the streaming split must still be deterministic
TEACHER_CLASS = "TeacherScorer"  # the teacher pool's actors: Ray Data's class MapWorker(MapBatches(TeacherScorer))


# ---- the kill plan ------------------------------------------------------------------------------------------
def kill_plan(kills: int, every: int, seed: int, num_workers: int = NUM_WORKERS) -> list[dict]:
    """The ``kills`` kills: the i-th after a step drawn from window i of ``every`` steps, ((i-1)·every, i·every],
    its victim one of the trainer workers or a teacher actor (even odds for each of them), all from ``seed``."""
    rng = random.Random(seed)
    victims = [{"victim": "trainer", "rank": rank} for rank in range(num_workers)] + [{"victim": "teacher", "rank": None}]
    return [{"step": window * every + 1 + rng.randrange(every), **rng.choice(victims)} for window in range(kills)]


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:  # one O_APPEND write per record: lines of several processes do not interleave
        f.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class KillPoint:
    """``step_hook``: after a planned kill step, on its first pass only (a resumed attempt redoes steps), every
    rank records that it waits (with its pid) and waits until the driver has done the kill (bounded); a killed
    trainer worker dies waiting."""

    def __init__(self, path: Path, steps: list[int], wait_s: float = 300.0):
        self.path, self.steps, self.wait_s = path, set(steps), wait_s

    def __call__(self, step: int, rank: int) -> None:
        if step not in self.steps or any(r.get("killed") == step for r in _records(self.path)):
            return
        _append(self.path, {"waiting": step, "rank": rank, "pid": os.getpid()})
        deadline = time.monotonic() + self.wait_s
        while not any(r.get("killed") == step for r in _records(self.path)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"chaos: the driver did not kill its victim after step {step}")
            time.sleep(0.1)


class Killer(threading.Thread):
    """The driver side of ``KillPoint``: when every rank waits after a planned step, kill that step's victim
    (SIGKILL to its pid: a trainer worker's from its record, a teacher actor's from the state API) and record it."""

    def __init__(self, path: Path, plan: list[dict], num_workers: int = NUM_WORKERS):
        super().__init__(daemon=True)
        self.path, self.plan, self.num_workers = path, plan, num_workers
        self.done: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for kill in self.plan:
            waiting = []
            while len(waiting) < self.num_workers:
                if self.stop.wait(0.1):
                    return
                waiting = [r for r in _records(self.path) if r.get("waiting") == kill["step"]]
            victim = f"trainer rank {kill['rank']}" if kill["victim"] == "trainer" else "teacher actor"
            try:
                pid = (next(r["pid"] for r in waiting if r["rank"] == kill["rank"]) if kill["victim"] == "trainer"
                       else _teacher_actor_pid())
                os.kill(pid, signal.SIGKILL)
            except Exception as error:  # reported as a kill not done; the ranks go on
                log.error("could not kill the %s after step %d: %s", victim, kill["step"], error)
                _append(self.path, {"killed": kill["step"], "error": str(error)})
                continue
            self.done.append({**kill, "pid": pid})
            log.info("killed the %s (pid %d) after step %d", victim, pid, kill["step"])
            _append(self.path, {"killed": kill["step"], "pid": pid})


def _teacher_actor_pid() -> int:
    """The pid of a live teacher-pool actor (the state API lists actors of every node of the cluster)."""
    from ray.util.state import list_actors

    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    actors = [a for a in alive if TEACHER_CLASS in a.class_name]
    if not actors:
        raise RuntimeError(f"no live {TEACHER_CLASS} actor to kill (alive: {sorted({a.class_name for a in alive})})")
    return min(actors, key=lambda a: a.actor_id).pid


# ---- the cluster and the run --------------------------------------------------------------------------------
@contextmanager
def simulated_cluster() -> Iterator[None]:
    """Head {CPU: 0} with its dashboard (the state API), an inference node {CPU: 3, tailkd_inference: 2}, two
    training nodes {CPU: 2, tailkd_training: 1}; this process connected as the driver."""
    os.environ.update(ray_env(is_quiet()))  # before Ray is imported, and inherited by every node's processes
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the step hook travels to the workers by value
    port = free_local_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1", "dashboard_port": port})
    try:
        cluster.add_node(num_cpus=3, resources={"tailkd_inference": 2})
        for _ in range(NUM_WORKERS):
            cluster.add_node(num_cpus=2, resources={"tailkd_training": 1})
        # Train's placement-group cleaner asks this cluster's dashboard, never another Ray's (runtime.py)
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
        cluster.wait_for_nodes()
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


def tiny_teacher(work: Path) -> tuple[Path, Path]:
    """(teacher dir, corpus dir): a 2-layer, 64-wide random Llama with a BPE tokenizer trained on a ~300 KB slice
    of the built-in corpus (as the tests' fixtures); the corpus is its first ``CORPUS_BYTES``, cut into documents
    (files) of about ``DOCUMENT_BYTES`` at line ends. Ray Data tokenizes 64 files per block, and the teacher pool
    scores block by block: small files make many small blocks, which the pool scores as training consumes them."""
    from tailkd_ray.data.corpus import train_bpe_tokenizer, write_builtin_corpus
    from tailkd_ray.models import llama_config, save_random_model

    slice_dir, _ = write_builtin_corpus(work / "builtin", max_bytes=300_000)
    files = sorted(slice_dir.glob("*.txt"))
    tokenizer = train_bpe_tokenizer(files, VOCAB, work / "tokenizer")
    corpus, size, document = work / "corpus", 0, ""
    corpus.mkdir(exist_ok=True)
    for line in (line for path in files for line in path.read_text().splitlines(keepends=True)):
        document += line
        if len(document) >= DOCUMENT_BYTES:
            (corpus / f"{size:08d}.txt").write_text(document)
            size, document = size + len(document), ""
        if size >= CORPUS_BYTES:
            break
    config = llama_config(vocab=VOCAB, layers=2, width=64, heads=4, kv_heads=2, intermediate=128, max_positions=256)
    return save_random_model(config, work / "teacher", seed=0, tokenizer=tokenizer), corpus


@contextmanager
def throttled_data() -> Iterator[None]:
    """Ray Data's object-store budget capped at ``DATA_BUDGET_BYTES`` for the runs inside (Ray Train takes the
    driver's limits for its streams): the teacher pool then pauses while the trainers hold enough summaries, as on a
    corpus far larger than the object store, instead of scoring this small one ahead and exiting, so a teacher actor
    is alive whenever one is to be killed."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before = options.resource_limits
    options.resource_limits = before.copy(object_store_memory=DATA_BUDGET_BYTES)
    try:
        yield
    finally:
        options.resource_limits = before


def chaos_config(out: Path, teacher: Path, corpus: Path, *, max_steps: int, checkpoint_every: int,
                 max_failures: int) -> Config:
    """A streamed distill: two teacher actors on the inference node, 2 DDP workers on the training nodes."""
    return from_dict({
        "output_dir": str(out),
        "teacher": {"model": str(teacher), "batch_size": 4, "min_actors": TEACHER_ACTORS,
                    "max_actors": TEACHER_ACTORS, "resources": {"tailkd_inference": 1}},
        "student": {"config": {"num_hidden_layers": 1}, "init": "random"},
        "data": {"train": str(corpus), "val": None, "val_fraction": 0.0, "seq_len": SEQ_LEN, "tokenizer_actors": 1},
        "summary": {"top_m": 16, "tail_samples": 2},
        "loss": {"kind": "tad", "k": 5, "beta": 1.0},
        "train": {"num_workers": NUM_WORKERS, "strategy": "ddp", "batch_size": 2, "lr": 1e-3, "warmup_steps": 1,
                  "max_steps": max_steps, "checkpoint_every": checkpoint_every, "eval_every": max_steps,
                  "max_failures": max_failures, "seed": 0, "run_name": "chaos", "loggers": [],
                  "resources_per_worker": {"tailkd_training": 1}},
    })


def timed_distill(cfg: Config, step_hook=None) -> float:
    from tailkd_ray.pipelines.distill import distill

    started = time.perf_counter()
    distill(cfg, step_hook=step_hook)
    return time.perf_counter() - started


# ---- the checks ---------------------------------------------------------------------------------------------
def trained_rows(out: Path) -> dict[int, list[str]]:
    """Per step (superseded records left out): each rank's fingerprint of the rows it trained on."""
    return {r["step"]: r["rows_fingerprint"] for r in runlog.read_records(out, "step")}


def student_difference(clean: Path, chaos: Path) -> dict:
    """Largest absolute difference over the two exported students' tensors, and whether they are bit-identical."""
    from safetensors.torch import load_file

    def tensors(run: Path) -> dict:
        files = sorted((run / runlog.STUDENT_DIR).glob("*.safetensors"))
        return {name: t for f in files for name, t in load_file(f).items()}

    a, b = tensors(clean), tensors(chaos)
    if a.keys() != b.keys():
        return {"same_tensors": False, "bit_identical": False, "max_abs_diff": None}
    diffs = [float((a[n].double() - b[n].double()).abs().max()) for n in a]
    return {"same_tensors": True, "bit_identical": all(a[n].equal(b[n]) for n in a), "max_abs_diff": max(diffs)}


def compare(clean: Path, chaos: Path) -> dict:
    """The chaos run against the clean one. Every step's rows on every rank equal (``rows_fingerprint``) over the
    same steps means every block was trained as often as in the clean run, at the same step, on the same rank."""
    clean_rows, chaos_rows = trained_rows(clean), trained_rows(chaos)
    every = [json.loads(line) for line in (chaos / runlog.METRICS_FILE).read_text().splitlines()]
    return {
        "completed": runlog.run_complete(chaos),
        "steps": sorted(chaos_rows),
        "steps_redone": sum(1 for r in every if r["kind"] == "step" and r.get(runlog.SUPERSEDED)),
        "resumed_from_steps": [r["resumed_from_step"] for r in runlog.read_records(chaos, "resume")],
        "steps_with_other_rows": sorted(step for step in clean_rows.keys() | chaos_rows.keys()
                                        if clean_rows.get(step) != chaos_rows.get(step)),
        "same_rows_per_step_and_rank": clean_rows == chaos_rows,
        "student": student_difference(clean, chaos),
    }


def passed(checks: dict, kills_done: int, kills_planned: int) -> bool:
    return (checks["completed"] and kills_done == kills_planned and checks["same_rows_per_step_and_rank"]
            and checks["student"]["bit_identical"])


# ---- the job ------------------------------------------------------------------------------------------------
def run_chaos(out: Path, *, kills: int, every: int, seed: int, checkpoint_every: int,
              max_steps: Optional[int] = None) -> dict:
    """Clean run, chaos run, checks; returns the results (also written to ``out/chaos.json``)."""
    plan = kill_plan(kills, every, seed)
    max_steps = max_steps or kills * every + every  # one more window after the last kill
    out.mkdir(parents=True, exist_ok=True)
    teacher, corpus = tiny_teacher(out / "inputs")
    config = dict(teacher=teacher, corpus=corpus, max_steps=max_steps, checkpoint_every=checkpoint_every,
                  max_failures=kills)
    kill_log = out / "kills.jsonl"
    kill_log.unlink(missing_ok=True)
    with simulated_cluster(), throttled_data():
        clean_s = timed_distill(chaos_config(out / "clean", **config))
        killer = Killer(kill_log, plan)
        killer.start()
        try:
            chaos_s = timed_distill(chaos_config(out / "chaos", **config),
                                    step_hook=KillPoint(kill_log, [k["step"] for k in plan]))
        finally:
            killer.stop.set()
            killer.join(timeout=30)
    checks = compare(out / "clean", out / "chaos")
    results = {
        "command": f"python jobs/chaos.py --kills {kills} --every {every} --seed {seed} "
                   f"--checkpoint-every {checkpoint_every}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "setup": {"nodes": "head {CPU: 0}, inference {CPU: 3, tailkd_inference: 2}, 2 x training {CPU: 2, "
                           "tailkd_training: 1}", "strategy": "ddp", "num_workers": NUM_WORKERS,
                  "max_steps": max_steps, "checkpoint_every": checkpoint_every, "batch_size": 2, "seq_len": SEQ_LEN,
                  "teacher": f"streamed, {TEACHER_ACTORS} actors", "data_budget_bytes": DATA_BUDGET_BYTES},
        "plan": plan,
        "kills_done": killer.done,
        "kills_survived": len(killer.done) if checks["completed"] else 0,
        "wall_s": {"clean": round(clean_s, 1), "chaos": round(chaos_s, 1)},
        **checks,
    }
    results["passed"] = passed(checks, len(killer.done), len(plan))
    (out / "chaos.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="workers or teacher actors killed (default 3)")
    parser.add_argument("--every", type=int, default=4, help="steps per kill window (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill steps and victims (default 0)")
    parser.add_argument("--checkpoint-every", type=int, default=3, help="train.checkpoint_every (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.every < 1 or args.checkpoint_every < 1:
        parser.error("--kills, --every and --checkpoint-every must be >= 1")
    configure_logging("info")
    with tempfile.TemporaryDirectory() if args.out is None else nullcontext(args.out) as work:
        results = run_chaos(Path(work), kills=args.kills, every=args.every, seed=args.seed,
                            checkpoint_every=args.checkpoint_every)
    text = json.dumps(results, indent=2) + "\n"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text, end="")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
