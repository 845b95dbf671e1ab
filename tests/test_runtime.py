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


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("chatty")
