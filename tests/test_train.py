"""2-worker CPU Ray Train runs on tiny models: strategies, exact vs summary, failure + resume, export."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ray import cloudpickle

from tailkd_ray.config import from_dict, to_dict
from tailkd_ray.core.summary import summarize
from tailkd_ray.train.runlog import METRICS_FILE, SUPERSEDED, read_records
from tailkd_ray.train.trackers import TRACKERS

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fault-injection hook travels to workers

SEQ_LEN, VOCAB, BATCH = 16, 320, 2
SMALL = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
         "num_key_value_heads": 1}


def pattern_ids(rows: int, seed: int) -> np.ndarray:
    """Counting sequences over 32 tokens from random starts: learnable in a few steps."""
    starts = np.random.default_rng(seed).integers(0, 32, size=(rows, 1))
    return ((starts + np.arange(SEQ_LEN + 1)) % 32).astype(np.int32)


def with_summaries(ids: np.ndarray, teacher_dir, top_m: int, tail_samples: int) -> list[dict]:
    """Rows with the teacher's summary, as the teacher pool would produce them."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    with torch.no_grad():
        logits = teacher(input_ids=torch.from_numpy(ids[:, :-1]).long()).logits
    summary = summarize(logits, top_m=top_m, tail_samples=tail_samples, logp_dtype=torch.float32).to_numpy()
    return [{"input_ids": ids[i], **{k: v[i] for k, v in summary.items()}} for i in range(len(ids))]


def datasets(ray, teacher_dir, summaries: bool, top_m: int = VOCAB - 1):
    """Train/val datasets; summaries default to M = V − 1 with S = 1, whose single far-tail token makes the
    sampled tail term exact (the summary loss equals the exact one) while exercising the tail path."""
    train, val = pattern_ids(16, seed=1), pattern_ids(4, seed=2)
    make = ((lambda ids: with_summaries(ids, teacher_dir, top_m, tail_samples=1)) if summaries
            else (lambda ids: [{"input_ids": r} for r in ids]))
    return (ray.data.from_items(make(train), override_num_blocks=len(train) // BATCH),
            ray.data.from_items(make(val), override_num_blocks=2))


def make_cfg(out: Path, teacher_dir, *, strategy="ddp", steps=4, summary=True, data=None, **train):
    return from_dict({
        "output_dir": str(out), "teacher": {"model": str(teacher_dir)},
        "student": {"config": SMALL, "init": "random"}, "data": {"seq_len": SEQ_LEN, **(data or {})},
        "summary": {"top_m": VOCAB if summary else None, "tail_samples": 1},
        "loss": {"kind": "tad", "k": 5, "beta": 1.0, "chunk_tokens": 24},
        "train": {"num_workers": 2, "strategy": strategy, "max_steps": steps, "batch_size": BATCH, "lr": 3e-3,
                  "warmup_steps": 1, "checkpoint_every": 100, "eval_every": 100, "seed": 0, "run_name": "t", **train},
    })


def run(tmp_path_factory, ray, teacher_dir, name, *, summary=True, top_m=VOCAB - 1, step_hook=None, **kwargs) -> Path:
    from tailkd_ray.train.loop import run_training

    out = tmp_path_factory.mktemp(name)
    cfg = make_cfg(out, teacher_dir, summary=summary, **kwargs)
    train_ds, val_ds = datasets(ray, teacher_dir, summaries=summary, top_m=top_m)
    run_training(cfg, train_ds, val_ds, step_hook=step_hook)
    return out


class KillOnce:
    """Fault injection: worker ``rank`` exits hard after optimizer step ``step``, on the first attempt only."""

    def __init__(self, marker: str, step: int, rank: int):
        self.marker, self.step, self.rank = marker, step, rank

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


STEPS = 6


@pytest.fixture(scope="module")
def runs(ray_session, tiny_llama_dir, tmp_path_factory):
    """Same seed, same data, three strategies: exact co-located DDP (the reference), DeepSpeed ZeRO-3 on
    summaries, and FSDP2 on summaries with worker 1 killing itself after step 3 (checkpoints every 2)."""
    marker = tmp_path_factory.mktemp("marker") / "killed"
    made = {
        "ddp": run(tmp_path_factory, ray_session, tiny_llama_dir, "ddp", strategy="ddp", summary=False, steps=STEPS),
        "deepspeed": run(tmp_path_factory, ray_session, tiny_llama_dir, "deepspeed", strategy="deepspeed", steps=STEPS,
                         loggers=list(TRACKERS)),
        "fsdp": run(tmp_path_factory, ray_session, tiny_llama_dir, "fsdp", strategy="fsdp", steps=STEPS,
                    checkpoint_every=2, max_failures=1, step_hook=KillOnce(str(marker), step=3, rank=1)),
    }
    assert marker.exists()
    return made


def by_step(out: Path) -> dict[int, float]:
    """Training loss per step (a step redone after a failure keeps its last value)."""
    return {r["step"]: r["loss"] for r in read_records(out, "step")}


def test_loss_falls_and_strategies_agree(runs):
    reference = by_step(runs["ddp"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1] - 0.3, reference
    for strategy in ("deepspeed", "fsdp"):
        losses = by_step(runs[strategy])
        np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)], [reference[s] for s in range(1, STEPS + 1)],
                                   rtol=1e-3, err_msg=strategy)


def test_worker_failure_resumes_without_retraining(runs):
    """FSDP2 run: killed after step 3, restarted from the step-2 checkpoint; the resumed trajectory equals
    the uninterrupted DDP one (model, optimizer, schedule and data position all restored)."""
    assert [r["resumed_from_step"] for r in read_records(runs["fsdp"], "resume")] == [2]
    assert [r["step"] for r in read_records(runs["fsdp"], "step")] == [1, 2, 3, 4, 5, 6]  # one record per step
    every_step = [json.loads(line) for line in (runs["fsdp"] / METRICS_FILE).read_text().splitlines()]
    every_step = [r for r in every_step if r["kind"] == "step"]
    # step 3 was redone (< one checkpoint interval); the first attempt's record is kept, marked superseded
    assert [(r["step"], r.get(SUPERSEDED, False)) for r in every_step] == [
        (1, False), (2, False), (3, True), (3, False), (4, False), (5, False), (6, False)]
    redone = [r["loss"] for r in every_step if r["step"] == 3]
    assert redone[0] == pytest.approx(redone[1], rel=1e-5)  # the same batches again after the data skip
    assert json.loads((runs["fsdp"] / "eval.json").read_text())["step"] == STEPS


def test_relaunch_after_completion_does_nothing_new(runs, ray_session, tiny_llama_dir):
    from tailkd_ray.train.loop import run_training

    out = runs["deepspeed"]
    cfg = make_cfg(out, tiny_llama_dir, strategy="deepspeed", steps=STEPS)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "ray_train" not in p.parts}
    run_training(cfg, *datasets(ray_session, tiny_llama_dir, summaries=True))
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "ray_train" not in p.parts}
    assert after == before


def test_eval_json_and_metrics_written(runs):
    for strategy, out in runs.items():
        evaluation = json.loads((out / "eval.json").read_text())
        assert evaluation["tokens"] == 4 * SEQ_LEN and evaluation["step"] == STEPS, strategy
        assert 0 < evaluation["val_loss"] < 7 and 0 <= evaluation["top1_agreement"] <= 1
        assert evaluation["kl_source"] == ("exact" if strategy == "ddp" else "summary")
        assert evaluation["kl_to_teacher"] > 0
        assert list((out / "tensorboard").glob("events.out.tfevents.*")), strategy
        assert [r["step"] for r in read_records(out, "eval")] == [STEPS]
        steps = read_records(out, "step")
        for r in steps:  # the step's time split: parts non-negative, summing to the whole
            parts = (r["data_wait_s"], r["compute_s"], r["optimizer_s"])
            assert min(parts) >= 0 and r["compute_s"] > 0, r
            assert r["data_wait_s"] <= r["step_time_s"] and r["compute_s"] + r["optimizer_s"] <= r["step_time_s"] + 1e-6
            assert 50 < r["peak_memory_mb"] < 20_000  # a worker process with torch loaded, on CPU
        # elapsed_s counts from each attempt's first step: increasing within an attempt (a worker lost under load
        # restarts the group, which the run survives: a resume record, then the clock starts again)
        attempts = [[]]
        for record in read_records(out):
            if record["kind"] == "resume":
                attempts.append([])
            elif record["kind"] == "step":
                attempts[-1].append(record["elapsed_s"])
        assert all(b > a for attempt in attempts for a, b in zip(attempt, attempt[1:])), (strategy, attempts)
        fixed = {kind: [r[f"{kind}_s"] for r in read_records(out, kind)] for kind in ("setup", "checkpoint", "export")}
        assert {r["kind"] for r in read_records(out)} <= {"setup", "step", "eval", "checkpoint", "export", "resume"}
        assert len(fixed["setup"]) >= 1 and len(fixed["export"]) == 1 and len(fixed["checkpoint"]) >= 1, fixed
        assert all(v > 0 for values in fixed.values() for v in values), fixed
        for setup in read_records(out, "setup"):  # its split: the worker group's start, the build, the val set's read
            assert min(setup["worker_start_s"], setup["student_build_s"], setup["val_read_s"]) > 0, setup
            assert setup["student_build_s"] < setup["setup_s"], setup
        assert all(r["eval_s"] > 0 for r in read_records(out, "eval"))
        # Ray Data's per-stage report of the input pipeline (the scored blocks in summary mode).
        assert "Dataset" in (out / "data_stats.txt").read_text(), strategy


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of a W&B offline run file (LevelDB log format: 32 KiB blocks of CRC, length, type
    headers; records may span blocks), after its 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if block - pos % block < 7 or (length, kind) == (0, 0):  # a block's zero-filled trailer
            pos += block - pos % block
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_trackers_hold_metrics_config_and_final_eval(runs, tiny_llama_dir):
    """train.loggers: [tensorboard, wandb, mlflow], offline: W&B's run file and MLflow's file store hold every
    step's loss, the resolved config and the final eval."""
    out = runs["deepspeed"]
    losses = by_step(out)
    final = json.loads((out / "eval.json").read_text())
    config = json.loads(json.dumps(to_dict(make_cfg(out, tiny_llama_dir, strategy="deepspeed", steps=STEPS,
                                                    loggers=list(TRACKERS)))))

    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    history, summary, run_record = {}, {}, None
    for record in wandb_records(wandb_run):
        kind = record.WhichOneof("record_type")
        items = {"history": lambda: record.history.item, "summary": lambda: record.summary.update}.get(kind)
        if items:
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items()}
            if kind == "history" and "train/loss" in values:
                history[values["_step"]] = values["train/loss"]
            if kind == "summary":
                summary.update(values)
        run_record = record.run if kind == "run" else run_record
    assert history == pytest.approx(losses)
    assert summary["final/val_loss"] == pytest.approx(final["val_loss"])
    assert run_record.run_group == "t" and run_record.display_name == out.name
    wandb_config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert wandb_config["loss"] == config["loss"] and wandb_config["train"]["loggers"] == list(TRACKERS)

    (experiment,) = [d for d in (out / "mlruns").iterdir() if (d / "meta.yaml").is_file() and d.name != "0"]
    (mlflow_run,) = [d for d in experiment.iterdir() if d.is_dir()]
    logged = [line.split() for line in (mlflow_run / "metrics" / "train" / "loss").read_text().splitlines()]
    assert {int(step): float(value) for _, value, step in logged} == pytest.approx(losses)
    assert float((mlflow_run / "metrics" / "final" / "val_loss").read_text().split()[1]) == pytest.approx(final["val_loss"])
    assert json.loads((mlflow_run / "artifacts" / "config.json").read_text()) == config
    assert json.loads((mlflow_run / "params" / "loss.k").read_text()) == config["loss"]["k"]


def test_missing_tracker_package_is_one_config_error(monkeypatch):
    import importlib.util

    from tailkd_ray.config import ConfigError, TrainConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.loggers: mlflow needs the mlflow package, which is not installed: "
                                          r"pip install 'tailkd-ray\[mlflow\]'"):
        TrainConfig(loggers=["tensorboard", "mlflow"]).validate()
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        TrainConfig(loggers=["comet"]).validate()


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_exported_student_loads_matches_eval_and_generates(runs, strategy):
    """The gathered export is the trained model: its held-out loss equals the in-training eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_dir = runs[strategy] / "student"
    assert (student_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(student_dir)).eval()
    ids = torch.from_numpy(pattern_ids(4, seed=2)).long()
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert float(loss) == pytest.approx(json.loads((runs[strategy] / "eval.json").read_text())["val_loss"], rel=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    prompt = tokenizer("def f(x):", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_colocated_exact_matches_summary_with_m_equal_v(runs, ray_session, tiny_llama_dir, tmp_path_factory):
    """Exact TAD on full teacher logits (the DDP reference) vs the summary path at M = V: same trajectory."""
    from_summary = run(tmp_path_factory, ray_session, tiny_llama_dir, "m_eq_v", strategy="ddp", top_m=VOCAB,
                       steps=STEPS)
    exact = by_step(runs["ddp"])
    np.testing.assert_allclose([by_step(from_summary)[s] for s in exact], list(exact.values()), rtol=1e-5)


def test_nonfinite_step_stops_the_run_or_is_skipped(ray_session, tiny_llama_dir, tmp_path_factory):
    """A batch whose teacher summary is NaN makes one step's divergence NaN: by default the run stops with an
    error naming the step, the rank and the term; with train.max_nonfinite_steps = 1 it is skipped and logged."""
    from tailkd_ray.errors import NonFiniteLossError, find_tailkd_error
    from tailkd_ray.train.loop import run_training

    rows = with_summaries(pattern_ids(16, seed=1), tiny_llama_dir, VOCAB - 1, tail_samples=1)
    for row in rows[:BATCH]:  # one micro-batch of one worker
        row["top_logp"] = np.full_like(row["top_logp"], np.nan)
    val = with_summaries(pattern_ids(4, seed=2), tiny_llama_dir, VOCAB - 1, tail_samples=1)

    def fit(name: str, **train):
        out = tmp_path_factory.mktemp(name)
        train_ds = ray_session.data.from_items(rows, override_num_blocks=len(rows) // BATCH)
        val_ds = ray_session.data.from_items(val, override_num_blocks=2)
        # data.shuffle off: the NaN rows stay one micro-batch (a reshuffled stream spreads them over several steps)
        run_training(make_cfg(out, tiny_llama_dir, data={"shuffle": False}, **train), train_ds, val_ds)
        return out

    with pytest.raises(Exception) as failure:
        fit("nonfinite_stop")
    error = find_tailkd_error(failure.value)
    assert isinstance(error, NonFiniteLossError), failure.value
    message = str(error)
    assert "step " in message and "rank " in message and "divergence not finite" in message
    assert "CLM not finite" not in message and "lower train.lr" not in message

    out = fit("nonfinite_skip", max_nonfinite_steps=1)
    skipped = read_records(out, "nonfinite")
    assert len(skipped) == 1 and "divergence not finite" in skipped[0]["problem"]
    assert all(np.isfinite(r["loss"]) for r in read_records(out, "step") if r["step"] != skipped[0]["step"])
    assert np.isfinite(json.loads((out / "eval.json").read_text())["val_loss"])


def test_nonfinite_problem_names_rank_and_term():
    from tailkd_ray.train.loop import nonfinite_problem

    finite = torch.tensor([[6.0, 4.0, 2.0, 2.0, 0.0], [5.0, 3.0, 2.0, 2.0, 0.0]])
    assert nonfinite_problem(3, finite, 1.5) is None
    bad = finite.clone()
    bad[1, 1] = float("inf")
    message = nonfinite_problem(3, bad, 1.5)
    assert message.startswith("step 3: rank 1: CLM not finite") and "rank 0" not in message
    assert "gradient norm nan" in nonfinite_problem(3, finite, float("nan"))


def test_progress_line_reads_a_step_record():
    from tailkd_ray.config import TrainConfig
    from tailkd_ray.train.loop import progress_due, progress_line

    record = {"step": 10, "loss": 2.5, "clm": 2.0, "div": 0.5, "tokens": 4096, "step_time_s": 0.5,
              "data_wait_s": 0.01, "elapsed_s": 5.0}
    line = progress_line(record, 100, steps_done=10)
    assert line.startswith("train step 10/100  loss 2.5000") and "8,192 tok/s" in line and "ETA 0m45s" in line
    train = TrainConfig(max_steps=100)
    assert [s for s in range(1, 101) if progress_due(s, train)] == list(range(5, 101, 5))
    assert progress_due(7, TrainConfig(max_steps=7, log_every=3)) and not progress_due(4, TrainConfig(max_steps=7, log_every=3))


# --------------------------------------------------------------------------------------------------
# Checkpoint integrity: the manifest, fallback to the newest intact checkpoint, one-line failure
# --------------------------------------------------------------------------------------------------
class FailOnce:
    """Fault injection: every worker raises after optimizer step ``step`` on the first attempt (max_failures 0:
    the run stops, leaving its checkpoints for a relaunch)."""

    def __init__(self, marker: str, step: int):
        self.marker, self.step = marker, step

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and not os.path.exists(self.marker):
            raise RuntimeError("injected failure")


@pytest.fixture(scope="module")
def interrupted(ray_session, tiny_llama_dir, tmp_path_factory):
    """An FSDP2 run of 6 steps stopped after step 5, with its checkpoints of steps 2 and 4: (output dir, marker).
    Tests damage copies of it."""
    from tailkd_ray.train.loop import run_training

    out = tmp_path_factory.mktemp("interrupted")
    marker = out.parent / f"{out.name}-done"
    cfg = make_cfg(out, tiny_llama_dir, strategy="fsdp", steps=STEPS, checkpoint_every=2, max_failures=0)
    with pytest.raises(Exception):
        run_training(cfg, *datasets(ray_session, tiny_llama_dir, summaries=True),
                     step_hook=FailOnce(str(marker), step=5))
    marker.touch()
    return out, marker


def damaged_copy(interrupted, tmp_path) -> tuple[Path, Path]:
    """A copy of the interrupted run to damage: (output dir, run dir holding the checkpoints)."""
    out = tmp_path / "out"
    shutil.copytree(interrupted[0], out)
    run_dir = out / "ray_train" / "t"
    assert sorted(p.name for p in run_dir.glob("checkpoint_step*")) == ["checkpoint_step00000002",
                                                                          "checkpoint_step00000004"]
    return out, run_dir


def test_checkpoint_manifest_lists_every_file_and_finds_changes(interrupted, tmp_path):
    from tailkd_ray.train.checkpoint import MANIFEST, checkpoint_problem

    _, run_dir = damaged_copy(interrupted, tmp_path)
    latest = run_dir / "checkpoint_step00000004"
    files = json.loads((latest / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in latest.iterdir()} - {MANIFEST}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "progress_rank1.json", "rng_rank0.pt"} <= set(files)
    assert checkpoint_problem(latest) is None
    shard = latest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(data))
    assert checkpoint_problem(latest) == "__1_0.distcp was changed after it was written (SHA-256 differs)"
    assert checkpoint_problem(latest, hashes=False) is None  # what the workers check: sizes only


def test_truncated_latest_checkpoint_falls_back_and_the_run_completes(interrupted, tmp_path, ray_session,
                                                                       tiny_llama_dir, caplog):
    from tailkd_ray.train.loop import run_training

    out, run_dir = damaged_copy(interrupted, tmp_path)
    shard = run_dir / "checkpoint_step00000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    cfg = make_cfg(out, tiny_llama_dir, strategy="fsdp", steps=STEPS, checkpoint_every=2, max_failures=0)
    run_training(cfg, *datasets(ray_session, tiny_llama_dir, summaries=True))
    assert [r["resumed_from_step"] for r in read_records(out, "resume")] == [2]
    assert json.loads((out / "eval.json").read_text())["step"] == STEPS
    warning = next(r.getMessage() for r in caplog.records if "passed over" in r.getMessage())
    assert "from checkpoint_step00000002" in warning
    assert "checkpoint_step00000004: __0_0.distcp holds 100 bytes" in warning
    assert "checkpoint_manager_snapshot.json lists other checkpoints: renamed to" in warning
    # The step-4 checkpoint was written again, whole, by the resumed run.
    from tailkd_ray.train.checkpoint import checkpoint_problem
    assert checkpoint_problem(run_dir / "checkpoint_step00000004") is None


def test_deleted_latest_checkpoint_or_snapshot_damage_falls_back(interrupted, tmp_path):
    from tailkd_ray.train.checkpoint import RAY_SNAPSHOT, resume_checkpoint

    _, run_dir = damaged_copy(interrupted, tmp_path)
    snapshot = run_dir / RAY_SNAPSHOT
    intact = snapshot.read_text()
    assert resume_checkpoint(run_dir) == run_dir / "checkpoint_step00000004"
    assert snapshot.read_text() == intact  # Ray's snapshot agrees: left alone

    snapshot.write_text(intact[: len(intact) // 2])  # truncated
    assert resume_checkpoint(run_dir) == run_dir / "checkpoint_step00000004"
    assert not snapshot.exists() and (run_dir / f"{RAY_SNAPSHOT}.set-aside").read_text() == intact[: len(intact) // 2]

    snapshot.write_text(intact)
    shutil.rmtree(run_dir / "checkpoint_step00000004")
    assert resume_checkpoint(run_dir) == run_dir / "checkpoint_step00000002"
    assert not snapshot.exists()  # it names the deleted directory: Ray would refuse to start


def test_no_intact_checkpoint_is_one_line_error(interrupted, tmp_path):
    from tailkd_ray.errors import CheckpointError
    from tailkd_ray.train.checkpoint import MANIFEST, resume_checkpoint

    _, run_dir = damaged_copy(interrupted, tmp_path)
    shutil.rmtree(run_dir / "checkpoint_step00000004")
    (run_dir / "checkpoint_step00000002" / MANIFEST).unlink()
    with pytest.raises(CheckpointError) as error:
        resume_checkpoint(run_dir)
    message = str(error.value)
    assert "\n" not in message and f"no intact checkpoint to resume run {run_dir}" in message
    assert "checkpoint_step00000004: its directory is missing" in message
    assert f"checkpoint_step00000002: it has no {MANIFEST}" in message and "another train.run_name" in message


def test_ddp_and_deepspeed_checkpoints_have_whole_manifests(runs):
    from tailkd_ray.train.checkpoint import MANIFEST, checkpoint_problem

    for strategy in ("ddp", "deepspeed"):
        (latest,) = (runs[strategy] / "ray_train" / "t").glob("checkpoint_step*")
        files = json.loads((latest / MANIFEST).read_text())["files"]
        assert set(files) == {p.relative_to(latest).as_posix() for p in latest.rglob("*") if p.is_file()} - {MANIFEST}
        assert checkpoint_problem(latest) is None, strategy
    assert any(name.startswith("state/") for name in files)  # DeepSpeed's own files, under its tag


def test_deepspeed_checkpoints_load_without_arbitrary_pickle(runs, tmp_path):
    """DeepSpeed's checkpoint files are read with torch.load(weights_only=True): the run's own load (the
    relaunch test resumes from them), a pickle naming any other global is refused."""
    import pickle

    from tailkd_ray.train.strategies import weights_only_checkpoint_engine

    engine = weights_only_checkpoint_engine()
    (latest,) = (runs["deepspeed"] / "ray_train" / "t").glob("checkpoint_step*")
    for path in (latest / "state").glob("*.pt"):
        assert engine.load(str(path))  # model and ZeRO-3 optimizer states: tensors and the allowed classes

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError, match=r"(?s)Weights only load failed.*GLOBAL posix.system"):
        engine.load(str(evil))


def test_eval_line_reads_an_eval_record():
    from tailkd_ray.train.loop import eval_line

    metrics = {"step": 50, "val_loss": 5.1234, "val_ppl": 167.9, "kl_to_teacher": 0.25, "top1_agreement": 0.41,
               "full_ece": 5.3, "kl_source": "summary"}
    line = eval_line(metrics, 200)
    assert line == ("eval step 50/200  val_loss 5.1234  ppl 167.9  kl_to_teacher 0.25 (summary)  "
                    "top1_agreement 0.4100  full_ece 5.3")
    teacherless = eval_line({**metrics, "kl_to_teacher": float("nan"), "kl_source": "none"}, 200)
    assert "kl_to_teacher" not in teacherless and teacherless.endswith("full_ece 5.3")
