"""Fail before work (pipelines/preflight.py): a bad student config, an unusable output_dir, a teacher without a
tokenizer and a placement whose stages cannot run together are refused in one line before any corpus is read
(the corpus paths below match no file, so any corpus work would fail with another message)."""

from __future__ import annotations

import shutil

import pytest

from tailkd_ray.cli import main
from tailkd_ray.config import from_dict
from tailkd_ray.errors import PlacementError
from tailkd_ray.pipelines.preflight import placement_phases
from tailkd_ray.placement import require_together

LOCAL_8_CPUS = [{"Alive": True, "NodeID": "a" * 16, "NodeManagerAddress": "127.0.0.1",
                 "Resources": {"CPU": 8.0, "node:__internal_head__": 1.0}}]


def _argv(command: str, tmp_path, teacher, *overrides: str) -> list[str]:
    (tmp_path / "none.yaml").write_text("{}\n")
    return [command, "--config", str(tmp_path / "none.yaml"), f"teacher.model={teacher}",
            f"data.train={tmp_path}/missing/*.txt", f"output_dir={tmp_path}/out", "data.seq_len=16",
            "summary.top_m=16", "summary.tail_samples=2", "loss.k=8", *overrides]


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tailkd ")]
    assert len(lines) == 1 and lines[0].startswith(f"tailkd {command}: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["config", "distill", "score"])
@pytest.mark.parametrize("override, match", [
    ("student.config.num_hidden_layers=0", "student.config.num_hidden_layers must be >= 1, got 0"),
    ("student.config.num_attention_heads=3", "is not a multiple of the number of attention heads"),
])
def test_bad_student_config_is_refused_before_any_corpus_work(command, override, match, tiny_llama_dir, tmp_path,
                                                              capsys):
    extra = [f"summary.cache_dir={tmp_path}/cache"] if command == "score" else []
    assert main(_argv(command, tmp_path, tiny_llama_dir, override, *extra)) == 2
    assert match in _one_line(capsys, command)
    assert not (tmp_path / "out").exists()  # no data_report.json: nothing was read


@pytest.mark.parametrize("output_dir, match", [
    ("afile", "is a file; set output_dir to a directory path"),
    ("afile/run", "would be created under the file"),
])
def test_output_dir_that_cannot_be_a_directory_is_refused_before_work(output_dir, match, tiny_llama_dir, tmp_path,
                                                                      capsys):
    (tmp_path / "afile").write_text("not a directory\n")
    assert main([*_argv("distill", tmp_path, tiny_llama_dir), f"output_dir={tmp_path / output_dir}"]) == 2
    assert match in _one_line(capsys, "distill")


def test_teacher_without_tokenizer_says_to_set_data_tokenizer(tiny_llama_dir, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, teacher / name)
    for kind in ("summary.top_m=16", "summary.top_m=null"):  # streamed teacher pool, co-located teacher
        assert main([*_argv("distill", tmp_path, teacher), kind]) == 2
        assert "set data.tokenizer" in _one_line(capsys, "distill")


def test_nan_in_the_config_is_one_line(capsys):
    assert main(["config", "loss.beta=.nan"]) == 2
    assert "loss.beta must be a finite number, got nan" in _one_line(capsys, "config")


def _cfg(**sections):
    base = {"teacher": {"model": "teacher"}, "summary": {"top_m": 16}, "loss": {"k": 8}}
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values} if isinstance(values, dict) else values
    return from_dict(base)


@pytest.mark.parametrize("command, sections, phase", [
    ("distill", {"train": {"num_workers": 7}}, "training"),  # 7 workers + 1 teacher actor + 1 data CPU > 8
    ("distill", {"train": {"num_workers": 8}, "summary": {"top_m": None}, "loss": {"kind": "kd"}}, "training"),
    ("distill", {"train": {"num_workers": 8}, "summary": {"cache_dir": "cache"}}, "training"),
    ("tune", {"train": {"num_workers": 8}}, "one Tune trial"),
    ("score", {"teacher": {"min_actors": 8, "max_actors": 8}}, "scoring into the summary cache"),
])
def test_stages_that_cannot_run_together_are_refused_in_every_mode(command, sections, phase):
    cfg = _cfg(**sections)
    with pytest.raises(PlacementError) as error:
        for name, demands in placement_phases(cfg, command).items():
            require_together(demands, allow_autoscale=False, nodes=LOCAL_8_CPUS, phase=name)
    message = str(error.value)
    assert message.startswith(f"{phase}: ") and "but the alive nodes have {CPU: 8} in all" in message, message


@pytest.mark.parametrize("command, sections", [
    ("distill", {"train": {"num_workers": 6}}),  # 6 + 1 + 1 = 8
    ("distill", {"train": {"num_workers": 7}, "summary": {"cache_dir": "cache"}}),  # teacher before training
    ("distill", {"train": {"num_workers": 7}, "summary": {"top_m": None}, "loss": {"kind": "kd"}}),  # no pool
    ("tune", {"train": {"num_workers": 6}}),
])
def test_stages_that_fit_together_pass(command, sections):
    for name, demands in placement_phases(_cfg(**sections), command).items():
        require_together(demands, allow_autoscale=False, nodes=LOCAL_8_CPUS, phase=name)


def test_autoscaling_logs_what_the_stages_need_together(caplog):
    cfg = _cfg(train={"num_workers": 8}, autoscaling=True)
    for name, demands in placement_phases(cfg, "distill").items():
        require_together(demands, allow_autoscale=cfg.autoscaling, nodes=LOCAL_8_CPUS, phase=name)
    assert "need {CPU: 10} together" in caplog.text and "Waiting for the autoscaler" in caplog.text


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_trainer_taking_every_cpu_fails_fast_instead_of_hanging(ray_session, tiny_llama_dir, tmp_path, capsys):
    """Issue 18's hang: as many trainer workers as the local Ray has CPUs left the teacher actor waiting forever.
    Now one line naming both demands and the capacity, before any corpus work."""
    cpus = int(ray_session.cluster_resources()["CPU"])
    assert main(_argv("distill", tmp_path, tiny_llama_dir, f"train.num_workers={cpus}")) == 2
    line = _one_line(capsys, "distill")
    assert f"{cpus} trainer workers ({{CPU: 1}} each) + 1 teacher actors ({{CPU: 1}} each)" in line, line
    assert f"the alive nodes have {{CPU: {cpus}}} in all" in line and "lower train.num_workers" in line
    assert not (tmp_path / "out" / "data_report.json").exists()

