"""K/β search on tiny models and local Ray: one teacher pass for the whole grid, four trials each a 2-worker
TorchTrainer, result files, a best config that re-runs with `tailkd distill`, ASHA stopping trials early,
trials that validate only at their last step (the CLI help's example among them), refusal of an incompatible
cache, restore of a finished search, and the search's pure helpers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tailkd_ray.config import Config, ConfigError, from_dict, load_config

SMALL = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
         "num_key_value_heads": 1}
SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus(builtin_corpus, tmp_path_factory):
    """~5 KB of train text and ~1.5 KB of val text from the built-in corpus: ~100 train and ~30 val blocks."""
    train_dir, _ = builtin_corpus
    text = "".join(p.read_text() for p in sorted(train_dir.glob("*.txt"))[:20])
    root = tmp_path_factory.mktemp("tune_corpus")
    (root / "train").mkdir()
    (root / "val").mkdir()
    (root / "train" / "a.txt").write_text(text[:5000])
    (root / "val" / "b.txt").write_text(text[5000:6500])
    return root / "train", root / "val"


def search_config(out: Path, teacher, corpus, **sections) -> Config:
    values = {
        "output_dir": str(out), "teacher": {"model": str(teacher), "batch_size": 16},
        "student": {"config": SMALL, "init": "random"},
        "data": {"train": str(corpus[0]), "val": str(corpus[1]), "format": "text", "seq_len": SEQ_LEN,
                 "tokenizer_actors": 1},
        "summary": {"top_m": 8, "tail_samples": 2},
        "loss": {"kind": "tad", "k": 4, "beta": 1.0, "chunk_tokens": 64},
        "train": {"num_workers": 2, "strategy": "ddp", "max_steps": 2, "batch_size": 4, "lr": 3e-3,
                  "warmup_steps": 1, "checkpoint_every": 100, "eval_every": 1, "seed": 0},
        "tune": {"k": [2, 8], "beta": [0.5, 2.0], "max_concurrent": 2, "asha": False},
    }
    for section, overrides in sections.items():
        values[section] = {**values[section], **overrides} if isinstance(overrides, dict) else overrides
    return from_dict(values)


class CountingScorer:
    """Wraps ``cache.score_dataset`` (the only way the cache runs the teacher) and counts its calls."""

    def __init__(self, monkeypatch):
        from tailkd_ray.teacher import cache

        self.calls = []
        original = cache.score_dataset

        def counted(blocks, cfg, *args, **kwargs):
            self.calls.append(cfg.summary.cache_dir)
            return original(blocks, cfg, *args, **kwargs)

        monkeypatch.setattr(cache, "score_dataset", counted)


@pytest.fixture(scope="module")
def grid(ray_session, tiny_llama_dir, corpus, tmp_path_factory):
    """A finished 2 × 2 grid (ASHA off): (config, run_tune's summary, scoring calls)."""
    from tailkd_ray.pipelines.tune import run_tune

    monkeypatch = pytest.MonkeyPatch()
    try:
        scorer = CountingScorer(monkeypatch)
        cfg = search_config(tmp_path_factory.mktemp("grid"), tiny_llama_dir, corpus)
        summary = run_tune(cfg)
    finally:
        monkeypatch.undo()
    return cfg, summary, scorer.calls


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def tune_results(out: Path, trial: str) -> list[dict]:
    """The results Tune recorded for ``trial``, in order."""
    return [json.loads(line) for line in (out / "tune" / "search" / trial / "result.json").read_text().splitlines()]


def assert_one_completed_row_per_trial(out: Path, trials: list[str], steps: int, evals: int) -> list[dict]:
    rows = read_rows(out / "tune_results.csv")
    assert [r["trial"] for r in rows] == trials
    for row in rows:
        final = float(row["final_val_loss"])
        assert row["status"] == "completed" and math.isfinite(final), row
        assert int(row["steps"]) == steps and int(row["evals"]) == evals, row
        assert final == pytest.approx(json.loads((out / "trials" / row["trial"] / "eval.json").read_text())["val_loss"])
    return rows


@pytest.mark.ray
def test_grid_runs_four_trials_on_one_teacher_pass(grid):
    cfg, summary, scoring_calls = grid
    out = Path(cfg.output_dir)
    cache = out / "summary_cache"
    # One teacher pass: the cache module scored the train and the val split once each, nothing else did.
    assert scoring_calls == [str(cache), str(cache)]
    manifests = {split: json.loads((cache / split / "manifest.json").read_text()) for split in ("train", "val")}
    tokens = sum(m["tokens"] for m in manifests.values())
    assert summary["teacher_passes"] == 1 and summary["teacher_tokens_scored"] == summary["cache_tokens"] == tokens
    assert summary["tokens_if_scored_per_trial"] == 4 * tokens

    rows = read_rows(out / "tune_results.csv")
    assert [(int(r["k"]), float(r["beta"])) for r in rows] == [(2, 0.5), (2, 2.0), (8, 0.5), (8, 2.0)]
    for row in rows:
        assert row["status"] == "completed" and int(row["steps"]) == 2 and int(row["evals"]) == 2, row
        trial = out / "trials" / row["trial"]
        evaluation = json.loads((trial / "eval.json").read_text())
        assert float(row["final_val_loss"]) == pytest.approx(evaluation["val_loss"])
        assert float(row["best_val_loss"]) <= float(row["final_val_loss"])
        assert 0 < evaluation["val_loss"] < 7 and evaluation["kl_source"] == "summary"
        assert row["student"] == str(trial / "student") and (trial / "student" / "model.safetensors").is_file()
    # each trial trained with its own K (the teacher's tail mass beyond its top K is measured with it)
    for row in rows:  # Tune sees every validation, the last step's once the student is exported (eval.json)
        reported = tune_results(out, row["trial"])
        assert [r["step"] for r in reported] == [1, 2]
        assert reported[-1]["val_loss"] == pytest.approx(float(row["final_val_loss"]))
    tails = {int(r["k"]): json.loads((out / "trials" / r["trial"] / "eval.json").read_text())["tail_mass_teacher"]
             for r in rows}
    assert tails[8] < tails[2]
    assert summary["trials"] == summary["completed"] == 4 and summary["early_stopped"] == summary["error"] == 0

    best = min(rows, key=lambda r: float(r["final_val_loss"]))
    assert (summary["best"]["k"], summary["best"]["beta"]) == (int(best["k"]), float(best["beta"]))
    assert summary["best"]["student"] == best["student"]
    assert (out / "tune_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
def test_best_config_reruns_with_distill(grid, monkeypatch):
    from tailkd_ray.pipelines.distill import distill

    cfg, summary, _ = grid
    path = Path(summary["best"]["config"])
    best = load_config(path, ["train.max_steps=2"])
    assert (best.loss.k, best.loss.beta) == (summary["best"]["k"], summary["best"]["beta"])
    assert best.output_dir == str(Path(cfg.output_dir) / "best")
    assert best.summary.cache_dir == str(Path(cfg.output_dir) / "summary_cache")
    scorer = CountingScorer(monkeypatch)
    evaluation = distill(best)
    assert scorer.calls == []  # the search's cache is reused: no teacher pass
    assert evaluation["step"] == 2 and 0 < evaluation["val_loss"] < 7
    assert (Path(best.output_dir) / "student" / "config.json").is_file()


@pytest.mark.ray
def test_second_run_restores_without_rerunning(grid, monkeypatch):
    """A finished search is restored, not re-run: no teacher pass, no trial trains again (every trial file
    keeps its mtime), the same results."""
    from tailkd_ray.pipelines.tune import run_tune

    cfg, summary, _ = grid
    out = Path(cfg.output_dir)
    trial_files = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("*") if p.is_file()}
    before = read_rows(out / "tune_results.csv")
    scorer = CountingScorer(monkeypatch)
    again = run_tune(cfg)
    assert scorer.calls == [] and again["teacher_passes"] == 0 and again["teacher_tokens_scored"] == 0
    assert again["restored"] is True and again["trials"] == 4 and again["best"] == summary["best"]
    assert {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("*") if p.is_file()} == trial_files
    assert read_rows(out / "tune_results.csv") == before

    changed = search_config(out, cfg.teacher.model, (cfg.data.train, cfg.data.val), tune={"beta": [1.0]})
    with pytest.raises(ConfigError, match=r"holds a search with another config .*\n  tune.beta: "):
        run_tune(changed)


@pytest.mark.ray
def test_incompatible_cache_is_refused(grid, tiny_gpt2_dir):
    from tailkd_ray.pipelines.tune import run_tune

    cfg, _, _ = grid
    out = Path(cfg.output_dir)
    corpus = (cfg.data.train, cfg.data.val)
    other_m = search_config(out / "other_m", cfg.teacher.model, corpus,
                            summary={"top_m": 16, "cache_dir": str(out / "summary_cache")})
    with pytest.raises(ValueError, match=r"(?s)summary cache .*summary_cache/train was computed from other inputs.*"
                                         r"top_m: cache has 8, config gives 16"):
        run_tune(other_m)
    other_teacher = search_config(out / "other_teacher", tiny_gpt2_dir, corpus, student={"config": {"n_layer": 1}},
                                  summary={"cache_dir": str(out / "summary_cache")})
    with pytest.raises(ValueError, match=r"teacher.config_sha256: cache has"):
        run_tune(other_teacher)
    too_small = search_config(out / "too_small", cfg.teacher.model, corpus, tune={"k": [2, 16], "beta": [1.0]})
    with pytest.raises(ConfigError, match=r"max\(tune.k\) = 16 exceeds summary.top_m = 8"):
        run_tune(too_small)


@pytest.mark.ray
def test_asha_stops_trials_early(grid, tiny_llama_dir, corpus, tmp_path):
    """Grace 1 step, reduction factor 2, 3 steps, a validation every step, two trials at a time, the grid's
    cache reused. β = 8 pulls the student hard towards the (random) teacher's tail, so both β = 8 trials have
    the worst val_loss at step 1; the second pair of trials starts only when one of the first pair ends, i.e.
    after both first-pair results are recorded at the step-1 rung, so K = 8, β = 8 lands above that rung's
    median and is stopped whatever the arrival order. Tune's stop reaches a trial asynchronously: a stopped
    trial may validate a step or two past its rung before it is killed (CI once saw K = 8, β = 0.5 stopped at
    the step-2 rung after its step-3 validation), so what a stop guarantees is no export, not fewer steps."""
    from tailkd_ray.pipelines.tune import run_tune

    cfg, _, _ = grid
    cache = str(Path(cfg.output_dir) / "summary_cache")
    asha = search_config(tmp_path, tiny_llama_dir, corpus, summary={"cache_dir": cache},
                         train={"num_workers": 1, "max_steps": 3},
                         tune={"beta": [0.5, 8.0], "max_concurrent": 2, "asha": True, "grace_period": 1,
                               "reduction_factor": 2})
    summary = run_tune(asha)
    assert summary["teacher_passes"] == 0
    rows = {r["trial"]: r for r in read_rows(tmp_path / "tune_results.csv")}
    assert len(rows) == 4 and summary["error"] == 0, rows
    assert rows["k8_beta8"]["status"] == "early_stopped", rows
    for name, row in rows.items():
        trial = tmp_path / "trials" / name
        if row["status"] == "completed":  # its final validation reached Tune, after the export
            assert int(row["evals"]) == 3 and int(row["steps"]) == 3 and (trial / "student").is_dir(), row
            assert tune_results(tmp_path, name)[-1]["step"] == 3
        else:
            assert row["status"] == "early_stopped" and int(row["evals"]) <= 3 and int(row["steps"]) <= 3, row
            assert row["student"] == "" and not (trial / "eval.json").exists()
    assert rows["k2_beta0.5"]["status"] == "completed"  # the best trial is never below a rung's median
    assert summary["early_stopped"] == sum(r["status"] == "early_stopped" for r in rows.values())
    assert summary["best"]["student"] in {r["student"] for r in rows.values() if r["status"] == "completed"}


@pytest.mark.ray
@pytest.mark.parametrize("eval_every", [2, 3], ids=["eval_every_eq_max_steps", "eval_every_gt_max_steps"])
def test_trials_validating_only_at_their_last_step_report_it(grid, tiny_llama_dir, corpus, tmp_path, eval_every):
    """train.eval_every >= train.max_steps: a trial's only validation is its last step's, which it reports to
    Tune after its export (Tune's metric check used to abort such a search). ASHA as by default (its grace
    period, train.eval_every, leaves nothing to stop early); the grid's cache is reused."""
    from tailkd_ray.pipelines.tune import run_tune

    cfg, _, _ = grid
    final_only = search_config(tmp_path, tiny_llama_dir, corpus,
                               summary={"cache_dir": str(Path(cfg.output_dir) / "summary_cache")},
                               train={"num_workers": 1, "eval_every": eval_every}, tune={"k": [2], "asha": True})
    summary = run_tune(final_only)
    assert summary["teacher_passes"] == 0 and summary["trials"] == summary["completed"] == 2
    rows = assert_one_completed_row_per_trial(tmp_path, ["k2_beta0.5", "k2_beta2"], steps=2, evals=1)
    for row in rows:
        reported = tune_results(tmp_path, row["trial"])
        assert [(r["step"], r["val_loss"]) for r in reported] == [(2, pytest.approx(float(row["final_val_loss"])))]
    assert summary["best"]["student"] == min(rows, key=lambda r: float(r["final_val_loss"]))["student"]


@pytest.mark.ray
def test_a_search_on_hugging_face_datasets_scores_them_in_its_one_teacher_pass(ray_session, tiny_llama_dir, corpus,
                                                                              tmp_path):
    """``run_tune(cfg, train_data=, val_data=)``: the search's one teacher pass reads the datasets (the cache holds
    the blocks they pack into) and its trial trains on that cache."""
    import datasets

    from tailkd_ray.data.splits import train_val_datasets, with_in_memory_data
    from tailkd_ray.pipelines.tune import run_tune

    train, val = (datasets.Dataset.from_dict({"text": [line for line in path.read_text().split(". ") if line]})
                  for path in (corpus[0] / "a.txt", corpus[1] / "b.txt"))
    cfg = search_config(tmp_path, tiny_llama_dir, corpus, data={"train": None, "val": None},
                        train={"num_workers": 1, "max_steps": 1}, tune={"k": [2], "beta": [1.0]})
    summary = run_tune(cfg, train_data=train, val_data=val)
    assert summary["teacher_passes"] == 1 and summary["trials"] == summary["completed"] == 1, summary
    _, _, report = train_val_datasets(*with_in_memory_data(cfg, train, val))
    assert report.documents == len(train) + len(val) and report.val_blocks > 0
    assert summary["cache_tokens"] == report.blocks * SEQ_LEN
    assert (Path(summary["best"]["student"]) / "config.json").is_file()
    with pytest.raises(ConfigError, match=r"data.val \(.*\) and val_data .* both given"):
        run_tune(search_config(tmp_path, tiny_llama_dir, corpus), val_data=val)


@pytest.mark.ray
def test_cli_tune_example_runs_as_written(ray_session, tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """The help's `tailkd tune` example on jobs/configs/smoke.yaml, which validates only at its last step, with
    the smoke config's teacher, corpus and output_dir pointed at test files (as test_job_submit.py does)."""
    import shlex

    from tailkd_ray.cli import EXAMPLES, main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the example names its config relative to the repo
    program, *args = shlex.split(EXAMPLES["tune"])
    smoke = load_config(args[args.index("--config") + 1])
    assert program == "tailkd" and smoke.train.eval_every == smoke.train.max_steps == 5
    test_files = [f"teacher.model={tiny_llama_dir}", f"data.train={corpus[0]}", f"data.val={corpus[1]}",
                  "data.tokenizer_actors=1", "student.config={num_hidden_layers: 1}", f"output_dir={tmp_path}"]
    assert main(args + test_files) == 0
    assert_one_completed_row_per_trial(tmp_path, ["k5_beta1", "k5_beta2", "k10_beta1", "k10_beta2"], steps=5, evals=1)
    assert (tmp_path / "best_config.yaml").is_file()


def test_trials_that_fit_leaves_a_cpu_for_each_trials_data():
    from tailkd_ray.pipelines.tune import trials_that_fit

    cfg = from_dict({"train": {"num_workers": 2}})
    assert trials_that_fit(cfg, {"CPU": 8.0}) == 2  # 2 workers + 1 data CPU (+ the driver's 0.01) per trial
    assert trials_that_fit(cfg, {"CPU": 9.1}) == 3
    gpu = from_dict({"train": {"num_workers": 4, "use_gpu": True, "resources_per_worker": {"tailkd_training": 1}}})
    assert trials_that_fit(gpu, {"CPU": 16.0, "GPU": 8.0, "tailkd_training": 8.0}) == 2
    assert trials_that_fit(gpu, {"CPU": 16.0, "GPU": 8.0}) == 0  # no training node


def test_param_space_grid_and_random():
    from ray import tune

    from tailkd_ray.pipelines.tune import param_space

    grid = param_space(from_dict({"tune": {"k": [10, 5, 10], "beta": [2, 0]}}))
    assert grid == {"k": tune.grid_search([5, 10]), "beta": tune.grid_search([0.0, 2.0])}
    space = param_space(from_dict({"tune": {"search": "random", "k": [4, 16], "beta": [0.1, 10]}}))
    ks = [space["k"].sample() for _ in range(200)]
    betas = [space["beta"].sample() for _ in range(200)]
    assert all(isinstance(k, int) and 4 <= k <= 16 for k in ks) and {4, 16} <= set(ks)
    assert all(0.1 <= b <= 10 for b in betas)
    assert 0.3 < sum(b < 1 for b in betas) / len(betas) < 0.7  # log-uniform: half the draws below 1


def test_search_config_checks(tmp_path):
    from tailkd_ray.pipelines.tune import search_config as effective

    base = {"output_dir": str(tmp_path / "out"), "teacher": {"model": "t"}, "data": {"train": "x"},
            "summary": {"top_m": 32}, "tune": {"k": [5, 10]}}
    cfg = effective(from_dict(base))
    assert cfg.summary.cache_dir == str(tmp_path / "out" / "summary_cache") and Path(cfg.output_dir).is_absolute()
    assert effective(from_dict({**base, "summary": {"top_m": 32, "cache_dir": "s3://b/c"}})).summary.cache_dir == "s3://b/c"
    for change, message in [({"summary": {"top_m": None}}, "set summary.top_m"),
                            ({"loss": {"kind": "kd"}}, "set loss.kind: tad"),
                            ({"teacher": {"model": None}}, "set teacher.model"),
                            ({"data": {"train": "x", "val_fraction": 0.0}}, "needs validation data")]:
        with pytest.raises(ConfigError, match=message):
            effective(from_dict({**base, **change}))
    no_tail = {"summary": {"top_m": 32, "tail_samples": 0}, "tune": {"k": [5, 32], "beta": [0.5, 2]}}
    with pytest.raises(ConfigError, match=r"tune.beta = \[0.5, 2\] is searched, but at K = max\(tune.k\) = "
                                          r"summary.top_m = 32 with summary.tail_samples = 0 .* set "
                                          r"summary.tail_samples > 0"):
        effective(from_dict({**base, **no_tail}))
    for change in ({"tune": {"k": [5, 32], "beta": [2]}}, {"summary": {"top_m": 32, "tail_samples": 1}},
                   {"tune": {"k": [5, 16], "beta": [0.5, 2]}}):  # β not searched, or β matters
        effective(from_dict({**base, **no_tail, **change}))
    with pytest.raises(ConfigError, match="tune.metric must be one of"):
        from_dict({"tune": {"metric": "top1_agreement"}})
    with pytest.raises(ConfigError, match="every tune.beta must be > 0"):
        from_dict({"tune": {"search": "random", "beta": [0, 1]}})
    with pytest.raises(ConfigError, match="tune.reduction_factor must be > 1"):
        from_dict({"tune": {"reduction_factor": 1}})


def test_results_csv_and_plots_for_grid_and_random(tmp_path):
    from tailkd_ray.pipelines.tune import plot_heatmap, write_results_csv

    rows = [{"trial": f"k{k}_beta{b:g}", "k": k, "beta": b, "status": status, "steps": 4, "evals": 2,
             "final": final, "best": final, "student": "", "error": "boom" if status == "error" else ""}
            for k, b, status, final in [(2, 0.5, "completed", 5.1), (2, 2.0, "early_stopped", 5.4),
                                        (8, 0.5, "completed", 5.0), (8, 2.0, "error", float("nan"))]]
    write_results_csv(rows, tmp_path / "r.csv", "kl_to_teacher")
    written = read_rows(tmp_path / "r.csv")
    assert list(written[0]) == ["trial", "k", "beta", "status", "steps", "evals", "final_kl_to_teacher",
                                "best_kl_to_teacher", "student", "error"]
    assert [r["status"] for r in written] == ["completed", "early_stopped", "completed", "error"]
    for search in ("grid", "random"):
        plot_heatmap(rows, tmp_path / f"{search}.png", "kl_to_teacher", search)
        assert (tmp_path / f"{search}.png").read_bytes()[:4] == b"\x89PNG"


def test_search_without_a_completed_trial_is_one_line_quoting_the_first_error(tmp_path):
    from tailkd_ray.errors import ConfigError as OurConfigError, SearchError
    from tailkd_ray.pipelines.tune import trial_error_line, write_results

    # Ray hands a trial's failure over wrapped; the row keeps our message, not Ray's first line
    wrapped = RuntimeError("ray.exceptions.RayTaskError: the worker died")
    wrapped.__cause__ = OurConfigError("loss.k (9) must be <= summary.top_m (8)")
    assert trial_error_line(wrapped) == "loss.k (9) must be <= summary.top_m (8)"
    assert trial_error_line(RuntimeError("first line\nsecond line")) == "first line"
    assert trial_error_line(None) == ""

    cfg = from_dict({"output_dir": str(tmp_path)})
    rows = [{"trial": f"k{k}_beta1", "k": k, "beta": 1.0, "status": status, "steps": 2, "evals": 0,
             "final": float("nan"), "best": float("nan"), "student": "",
             "error": f"boom {k}" if status == "error" else ""}
            for k, status in [(2, "early_stopped"), (4, "error"), (8, "error")]]
    with pytest.raises(SearchError) as caught:
        write_results(cfg, rows)
    message = str(caught.value)
    assert "(2 of 3 errored, 1 stopped early); first error (k4_beta1): boom 4" in message
    assert str(tmp_path / "tune_results.csv") in message and "\n" not in message
    assert not (tmp_path / "best_config.yaml").exists()
