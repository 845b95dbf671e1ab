"""jobs/bench.py at tiny sizes: both subcommands run and write the expected, sane JSON (no timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tailkd_ray.core.summary import bytes_per_position

BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench.py"


def run_bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    json_path = Path(args[args.index("--json") + 1])
    return json.loads(json_path.read_text()), out.stdout


def check_meta(result: dict, command: str) -> None:
    meta = result["meta"]
    assert result["benchmark"] == command
    assert command in meta["command"] and "--quick" in meta["argv"]
    for key in ("torch", "device", "date", "seconds"):
        assert meta[key], key
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH.parents[1], capture_output=True, text=True)
    # The checkout's commit where git can read it (else None, never a made-up value).
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert (meta["git_commit"] or "").removesuffix("+dirty") == (expected or "")


def test_loss_quick(tmp_path):
    result, stdout = run_bench("loss", "--quick", "--repeats", "2", "--json", str(tmp_path / "loss.json"))
    check_meta(result, "loss")
    assert set(result["step_seconds"]) == {"kd", "tad", "topk_summary", "tad_summary"}
    for entry in result["step_seconds"].values():
        assert len(entry["raw"]) == 2 and all(s > 0 for s in entry["raw"])
    pairs = {(r["numerator"], r["denominator"]): r for r in result["time_ratios"]}
    assert set(pairs) == {("tad", "kd"), ("tad_summary", "topk_summary")}
    # Issue 16's goals, one per pair.
    assert pairs["tad", "kd"]["goal"] == 1.05 and pairs["tad_summary", "topk_summary"]["goal"] == 1.03
    for ratio in pairs.values():
        assert ratio["median_of_paired_ratios"] > 0 and ratio["ratio_of_medians"] > 0
        assert len(ratio["paired_ratios"]) == 2
    memory = result["memory"]
    assert [row["tokens"] for row in memory["rows"]] == [256, 512]
    for row in memory["rows"]:
        peaks = row["peak_bytes"]
        assert set(peaks) == {"chunked_kd", "chunked_tad", "chunked_tad_summary", "naive_kd"}
        # The naive path holds at least logits + two log-softmaxes of [tokens, V] float32.
        assert peaks["naive_kd"] >= 3 * row["tokens"] * 2048 * 4
        assert all(0 < b for b in peaks.values())
        assert row["naive_over_chunked"]["chunked_kd"] == pytest.approx(peaks["naive_kd"] / peaks["chunked_kd"])
    # The naive path grows with the token count (2x tokens, about 2x bytes); the chunked path much less.
    assert memory["growth_largest_over_smallest"]["naive_kd"] == pytest.approx(2.0, rel=0.05)
    assert memory["growth_largest_over_smallest"]["chunked_kd"] < 1.5
    assert "tad / kd" in stdout and "peak extra memory" in stdout


def test_summary_quick(tmp_path):
    result, stdout = run_bench("summary", "--quick", "--teacher-dir", str(tmp_path / "teacher"),
                               "--json", str(tmp_path / "summary.json"))
    check_meta(result, "summary")
    assert (tmp_path / "teacher" / "teacher" / "model.safetensors").exists()
    assert (tmp_path / "teacher" / "student" / "model.safetensors").exists()
    assert {t["kind"] for t in result["teachers"]} == {"trained", "synthetic"}
    rows = result["rows"]
    grid = {(16, 0), (32, 0), (32, 16), (64, 16), (128, 32)}
    for teacher in ("trained", "synthetic"):
        for k, beta in ((10, 1.0), (5, 2.0)):
            cells = {(r["top_m"], r["tail_samples"]) for r in rows if r["teacher"] == teacher and (r["k"], r["beta"]) == (k, beta)}
            assert cells == grid, (teacher, k, beta)
    vocab = {t["kind"]: t["vocab"] for t in result["teachers"]}
    for r in rows:
        per_token = (r["top_m"] + r["tail_samples"]) * (4 + 2) + 4  # int32 ids, fp16 log-probs, fp32 rest mass
        assert r["summary_bytes_per_token"] == per_token == bytes_per_position(r["top_m"], r["tail_samples"])
        assert r["bytes_ratio"] == 2 * vocab[r["teacher"]] / per_token
        assert r["bytes_ratio_at_32k"] == 2 * 32768 / per_token
        assert len(r["raw"]["signed_rel_error"]) == len(r["raw"]["grad_cosine"]) == 2
        assert math.isfinite(r["exact_loss"]) and r["exact_loss"] > 0
        assert math.isfinite(r["abs_rel_error"]["max"]) and r["abs_rel_error"]["max"] < 1.0
        assert -1.0 <= r["grad_cosine"]["min"] <= r["grad_cosine"]["max"] <= 1.0 + 1e-6
        # S = 0 is deterministic: every seed gives the same summary, hence the same error.
        if r["tail_samples"] == 0:
            assert r["signed_rel_error"]["std"] == pytest.approx(0.0, abs=1e-12)
    default = [r for r in rows if (r["teacher"], r["k"], r["beta"], r["top_m"], r["tail_samples"]) == ("trained", 10, 1.0, 64, 16)]
    assert result["default_meets_goal"] == default[0]["meets_goal"]
    assert "meeting the goal" in stdout
    lean = result["lean_teacher"]
    assert (lean["chunk_tokens"], lean["batch"] * lean["seq_len"], lean["same_ids"]) == (16, 128, True)
    peaks = lean["peak_extra_bytes"]
    assert peaks["hidden_states"] < lean["logits_bytes"] < peaks["full_logits"]
    assert "lean teacher (2 × 64 tokens" in stdout

    # A second run reuses the cached teacher instead of training again.
    again, stdout = run_bench("summary", "--quick", "--teacher", "trained", "--teacher-dir", str(tmp_path / "teacher"),
                              "--json", str(tmp_path / "again.json"))
    assert "training a teacher" not in stdout and "using the cached teacher" in stdout
    assert [r["exact_loss"] for r in again["rows"]] == [r["exact_loss"] for r in rows if r["teacher"] == "trained"]


def test_teacher_quick(tmp_path):
    result, stdout = run_bench("teacher", "--quick", "--json", str(tmp_path / "teacher.json"))
    check_meta(result, "teacher")
    config = result["config"]
    assert (config["blocks"], config["seq_len"], config["batch_size"], config["repeats"]) == (8, 32, 4, 2)
    assert result["tokens_per_run"] == 8 * 32
    assert result["bare_torch_threads"] == result["ray_worker_probe"]["torch_threads"] * config["actors"] >= 1
    assert set(result["variants"]) == {"pool", "pool_ordered", "bare"}
    for name, entry in result["variants"].items():
        seconds = entry["seconds"]["raw"]
        assert len(seconds) == 2 and all(s > 0 for s in seconds), name
        # tokens/s is the token count over each repeat's wall time, not a made-up number.
        assert entry["tokens_per_second"]["raw"] == pytest.approx([8 * 32 / s for s in seconds])
        assert all(r > 0 for r in entry["steady_tokens_per_second"]["raw"]), name
        # 8 blocks in batches of 4: two batches per run, arriving in order within the run's time.
        for arrivals, total in zip(entry["batch_arrivals"], seconds):
            assert len(arrivals) == 2 and 0 < arrivals[0] <= arrivals[1] <= total, name
        assert entry["first_batch_seconds"]["raw"] == [a[0] for a in entry["batch_arrivals"]]
    for kind in ("end_to_end", "steady_state"):
        ratio = result["ratios_pool_over_bare"][kind]
        assert ratio["median_of_paired_ratios"] > 0 and len(ratio["paired_ratios"]) == 2
        order = result["ratios_ordered_over_pool"][kind]
        assert len(order["paired_ratios"]) == 2 and order["median_of_paired_ratios"] > 0
        assert ratio["goal"] == 0.9 and ratio["meets_goal"] == (ratio["median_of_paired_ratios"] >= 0.9)
    end_to_end = result["ratios_pool_over_bare"]["end_to_end"]["paired_ratios"]
    assert end_to_end == pytest.approx([b / p for p, b in zip(result["variants"]["pool"]["seconds"]["raw"],
                                                              result["variants"]["bare"]["seconds"]["raw"])])
    assert "ratio pool / bare tokens/s" in stdout


def test_pipeline_quick(tmp_path):
    """All three variants train the same steps; tokens/s, step splits and ratios are consistent with each other."""
    result, stdout = run_bench("pipeline", "--quick", "--json", str(tmp_path / "pipeline.json"))
    check_meta(result, "pipeline")
    config = result["config"]
    assert set(result["variants"]) == {"stream", "cache", "plain"}
    tokens_per_step = config["batch"] * config["seq_len"]
    for name, entry in result["variants"].items():
        (run,) = entry["runs"]  # --quick: one repeat
        assert run["steps"] == config["steps"] - config["warmup_steps"], name
        assert 0 < run["end_to_end_tokens_per_second"] < run["tokens_per_second"], name  # start-up costs time
        assert run["end_to_end_tokens_per_second"] == pytest.approx(config["steps"] * tokens_per_step / run["seconds"])
        split = run["mean_seconds"]
        assert split["compute_s"] > 0 and split["data_wait_s"] >= 0 and split["optimizer_s"] > 0, name
        assert split["compute_s"] + split["optimizer_s"] <= split["step_time_s"] * 1.001, name
        assert entry["peak_memory_mb"] > 50 and entry["student_mfu"] is None  # CPU: no peak FLOP/s known
    plain = result["variants"]["plain"]["mean_seconds_per_step"]
    assert all(plain[k] > 0 for k in ("teacher_forward_s", "student_forward_and_loss_s", "backward_s"))
    for name in ("stream", "cache"):  # Ray Data's stage report of the run's input pipeline
        assert "Operator" in result["variants"][name]["runs"][0]["data_stats"]
        run = result["variants"][name]["runs"][0]
        fixed = run["fixed_seconds"]  # the run's seconds outside the steps: all positive, adding up to the whole
        assert min(fixed[k] for k in ("worker_setup_s", "final_checkpoint_s", "export_s", "outside_workers_s")) > 0
        assert fixed["worker_setup_s"] + fixed["training_loop_s"] + fixed["final_checkpoint_s"] + fixed["export_s"] \
            + fixed["outside_workers_s"] == pytest.approx(run["seconds"])
        assert f"{name} run of" in stdout
    assert result["variants"]["plain"]["mean_fixed_seconds"] == {}
    assert "TeacherScorer" in result["variants"]["stream"]["runs"][0]["data_stats"]
    assert result["cache_scoring"]["tokens"] == (config["steps"] + 2) * config["batch"] * config["seq_len"]
    flops = result["model_flops_per_token"]
    assert flops["student_training"] > 0 and flops["teacher_forward"] > 0
    ratios = result["ratios"]
    assert set(ratios) == {f"{a}/{b} {kind}" for a, b in (("stream", "cache"), ("cache", "plain"))
                           for kind in ("steady_state", "end_to_end")}
    steady = ratios["stream/cache steady_state"]
    assert steady["median_of_paired_ratios"] == pytest.approx(
        result["variants"]["stream"]["tokens_per_second"]["median"] / result["variants"]["cache"]["tokens_per_second"]["median"])
    assert steady["meets_goal"] == (steady["median_of_paired_ratios"] >= 0.9)
    assert "stream/cache steady_state" in stdout and "Ray Data stages, stream" in stdout


def test_model_flops_per_token_matches_a_hand_count():
    """PaLM's count for a tiny Llama: 2·(matmul weights) + 4·L·d·T forward, ×3 for training."""
    from transformers import LlamaConfig

    from bench.measure import mfu, model_flops_per_token

    vocab, width, layers, seq = 100, 16, 2, 8
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    per_layer = 4 * width * width + 3 * width * 48  # q, k, v, o + gate, up, down (norm weights: 2·d)
    weights = layers * (per_layer + 2 * width) + width + vocab * width  # + final norm + LM head (not the embedding)
    forward = 2 * weights + 4 * layers * width * seq
    assert model_flops_per_token(config, seq, training=False) == forward
    assert model_flops_per_token(config, seq, training=True) == 3 * forward
    assert mfu(1e9, 100.0, 1.0) == pytest.approx(0.1) and mfu(1e9, 100.0, None) is None


def test_checkpoint_quick(tmp_path):
    """Both ways of persisting a checkpoint write the same DCP files into --storage-dir and are timed side by side."""
    storage = tmp_path / "storage"
    result, stdout = run_bench("checkpoint", "--quick", "--storage-dir", str(storage), "--json", str(tmp_path / "c.json"))
    check_meta(result, "checkpoint")
    assert ".metadata" in result["files_per_checkpoint"] and any(f.endswith(".distcp") for f in result["files_per_checkpoint"])
    assert result["state_bytes"] == 3 * 4 * result["parameters"]  # float32 weights and two AdamW moments
    assert all(len(v) == 2 and min(v) > 0 for v in result["seconds"].values())
    assert result["ratio"]["paired_ratios"] == pytest.approx([a / b for a, b in zip(result["seconds"]["in_place"],
                                                                                   result["seconds"]["copy"])])
    assert storage.is_dir() and not any(storage.iterdir())  # the user's storage is left as found
    assert "in_place / copy" in stdout


def test_student_quick(tmp_path):
    """Activation checkpointing lowers the step's peak memory; each variant's ratio is its paired time over plain's."""
    result, stdout = run_bench("student", "--quick", "--json", str(tmp_path / "student.json"))
    check_meta(result, "student")
    peak = result["peak_extra_bytes"]
    assert set(peak) == {"plain", "ac"} and 0 < peak["ac"] < peak["plain"]
    assert result["ac_saves_bytes"] == peak["plain"] - peak["ac"]
    assert result["first_loss"]["ac"] == pytest.approx(result["first_loss"]["plain"], rel=1e-6)
    assert result["ratios"]["ac"]["paired_ratios"] == pytest.approx(
        [a / b for a, b in zip(result["seconds"]["ac"], result["seconds"]["plain"])])
    assert set(result["mfu"].values()) == {None} and result["tokens_per_second"]["ac"] > 0  # CPU: no peak known
    assert "activation checkpointing saves" in stdout


def test_gpu_script_commands_parse():
    """jobs/bench_gpu.sh (run only where a GPU is): each command it would run is a valid bench.py invocation on cuda
    at the realistic sizes (V = 151,936, T = 4,096), and it covers every benchmark."""
    import os
    import shlex

    from bench.cli import build_parser

    script = BENCH.parent / "bench_gpu.sh"
    out = subprocess.run(["bash", str(script), "/tmp/out"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DRY_RUN": "1", "PEAK_TFLOPS": "989"})
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    parsed = [build_parser().parse_args(argv[argv.index(str(BENCH.relative_to(BENCH.parents[1]))) + 1:])
              for argv in commands]
    assert [args.command for args in parsed] == ["loss", "summary", "teacher", "student", "pipeline", "checkpoint"]
    for args in parsed:
        assert args.json.startswith("/tmp/out/") and not args.quick
        vocab = args.synthetic_vocab if args.command == "summary" else args.vocab
        assert vocab == 151936, args.command
        if args.command != "summary":
            assert args.device == "cuda"
        if args.command in ("teacher", "student", "pipeline"):
            assert args.seq_len == 4096 and args.peak_tflops == 989.0
    (pipeline,) = [args for args in parsed if args.command == "pipeline"]
    assert (pipeline.student_layers, pipeline.student_width) == (24, 1024)  # a ~0.5B student


def test_gpu_script_subset_sizes_and_failures(tmp_path):
    """BENCHMARKS picks and orders the benchmarks, REPEATS and STEPS size them, an unknown name is refused, and a
    failing benchmark is reported while the next one still runs (a stand-in PYTHON fails ``loss`` only)."""
    import os
    import shlex

    script = BENCH.parent / "bench_gpu.sh"

    def gpu_script(**env):
        return subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                              timeout=60, env={**os.environ, **env})

    out = gpu_script(DRY_RUN="1", BENCHMARKS="pipeline teacher", REPEATS="1", STEPS="12")
    commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert out.returncode == 0 and [argv[2] for argv in commands] == ["pipeline", "teacher"], out.stdout
    assert all(argv[argv.index("--repeats") + 1] == "1" for argv in commands)
    assert commands[0][commands[0].index("--steps") + 1] == "12"
    unknown = gpu_script(DRY_RUN="1", BENCHMARKS="loss lozz")
    assert unknown.returncode == 2 and "unknown benchmark 'lozz'" in unknown.stderr

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "ran $*" >> "$(dirname "$0")/calls"\ncase "$2" in loss) exit 3 ;; esac\n')
    fake.chmod(0o755)
    run = gpu_script(PYTHON=str(fake), BENCHMARKS="loss summary")
    calls = (tmp_path / "calls").read_text().splitlines()
    assert run.returncode == 1 and "failed: loss (exit 3)" in run.stderr, run.stderr
    assert [c.split()[2] for c in calls[1:]] == ["loss", "summary"]  # after the CUDA check, summary still ran


def test_cache_quick(tmp_path):
    result, stdout = run_bench("cache", "--quick", "--json", str(tmp_path / "cache.json"))
    check_meta(result, "cache")
    assert result["rows"] > 0 and 0 < result["masked_target_share"] < 1 and result["padding_tokens"] > 0
    blanked, stored = result["blanked"], result["stored"]
    assert 0 < blanked["summary_bytes_per_row"] < stored["summary_bytes_per_row"]
    assert result["summary_bytes_ratio"] == stored["summary_bytes_per_row"] / blanked["summary_bytes_per_row"] > 1
    assert "summary columns" in stdout
    first = result["first_batch"]  # the same rows in one row group and in row groups of ROW_GROUP_BYTES
    assert first["rows"] == result["rows"] and first["row_groups"]["one_row_group"] == 1
    assert first["row_groups"]["row_groups"] >= 1
    assert all(len(s) == 1 and s[0] > 0 for s in first["seconds"].values()) and "first batch" in stdout
    assert first["row_groups_over_one_median_of_paired"] == first["seconds"]["row_groups"][0] / first["seconds"][
        "one_row_group"][0]
