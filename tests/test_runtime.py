"""Logging and Ray's verbosity: quiet by default, everything back at debug."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from tailkd_ray.runtime import configure_logging, deepspeed_env, is_quiet, ray_env


def test_quiet_unless_debug(monkeypatch):
    for name in ("RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    assert configure_logging("info") and is_quiet()
    assert ray_env(True)["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert not configure_logging("debug") and not is_quiet()
    assert "RAY_DATA_LOG_LEVEL" not in ray_env(False)
    assert ray_env(False)["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # no doubled worker prints either way
    logging.getLogger("tailkd_ray").setLevel(logging.NOTSET)


def test_quiet_mode_drops_rays_harmless_notices_only(monkeypatch):
    """Ray's harmless notices go (the actor-arguments notice, the raylet's worker count, the traceback of a cancelled
    Ray Data file listing); other lines and other threads' exceptions stay."""
    import re
    import threading

    from tailkd_ray.runtime import quiet_worker_setup

    skip = re.compile(ray_env(True)["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert skip.search("WARNING: 20 PYTHON worker processes have been started on node: d1e2 with address: 192.0.2.2, "
                       "which is 10x the maximum expected startup concurrency (2).")
    assert skip.search("Actor with class name: 'MapWorker(MapBatches(_TokenizeAndPack))' and ID: '67' has constructor "
                       "arguments in the object store and max_restarts > 0.")
    assert not skip.search("train step 50/200  loss 5.87") and not skip.search("WARNING: out of memory on node")
    assert "RAY_DEDUP_LOGS_SKIP_REGEX" not in ray_env(False)

    reported = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append((args.thread.name, args.exc_type)))
    quiet_worker_setup()

    def run(name, error):
        def fail():
            raise error

        thread = threading.Thread(target=fail, name=name)
        thread.start()
        thread.join()

    run("pool-2/completion-signaler", InterruptedError())  # Ray Data's cancelled listing
    run("pool-2/completion-signaler", ValueError("real"))
    run("other", InterruptedError())
    assert reported == [("pool-2/completion-signaler", ValueError), ("other", InterruptedError)]


def test_token_authentication_asked_for_only_before_ray_is_imported(monkeypatch):
    """Ray reads RAY_AUTH_MODE when imported: set later, a local Ray's GCS would demand a token that this process's
    client never sends (every test after the first CLI call failed with "Failed to start GCS")."""
    import ray  # noqa: F401  (imported, as in any process that used Ray before)

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    configure_logging("info")
    assert "RAY_AUTH_MODE" not in os.environ
    fresh = subprocess.run([sys.executable, "-c", "import os, sys; from tailkd_ray.runtime import configure_logging; "
                            "configure_logging('info'); print('ray' in sys.modules, os.environ.get('RAY_AUTH_MODE'))"],
                           capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items()
                                                                             if k != "RAY_AUTH_MODE"})
    assert fresh.stdout.split() == ["False", "token"]
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


def test_deepspeed_told_cpu_only_without_cuda(monkeypatch):
    """DS_ACCELERATOR=cpu without CUDA (DeepSpeed's "Setting accelerator to CPU" warning gone from every process
    that imports it), nothing with CUDA, and a user's own choice stands."""
    import torch

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert deepspeed_env() == {"DS_ACCELERATOR": "cpu"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert deepspeed_env() == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    assert deepspeed_env() == {}
    configure_logging("info")
    assert os.environ["DS_ACCELERATOR"] == "xpu"
    logging.getLogger("tailkd_ray").setLevel(logging.NOTSET)
    if not torch.cuda.is_available():  # as the CLI starts: the import after configure_logging stays silent
        fresh = subprocess.run([sys.executable, "-c", "from tailkd_ray.runtime import configure_logging; "
                                "configure_logging('info'); import deepspeed"], capture_output=True, text=True,
                               check=True, env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
        assert "Setting accelerator" not in fresh.stdout + fresh.stderr


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("chatty")
