"""Shared fixtures: one local Ray instance per test session, a tiny tokenizer and tiny HF models.

Nothing is downloaded: the tokenizer is trained on the built-in corpus (DESIGN §6) and the models are
built from configs with random weights (saved as safetensors).
"""

from __future__ import annotations

import os

import pytest

# Keep every Ray process on 127.0.0.1 (DESIGN §5) before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray 2.60 reads Parquet footers on a pool of 32 new actor processes per read (~10-20 s on 2 cores);
# one is plenty for test-sized files.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")

TINY_VOCAB = 320


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (jobs/chaos.py's) are skipped unless --run-slow: minutes each on 2 cores."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def start_shared_ray() -> None:
    """Start the session's local Ray: 8 logical CPUs (oversubscribing the 2 real cores), as ``tailkd`` starts one
    (``runtime.start_local_ray``: its own dashboard, whose address only its workers get, so Ray Train's
    placement-group cleaner asks this Ray, not another one on the machine).

    Also used by tests that must stop it to start a multi-node ``ray.cluster_utils.Cluster`` (test_placement.py)
    and restart it afterwards for the tests that follow.
    """
    from tailkd_ray.runtime import start_local_ray

    start_local_ray({"env_vars": {}}, num_cpus=8, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by the whole session (see ``start_shared_ray``)."""
    import ray

    if not ray.is_initialized():
        start_shared_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def builtin_corpus(tmp_path_factory):
    """A ~300 KB slice of the built-in corpus: (train_dir, val_dir) of .txt documents."""
    from tailkd_ray.data.corpus import write_builtin_corpus

    return write_builtin_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=300_000)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(builtin_corpus, tmp_path_factory):
    from tailkd_ray.data.corpus import train_bpe_tokenizer

    train_dir, _ = builtin_corpus
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(sorted(train_dir.glob("*.txt")), TINY_VOCAB, out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A 2-layer, 64-wide Llama-style teacher with the tiny tokenizer's vocabulary."""
    from tailkd_ray.models import llama_config, save_random_model

    config = llama_config(vocab=TINY_VOCAB, layers=2, width=64, heads=4, kv_heads=2, intermediate=128,
                          max_positions=256)
    return save_random_model(config, tmp_path_factory.mktemp("tiny_llama"), seed=0, tokenizer=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A 2-layer, 64-wide GPT-2-style model (tied embeddings) with the tiny tokenizer's vocabulary."""
    from transformers import GPT2Config

    from tailkd_ray.models import save_random_model

    config = GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return save_random_model(config, tmp_path_factory.mktemp("tiny_gpt2"), seed=0, tokenizer=tiny_tokenizer_dir)


CHAT_TEMPLATES = ("qwen2.5", "llama3")  # tests/fixtures/chat/<name>_tokenizer_config.json


def chat_tokenizer(base_dir, name: str, out_dir):
    """The tokenizer of ``base_dir`` with a published chat template (tests/fixtures/chat) and the special tokens the
    template uses added (at the end of its vocabulary), saved to ``out_dir``; returns ``out_dir``."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = json.loads((Path(__file__).parent / "fixtures" / "chat" / f"{name}_tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.add_special_tokens({key: spec[key] for key in ("bos_token", "eos_token", "additional_special_tokens")
                                  if key in spec})
    tokenizer.chat_template = spec["chat_template"]
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def chat_tokenizer_dirs(tiny_tokenizer_dir, tmp_path_factory):
    """{template name: the tiny tokenizer with that chat template and its special tokens}."""
    return {name: chat_tokenizer(tiny_tokenizer_dir, name, tmp_path_factory.mktemp(f"chat_{name}"))
            for name in CHAT_TEMPLATES}
