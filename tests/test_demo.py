"""`tailkd demo` end to end at a tiny size: table, report, plot and loadable students."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest

from tailkd_ray.pipelines.demo import METRIC_COLUMNS, TASK_COLUMNS, read_curve, results_table, run_demo
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
    for notice in ("Token authentication is enabled", "PreemptionWatcher", "Setting accelerator", "Traceback"):
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


@pytest.mark.ray
def test_demo_math_end_to_end_tiny(ray_session, tmp_path):
    """``--task math`` at a tiny size: the report's table holds the three students with finite numbers, exact match
    in [0, 1], and the teacher's reference line."""
    import math

    from tailkd_ray.config import ConfigError

    out = tmp_path / "math"
    results = run_demo(str(out), ["task=math", "problems=200", "val_problems=12", "max_new_tokens=12",
                                  *[s for s in TINY if not s.startswith("corpus_bytes")]])
    assert set(results) == {"clm", "kd", "tad"}
    report = (out / "report.md").read_text()
    assert "Arithmetic word problems (200 train, 12 val" in report and results_table(results) in report
    header, _, *rows = results_table(results).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["student", *METRIC_COLUMNS, *TASK_COLUMNS]
    assert [row.split("|")[1].strip() for row in rows] == ["clm", "kd", "tad"]
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        for column in ("val_loss", "kl_to_teacher", "top1_agreement", *TASK_COLUMNS):
            assert math.isfinite(float(cells[column])), (column, row)
        assert 0 <= float(cells["exact_match"]) <= 1 and 0 <= float(cells["rouge_l"]) <= 1
    assert re.search(r"Teacher \(the reference line\): exact match [0-9.e-]+, ROUGE-L [0-9.e-]+", report)
    # the students' generations went beside them (12 prompts each), the teacher's decoded once for all three
    for name in results:
        assert len((out / "students" / name / "student_generations.jsonl").read_text().splitlines()) == 12
    assert (out / "teacher_generations.json").is_file()
    assert (out / "curves.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match=r"\btask\b.* differ"):  # a math OUT is not reused for the pretrain demo
        run_demo(str(out), TINY)


def test_math_problems_are_seeded_disjoint_and_answered(tmp_path):
    """The same seed writes the same files, another seed other problems; no val prompt is in train; every completion
    is its worked arithmetic and ends in `#### N`, which the default answer regex reads."""
    from tailkd_ray.config import GenerationConfig
    from tailkd_ray.data.math_problems import write_math_problems

    train, val = write_math_problems(tmp_path / "a", train=300, val=40, seed=3)
    again = write_math_problems(tmp_path / "b", train=300, val=40, seed=3)
    other = write_math_problems(tmp_path / "c", train=300, val=40, seed=4)
    assert [f.read_text() for f in (train, val)] == [f.read_text() for f in again]
    assert train.read_text() != other[0].read_text()
    records = {part: [json.loads(line) for line in path.read_text().splitlines()] for part, path in
               (("train", train), ("val", val))}
    assert len(records["train"]) == 300 and len(records["val"]) == 40
    assert not {r["prompt"] for r in records["val"]} & {r["prompt"] for r in records["train"]}
    answer = re.compile(GenerationConfig().answer_regex)
    for record in records["train"] + records["val"]:
        assert record["prompt"].endswith("\nAnswer:")
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", record["completion"])
        assert steps, record
        for a, op, b, result in steps:  # every worked step is right
            assert eval(f"{a} {op} {b}") == int(result), record  # digits and one operator only
        assert answer.search(record["completion"]).group(1) == steps[-1][3], record
    assert {"+", "-", "*"} <= {op for r in records["train"] for _, op, _, _ in re.findall(
        r"(\d+) ([-+*]) (\d+) = (\d+)", r["completion"])}


def test_demo_logs_the_tokenizers_real_size(tmp_path, caplog):
    """A small corpus gives BPE fewer tokens than vocab_size asks: the log line says the size written, and that
    it is short of the request."""
    from tailkd_ray.models import load_tokenizer
    from tailkd_ray.pipelines.demo import _setup_corpus_and_tokenizer, demo_settings

    settings = demo_settings(["task=math", "problems=40", "val_problems=4", "vocab_size=1024"])
    with caplog.at_level(logging.INFO, logger="tailkd_ray"):
        _, _, tokenizer = _setup_corpus_and_tokenizer(tmp_path, settings)
    size = len(load_tokenizer(tokenizer))
    assert size < 1024
    assert f"BPE tokenizer of {size} tokens (vocab_size=1024 asked; the corpus gave no more) in " in caplog.text


def test_cli_demo_task_math_defaults_its_own_out(monkeypatch):
    from tailkd_ray import cli
    from tailkd_ray.pipelines import demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, overrides: calls.append((out, overrides)))
    assert cli.main(["demo", "--task", "math", "student_steps=5"]) == 0
    assert cli.main(["demo"]) == 0
    assert calls == [("runs/demo-math", ["task=math", "student_steps=5"]), ("runs/demo", ["task=pretrain"])]


def test_demo_settings_validation():
    from tailkd_ray.config import ConfigError
    from tailkd_ray.pipelines.demo import demo_settings

    with pytest.raises(ConfigError, match="unknown key nope"):
        demo_settings(["nope=1"])
    with pytest.raises(ConfigError, match="student_steps must be int"):
        demo_settings(["student_steps=many"])
    with pytest.raises(ConfigError, match="task"):
        demo_settings(["task=poetry"])
