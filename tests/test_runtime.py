"""Logging and Ray's verbosity: quiet by default, everything back at debug."""

from __future__ import annotations

import logging

import pytest

from tailkd_ray.runtime import configure_logging, is_quiet, ray_env


def test_quiet_unless_debug(monkeypatch):
    for name in ("RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    assert configure_logging("info") and is_quiet()
    assert ray_env(True)["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert not configure_logging("debug") and not is_quiet()
    assert "RAY_DATA_LOG_LEVEL" not in ray_env(False)
    assert ray_env(False)["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # no doubled worker prints either way
    logging.getLogger("tailkd_ray").setLevel(logging.NOTSET)


def test_other_libraries_info_only_at_debug():
    root = logging.getLogger()
    before = root.level
    try:
        configure_logging("info")  # ours at INFO, e.g. absl's "Using default tokenizer." (rouge-score) not
        assert logging.getLogger("tailkd_ray.pipelines.demo").isEnabledFor(logging.INFO)
        assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
        assert logging.getLogger("absl").isEnabledFor(logging.WARNING)
        configure_logging("debug")
        assert logging.getLogger("absl").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(before)
        logging.getLogger("tailkd_ray").setLevel(logging.NOTSET)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("chatty")
