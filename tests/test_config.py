"""Config loading, dotted overrides and every validation error (named key, allowed values)."""

from __future__ import annotations

import logging

import pytest
import yaml

from tailkd_ray.config import (
    Config, ConfigError, apply_overrides, from_dict, load_config, reference_markdown, to_dict,
)


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_valid():
    config = load_config()
    assert isinstance(config, Config) and config.loss.kind == "tad" and config.summary.top_m == 64


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, {"loss": {"k": 5, "beta": 2}, "summary": {"top_m": 32}, "train": {"lr": 3e-4}})
    config = load_config(path, ["loss.beta=0.5", "summary.cache_dir=/tmp/cache", "tune.k=[2, 4]",
                                "summary.top_m=null", "output_dir=runs/x"])
    assert config.loss.k == 5 and config.loss.beta == 0.5 and isinstance(config.loss.beta, float)
    assert config.summary.cache_dir == "/tmp/cache" and config.summary.top_m is None
    assert config.tune.k == [2, 4] and config.train.lr == 3e-4 and config.output_dir == "runs/x"


def test_round_trip_through_dict():
    config = load_config(None, ["loss.k=7", "teacher.resources={tailkd_inference: 1}"])
    assert from_dict(to_dict(config)) == config


@pytest.mark.parametrize("override, match", [
    (["loss.kind=foo"], "loss.kind must be one of tad, kd, rkl, topk, clm; got 'foo'"),
    (["loss.bogus=1"], "unknown key loss.bogus in section 'loss'; allowed: beta, chunk_tokens"),
    (["nosuch.key=1"], "unknown key nosuch"),
    (["loss=3"], "loss must be a mapping"),
    (["loss.k=0"], "loss.k must be >= 1"),
    (["loss.k=2.5"], "loss.k must be int"),
    (["loss.beta=-1"], "loss.beta must be >= 0"),
    (["loss.temperature=0"], "loss.temperature must be > 0"),
    (["loss.normalize=maybe"], "loss.normalize must be bool"),
    (["loss.k=100"], "loss.k = 100 exceeds summary.top_m = 64"),
    (["loss.kind=rkl"], "rkl needs the full teacher distribution"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["train.strategy=zero"], "train.strategy must be one of fsdp, ddp, deepspeed"),
    (["train.num_workers=0"], "train.num_workers must be > 0"),
    (["train.max_steps=true"], "train.max_steps must be int"),
    (["teacher.max_actors=1", "teacher.min_actors=2"], "teacher.max_actors \\(1\\) must be >= teacher.min_actors"),
    (["teacher.resources={gpu_node: -1}"], "teacher.resources must map resource names to positive amounts"),
    (["summary.top_m=0"], "summary.top_m must be > 0"),
    (["summary.logp_dtype=bfloat16"], "summary.logp_dtype must be one of float16, float32"),
    (["data.format=csv"], "data.format must be one of text, jsonl, parquet, tokens"),
    (["data.val_fraction=1.5"], "data.val_fraction must be in"),
    (["student.model=x", "student.config={num_hidden_layers: 2}"], "either student.model or student.config"),
    (["tune.k=[]"], "tune.k must be a non-empty list"),
    (["tune.beta=[-1]"], "tune.beta must be a non-empty list of finite numbers >= 0"),
    (["loss.k"], "not of the form section.key=value"),
])
def test_validation_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_tad_with_k_equal_to_top_m_and_no_tail_samples_warns_that_beta_has_no_effect(caplog):
    trap = ["summary.top_m=16", "summary.tail_samples=0", "loss.k=16", "loss.beta=2"]
    with caplog.at_level(logging.WARNING, logger="tailkd_ray.config"):
        load_config(None, trap)
        assert "loss.k = summary.top_m = 16 with summary.tail_samples = 0" in caplog.text
        assert "loss.beta = 2 has no effect" in caplog.text and "set summary.tail_samples > 0" in caplog.text
        caplog.clear()
        for fine in (["summary.tail_samples=4"], ["loss.k=8"], ["loss.kind=topk"]):
            load_config(None, trap + fine)
        assert caplog.text == ""


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory; pass the path of a YAML file "
                                          f"inside it, e.g. {tmp_path / 'list.yaml'}"):
        load_config(tmp_path)


def test_exponent_floats_are_numbers(tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string; floats are read as YAML 1.2 does and numeric strings accepted."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: '5E-2'\ntune:\n  beta: [1e-1, 2, 3.5e+0]\n")
    config = load_config(path, ["loss.temperature=2e0"])
    assert config.train.lr == 1e-4 and config.train.weight_decay == 0.05 and config.loss.temperature == 2.0
    assert config.tune.beta == [0.1, 2, 3.5]
    with pytest.raises(ConfigError, match="train.max_steps must be int, got 1000.0"):
        load_config(None, ["train.max_steps=1e3"])  # an int field takes integers only
    with pytest.raises(ConfigError, match="train.lr must be a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])


@pytest.mark.parametrize("override, match", [
    (["loss.beta=.nan"], "loss.beta must be a finite number, got nan"),
    (["train.lr=.inf"], "train.lr must be a finite number, got inf"),
    (["loss.temperature=-.inf"], "loss.temperature must be a finite number, got -inf"),
    (["data.val_fraction=.NaN"], "data.val_fraction must be a finite number"),
    (["loss.weight='nan'"], "loss.weight must be a finite number, got 'nan'"),
    (["tune.beta=[1, .nan]"], "tune.beta must be a non-empty list of finite numbers"),
    (["teacher.resources={tailkd_inference: .inf}"], "teacher.resources must map resource names to positive"),
])
def test_nan_and_inf_are_refused_at_load_time(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_yaml_syntax_errors_are_one_line_naming_file_or_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  max_steps: [1, 2\nloss: {k: 3}\n")
    with pytest.raises(ConfigError, match=rf"config file {path} is not valid YAML: expected ',' or '\]', but got "
                                          rf"':' at line 4, column 5 \(while parsing a flow sequence from line 3\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'tune.k=\[5, 10': the value '\[5, 10' is not valid YAML: .* at "
                                          r"line 1, column 7"):
        load_config(None, ["tune.k=[5, 10"])


def test_export_dtype():
    assert load_config().export.dtype == "float32"
    assert load_config(None, ["export.dtype=bfloat16"]).export.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="export.dtype must be one of float32, bfloat16, float16; got 'int8'"):
        load_config(None, ["export.dtype=int8"])


def test_teacher_batch_in_tokens_or_sequences():
    assert load_config(None, ["teacher.batch_size=3"]).teacher.sequences_per_batch(512) == 3
    cfg = load_config(None, ["teacher.tokens_per_batch=4000", "data.seq_len=1024"])
    assert cfg.teacher.sequences_per_batch(cfg.data.seq_len) == 3  # whole sequences only: 3 × 1024 <= 4000
    with pytest.raises(ConfigError, match=r"teacher.tokens_per_batch = 1000 is below data.seq_len = 1024.*"
                                          r"raise it to >= 1024 or set it to null"):
        load_config(None, ["teacher.tokens_per_batch=1000", "data.seq_len=1024"])


def test_override_into_scalar_is_refused():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"loss": 3}, ["loss.k.x=1"])


def test_reference_documents_every_field():
    text = reference_markdown()
    for section, values in to_dict(Config()).items():
        keys = [section] if not isinstance(values, dict) or section == "output_dir" else [f"{section}.{k}" for k in values]
        for key in keys:
            assert f"`{key}`" in text, key


def test_relative_local_paths_become_absolute(tmp_path):
    from tailkd_ray.config import resolve_local_paths

    (tmp_path / "teacher").mkdir()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("x")
    config = load_config(None, ["teacher.model=teacher", "data.train=corpus/*.txt", "data.val=s3://bucket/val",
                                "student.model=Org/hub-model", "output_dir=runs/out", "summary.cache_dir=cache"])
    resolve_local_paths(config, tmp_path)
    assert config.teacher.model == str(tmp_path / "teacher")
    assert config.data.train == str(tmp_path / "corpus" / "*.txt")
    assert config.data.val == "s3://bucket/val" and config.student.model == "Org/hub-model"
    assert config.output_dir == str(tmp_path / "runs" / "out") and config.summary.cache_dir == str(tmp_path / "cache")
