"""The `tailkd` command line: help, config printing, overrides, and user errors (the TailKDError family, also
from inside Ray workers) as one line with exit status 2, the traceback only with --debug / TAILKD_DEBUG=1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tailkd_ray.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", [*COMMANDS, "demo", "config"])
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "loss.k=5", "train.strategy=ddp"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loss"]["k"] == 5 and printed["train"]["strategy"] == "ddp"


def test_invalid_override_exits_2_with_message(capsys):
    assert main(["config", "loss.kind=nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tailkd config: invalid config: loss.kind must be one of") and err.count("\n") == 1


def test_subcommands_require_config():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill"])


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "tailkd_ray", "config", "--reference"], capture_output=True,
                         text=True, check=True).stdout
    assert "`loss.beta`" in out


def test_readme_config_reference_is_current():
    """README's config reference is the generated one (regenerate with `tailkd config --reference`)."""
    from pathlib import Path

    from tailkd_ray.config import reference_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == reference_markdown()


def test_bad_corpus_is_a_clear_error_not_a_traceback(ray_session, tiny_tokenizer_dir, tiny_llama_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("loss: {kind: clm}\n")
    code = main(["distill", "--config", str(config), f"student.model={tiny_llama_dir}", f"data.train={tmp_path}/none-*.txt", f"data.tokenizer={tiny_tokenizer_dir}",
                 f"output_dir={tmp_path}/out"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("tailkd distill: ") and "none-*.txt" in err and err.count("\n") == 1


@pytest.fixture
def cache_at_another_temperature(tiny_llama_dir, tmp_path):
    """argv of `tailkd score` at loss.temperature 2 over a complete cache scored at τ = 1 (nothing else differs)."""
    from tailkd_ray.config import load_config
    from tailkd_ray.teacher.cache import cache_identity, teacher_identity

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    overrides = [f"teacher.model={tiny_llama_dir}", f"data.train={corpus}", f"summary.cache_dir={tmp_path}/cache",
                 f"output_dir={tmp_path}/out", "data.seq_len=64"]
    cfg = load_config(None, overrides)
    for split in ("train", "val"):
        (tmp_path / "cache" / split).mkdir(parents=True)
        identity = cache_identity(cfg, teacher_id=teacher_identity(str(tiny_llama_dir)), split=split)
        manifest = {**identity, "complete": True, "shards": {}, "rows": 0, "tokens": 0}
        (tmp_path / "cache" / split / "manifest.json").write_text(json.dumps(manifest))
    return ["score", "--config", str(tmp_path / "none.yaml"), *overrides, "loss.temperature=2.0"]


@pytest.mark.ray
def test_bad_cache_is_one_line_and_exit_2(ray_session, cache_at_another_temperature, tmp_path, capsys):
    (tmp_path / "none.yaml").write_text("{}\n")
    assert main(cache_at_another_temperature) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tailkd score: summary cache {tmp_path}/cache/train was computed from other inputs")
    assert "temperature: cache has 1.0, config gives 2.0. To fix: its teacher log-probs are at temperature 1.0" in err


@pytest.mark.ray
def test_debug_flag_or_environment_shows_the_traceback(ray_session, cache_at_another_temperature, tmp_path, capsys,
                                                       monkeypatch):
    (tmp_path / "none.yaml").write_text("{}\n")
    assert main(["--debug", *cache_at_another_temperature]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "tailkd_ray.errors.CacheError: " in err
    assert err.splitlines()[-1].startswith("tailkd score: summary cache ")
    monkeypatch.setenv("TAILKD_DEBUG", "1")
    assert main(cache_at_another_temperature) == 2
    assert capsys.readouterr().err.startswith("Traceback (most recent call last)")


@pytest.mark.ray
def test_vocabulary_mismatch_in_a_teacher_actor_is_one_line(ray_session, tiny_llama_dir, tmp_path, capsys,
                                                            monkeypatch):
    """An error raised inside a Ray Data actor (the teacher pool's id check) reaches the driver wrapped by Ray;
    the CLI still prints the original's one line."""
    import numpy as np
    import ray.data

    import tailkd_ray.pipelines.score
    from tailkd_ray.teacher.pool import score_dataset

    def score_foreign_ids(cfg):  # a corpus tokenized for a larger vocabulary than the teacher's 320
        blocks = np.arange(2 * 9).reshape(2, 9) + 310
        return score_dataset(ray.data.from_items([{"input_ids": row} for row in blocks]), cfg).take_all()

    monkeypatch.setattr(tailkd_ray.pipelines.score, "score", score_foreign_ids)
    (tmp_path / "none.yaml").write_text("{}\n")
    code = main(["score", "--config", str(tmp_path / "none.yaml"), f"teacher.model={tiny_llama_dir}", "data.seq_len=8",
                 "summary.top_m=8", "loss.k=4"])
    assert code == 2
    # Ray Data logs its progress and "an exception was raised" lines to stderr too (and, under pytest, "Logging
    # error" dumps when its handler still holds an earlier test's captured stream): check the CLI's own output.
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith("tailkd ")] == lines[-1:]
    assert lines[-1].startswith("tailkd score: block_hash=") and "token id 320 at position 1" in lines[-1]
    assert "is outside the teacher's vocabulary [0, 320)" in lines[-1]


@pytest.mark.ray
def test_eval_of_a_runs_student_leaves_the_runs_eval_json(ray_session, tiny_llama_dir, builtin_corpus, tmp_path,
                                                          capsys):
    """`tailkd eval` pointed at a run's output_dir writes beside the student (student_eval.json), never over the
    run's own eval.json."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "student")
    (run / "eval.json").write_text('{"val_loss": 1.0}\n')
    _, val_dir = builtin_corpus
    corpus = tmp_path / "val.txt"
    corpus.write_text("".join(p.read_text() for p in sorted(val_dir.glob("*.txt")))[:3000])
    (tmp_path / "none.yaml").write_text("{}\n")
    assert main(["eval", "--config", str(tmp_path / "none.yaml"), f"teacher.model={tiny_llama_dir}",
                 f"data.val={corpus}", "data.seq_len=32", f"output_dir={run}", "--student", str(run / "student")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (run / "eval.json").read_text() == '{"val_loss": 1.0}\n'
    written = json.loads((run / "student_eval.json").read_text())
    assert printed["eval_json"] == str(run / "student_eval.json") and written["kl_to_teacher"] == pytest.approx(0, abs=1e-5)
