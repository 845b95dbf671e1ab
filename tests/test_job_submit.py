"""A real ``ray job submit`` of ``jobs/distill.py`` to a local head started with ``ray start --head``.

The head is private to this test: its own ``--temp-dir``, free ports for every listener (the dashboard
agent's default port 52365 is taken by any other local Ray on the machine, and a head whose agent cannot
bind never accepts jobs), 127.0.0.1 only, token authentication on (DESIGN §5). ``ray stop`` would stop
every Ray process of the user, other test sessions included, so teardown kills exactly the process tree
that ``ray start --block`` spawned (plus anything still naming the private temp dir) and checks that the
session's shared Ray still answers.

Slow: ~1-2 min (head start ~15 s, tokenize + teacher pool + 5 DDP steps on 2 workers, export).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, closing
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")  # the CLI of the interpreter running the tests
SMOKE_STEPS = 5  # train.max_steps of jobs/configs/smoke.yaml
EVAL_KEYS = {"val_loss", "val_ppl", "kl_to_teacher", "top1_agreement", "full_ece", "tail_mass_student",
             "tail_mass_teacher", "tokens"}
JOB_TIMEOUT_S = 240
HEAD_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
              "ray-client-server-port")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (all held open together, then released)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def ray_cli_env() -> dict:
    """The environment of every ``ray`` command here: loopback only, token auth (DESIGN §5 pitfalls)."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0"}


class LocalHead:
    """``ray start --head --block`` in its own session; ``stop`` kills only the processes it started."""

    def __init__(self, temp_dir: str, num_cpus: int = 8):
        self.temp_dir = temp_dir
        self.ports = dict(zip(HEAD_PORTS, free_ports(len(HEAD_PORTS))))
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.log_path = Path(temp_dir) / "ray_start.log"
        command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                   "--include-dashboard=true", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
                   "--disable-usage-stats", *(f"--{name}={port}" for name, port in self.ports.items())]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ray_cli_env(),
                                            start_new_session=True)

    def processes(self) -> set[psutil.Process]:
        """The ``ray start`` process, all its descendants (GCS, raylet, dashboard, workers, the job's driver)
        and any process whose command line names the private temp dir (one reparented to init)."""
        found: set[psutil.Process] = set()
        try:
            root = psutil.Process(self.process.pid)
            found |= {root, *root.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if self.temp_dir in " ".join(proc.info["cmdline"] or []):
                    found |= {proc, *proc.children(recursive=True)}
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self, grace_s: float = 5.0) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs), timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.process.wait(timeout=5)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else "(no ray start log)"


def ray_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env=ray_cli_env())


def submit(head: LocalHead, submission_id: str, entrypoint: list[str], ready_timeout_s: float = 90.0) -> None:
    """``ray job submit --no-wait``, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if head.process.poll() is not None:
            pytest.fail(f"ray start exited with {head.process.returncode}:\n{head.log_tail()}")
        result = ray_cli("job", "submit", "--address", head.address, "--working-dir", str(REPO),
                         "--submission-id", submission_id, "--no-wait", "--", *entrypoint, timeout=120)
        if result.returncode == 0:
            return
        transient = any(text in result.stderr + result.stdout for text in (
            "No available agent", "Connection refused", "Failed to connect", "Cannot connect", "503"))
        if not transient or time.monotonic() > deadline:
            pytest.fail(f"ray job submit failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                        f"{result.stderr[-3000:]}\nray start log:\n{head.log_tail()}")
        time.sleep(3)


def job_status(head: LocalHead, submission_id: str) -> str:
    """The job's ``JobStatus`` value, asked with the job SDK (the CLI prints it only as prose)."""
    ask = ("import sys; from ray.job_submission import JobSubmissionClient; "
           "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    result = subprocess.run([sys.executable, "-c", ask, head.address, submission_id], check=False,
                            capture_output=True, text=True, timeout=60, env=ray_cli_env())
    return result.stdout.strip() if result.returncode == 0 else f"unknown ({result.stderr[-2000:]})"


def wait_for_job(head: LocalHead, submission_id: str, timeout_s: float) -> tuple[str, str]:
    """(final status, job logs): follows the logs until the job ends, then asks its status."""
    try:
        logs = ray_cli("job", "logs", "--address", head.address, "--follow", submission_id, timeout=timeout_s)
        output = logs.stdout + logs.stderr
    except subprocess.TimeoutExpired as timeout:
        ray_cli("job", "stop", "--address", head.address, "--no-wait", submission_id, timeout=60)
        output = f"(timed out after {timeout_s} s)\n{timeout.stdout or ''}"
    return job_status(head, submission_id), output


@pytest.fixture
def local_head(ray_session):
    """A private head; on exit its processes are gone and the session's shared Ray is still alive."""
    temp_dir = tempfile.mkdtemp(prefix="tkdray", dir="/tmp")  # short: Unix socket paths are capped at 107 bytes
    head = LocalHead(temp_dir)
    try:
        yield head
    finally:
        head.stop()
    assert not head.processes(), f"processes of the test's head survived: {head.processes()}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    ray = ray_session
    assert ray.get(ray.remote(lambda: "alive").remote(), timeout=60) == "alive"  # another Ray was not stopped


def test_ray_job_submit_distill_smoke_succeeds(local_head, tiny_llama_dir, builtin_corpus, tmp_path):
    _, val_dir = builtin_corpus
    out = tmp_path / "smoke"
    submission_id = f"tailkd-smoke-{uuid.uuid4().hex[:8]}"
    entrypoint = [sys.executable, "jobs/distill.py", "--config", "jobs/configs/smoke.yaml",
                  f"teacher.model={tiny_llama_dir}", f"data.train={val_dir}", f"data.val={val_dir}",
                  f"data.tokenizer={tiny_llama_dir}", "data.tokenizer_actors=1",
                  "student.config={num_hidden_layers: 1}", f"output_dir={out}"]
    submit(local_head, submission_id, entrypoint)
    status, logs = wait_for_job(local_head, submission_id, JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", f"job {submission_id} ended {status}; its logs:\n{logs[-12000:]}"

    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(out / "student"))
    assert student.config.num_hidden_layers == 1 and student.config.vocab_size == 320
    evaluation = json.loads((out / "eval.json").read_text())
    assert EVAL_KEYS <= set(evaluation), sorted(evaluation)
    assert evaluation["step"] == SMOKE_STEPS and evaluation["tokens"] > 0
    assert 0 < evaluation["val_loss"] < 10 and evaluation["kl_source"] == "summary"
    assert math.isfinite(evaluation["kl_to_teacher"])  # estimated from top-32 + 4 tail samples: may be ~0 or < 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, SMOKE_STEPS + 1))
    # the entrypoint printed the eval metrics (cli.main) and ran from the uploaded working dir
    assert '"val_loss"' in logs
