"""`tailkd demo` end to end at a tiny size: table, report, plot and loadable students."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tailkd_ray.pipelines.demo import METRIC_COLUMNS, read_curve, results_table, run_demo
from tailkd_ray.train.runlog import read_records

TINY = ["corpus_bytes=150000", "vocab_size=300", "seq_len=32", "teacher_layers=1", "teacher_width=64",
        "teacher_steps=6", "student_layers=1", "student_width=32", "student_steps=4", "eval_every=2",
        "batch_size=4"]


@pytest.mark.ray
def test_demo_end_to_end_tiny(ray_session, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    # As a user runs it (its own Ray, whose workers' lines reach this output): every stage says what it does,
    # in under 100 lines
    run = subprocess.run([sys.executable, "-m", "tailkd_ray", "demo", "--out", str(out), *TINY],
                         capture_output=True, text=True, timeout=1200)
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed[-3000:]
    assert len(printed.splitlines()) < 100, printed
    for stage in ("built-in corpus in ", "tokenizing ", "ingest: ", "training teacher: 2 CPU worker(s) (ddp), 6 steps",
                  "train step 6/6  loss ", "eval step 6/6  val_loss ", "training tad: ", "train step 4/4  loss ",
                  "eval step 4/4  val_loss ", "kl_to_teacher ", "outputs: ", "| tad | ", "report: "):
        assert stage in printed, (stage, printed)
    # the corpus tokenized once for the four runs; a progress line and an eval line at each validation (every 2
    # steps: 3 for the teacher, 2 per student); Ray's notices that are not the user's business are gone
    assert printed.count("tokenizing ") == 2 and printed.count("ingest: ") == 1, printed
    assert printed.count("train step ") == printed.count("eval step ") == 3 + 3 * 2, printed
    for notice in ("Token authentication is enabled", "PreemptionWatcher", "Traceback"):
        assert notice not in printed, (notice, printed)
    results = {name: json.loads((out / "students" / name / "eval.json").read_text()) for name in ("clm", "kd", "tad")}
    for name in results:  # each student's last validation, printed
        assert f"eval step 4/4  val_loss {results[name]['val_loss']:.4f}" in printed
    for run in ("teacher", "students/clm", "students/kd", "students/tad"):  # the fixed costs, split (runlog)
        setup, = read_records(out / run, "setup")
        assert {"preflight_s", "ray_start_s", "ingest_s", "val_read_s", "worker_start_s", "student_build_s"} <= set(setup)
        assert ("summaries_s" in setup) == (run != "teacher"), setup
        assert all(setup[key] >= 0 for key in setup if key.endswith("_s")), setup
        assert all(r["eval_s"] > 0 for r in read_records(out / run, "eval"))
    for name, metrics in results.items():
        assert set(METRIC_COLUMNS) <= set(metrics), name
        assert metrics["val_loss"] > 0 and metrics["tokens"] > 0
        curve = read_curve(out / "students" / name)
        assert [step for step, _ in curve][-1] == 4 and len(curve) >= 2
        student = out / "students" / name / "student"
        model = AutoModelForCausalLM.from_pretrained(student)
        tokenizer = AutoTokenizer.from_pretrained(student)
        ids = torch.tensor([tokenizer("def ")["input_ids"]])
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    report = (out / "report.md").read_text()
    assert results_table(results) in report
    assert (out / "curves.png").stat().st_size > 1000
    # a rerun reuses the finished teacher and students; other settings in the same OUT are refused
    teacher_weights = out / "teacher" / "student" / "model.safetensors"
    stamp = teacher_weights.stat().st_mtime
    again = run_demo(str(out), TINY)
    assert teacher_weights.stat().st_mtime == stamp
    assert {name: m["val_loss"] for name, m in again.items()} == {name: m["val_loss"] for name, m in results.items()}
    from tailkd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="student_steps differ"):
        run_demo(str(out), TINY[:-3] + ["student_steps=5", "eval_every=2", "batch_size=4"])


def test_demo_settings_validation():
    from tailkd_ray.config import ConfigError
    from tailkd_ray.pipelines.demo import demo_settings

    with pytest.raises(ConfigError, match="unknown key nope"):
        demo_settings(["nope=1"])
    with pytest.raises(ConfigError, match="student_steps must be int"):
        demo_settings(["student_steps=many"])
