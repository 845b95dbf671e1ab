"""Ctrl-C: an interrupted ``tailkd distill`` exits 130 with one line saying how to resume, and the relaunch's
metrics.jsonl holds one record per step (the interrupted attempt's redone steps are marked superseded)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailkd_ray.cli import interrupted_line
from tailkd_ray.train.checkpoint import CHECKPOINT_PREFIX, MANIFEST
from tailkd_ray.train.runlog import METRICS_FILE, SUPERSEDED, RunLog, read_records


def test_an_attempt_supersedes_the_records_it_redoes(tmp_path):
    first = RunLog(tmp_path, enabled=True)
    first.write("setup", {"step": 0, "setup_s": 1.0})
    for step in (1, 2, 3):
        first.write("step", {"step": step, "loss": float(step)})
    first.write("checkpoint", {"step": 2, "checkpoint_s": 0.1})
    first.close()
    second = RunLog(tmp_path, enabled=True)  # resumed from the step-2 checkpoint
    second.write("resume", {"step": 2, "resumed_from_step": 2})
    second.write("setup", {"step": 2, "setup_s": 1.0})
    second.write("step", {"step": 3, "loss": 30.0})
    second.close()

    assert [(r["step"], r["loss"]) for r in read_records(tmp_path, "step")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    raw = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in raw if r.get(SUPERSEDED)] == [("step", 3)]
    assert len(read_records(tmp_path, "setup")) == 2  # every attempt's setup is kept


def _step_records(out: Path) -> int:
    path = out / METRICS_FILE
    return sum('"kind": "step"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_sigint_exits_130_and_the_relaunch_has_one_record_per_step(ray_session, tiny_llama_dir, builtin_corpus,
                                                                   tmp_path):
    from tailkd_ray.config import load_config
    from tailkd_ray.pipelines.distill import distill

    _, val_dir = builtin_corpus
    corpus = tmp_path / "corpus.txt"  # ~150 blocks of 33 ids: seconds to tokenize
    corpus.write_text("".join(p.read_text() for p in sorted(val_dir.glob("*.txt")))[:20_000])
    out = tmp_path / "run"
    overrides = [f"teacher.model={tiny_llama_dir}", f"data.train={corpus}", "data.val_fraction=0.1",
                 "data.seq_len=32", "summary.top_m=16", "summary.tail_samples=2", "loss.k=8",
                 "student.config.num_hidden_layers=1", "train.strategy=ddp", "train.max_steps=12",
                 "train.batch_size=2", "train.checkpoint_every=2", "train.eval_every=100", f"output_dir={out}"]
    (tmp_path / "none.yaml").write_text("{}\n")
    argv = ["distill", "--config", str(tmp_path / "none.yaml"), *overrides]
    driver = subprocess.Popen([sys.executable, "-m", "tailkd_ray", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 400
        while _step_records(out) < 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == interrupted_line("distill")
    assert "same output_dir and train.run_name" in interrupted_line("distill")
    before = _step_records(out)
    # the newest finished checkpoint, registered with Ray or not (one written just before the interrupt may not be)
    finished = [int(m.parent.name[len(CHECKPOINT_PREFIX):]) for m in out.rglob(f"{CHECKPOINT_PREFIX}*/{MANIFEST}")]
    assert finished, "no checkpoint was finished before the interrupt"

    distill(load_config(None, overrides))  # the relaunch, on this process's Ray

    steps = [r["step"] for r in read_records(out, "step")]
    assert steps == list(range(1, 13)), steps
    raw = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    started = [r["step"] for r in raw if r["kind"] == "setup"][-1]
    redone = [r for r in raw if r["kind"] == "step" and r.get(SUPERSEDED)]
    assert started == max(finished)  # resumed from the newest finished checkpoint
    assert len(redone) == before - started  # the interrupted attempt's steps after the resumed one, marked
    # the relaunch (another Ray, the train blocks shuffled again) redid them on the same rows
    final = {r["step"]: r["rows_fingerprint"] for r in read_records(out, "step")}
    assert [r["rows_fingerprint"] for r in redone] == [final[r["step"]] for r in redone]
