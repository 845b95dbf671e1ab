"""The `tailkd` command line: help, config printing, overrides and clear config errors."""

from __future__ import annotations

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
    assert "loss.kind must be one of" in capsys.readouterr().err


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


def test_bad_corpus_is_a_clear_error_not_a_traceback(ray_session, tiny_tokenizer_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("loss: {kind: clm}\n")
    code = main(["distill", "--config", str(config), "student.model=/nonexistent", f"data.train={tmp_path}/none-*.txt", f"data.tokenizer={tiny_tokenizer_dir}",
                 f"output_dir={tmp_path}/out"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("tailkd distill: ") and "none-*.txt" in err
