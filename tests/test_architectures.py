"""Students derived from the published configs of the models people distil, built offline on the meta device.

tests/fixtures/configs/<model>/config.json are the published config.json values (hub-only keys such as
``_name_or_path`` and ``auto_map`` dropped); a few hold a small tokenizer too (make_tokenizers.py there).
No weights: models are built on the meta device, so each build takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailkd_ray.config import ConfigError, from_dict, load_config
from tailkd_ray.models import build_student, check_truncatable, head_dim, load_teacher, student_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"

# Parameter counts as the model cards / hub pages give them, at their precision (total, non-embedding).
PUBLIC = {
    "llama-3.1-8b": ("8.03B", None), "meta-llama-3-8b": ("8.03B", None), "llama-3.2-1b": ("1.24B", None),
    "qwen2.5-0.5b": ("0.49B", "0.36B"), "qwen2.5-1.5b": ("1.54B", "1.31B"), "qwen2.5-7b": ("7.61B", "6.53B"),
    "qwen3-0.6b": ("0.6B", "0.44B"), "qwen3-4b": ("4.0B", "3.6B"), "mistral-7b-v0.3": ("7.25B", None),
    "gemma-2-2b": ("2.61B", None), "gemma-2-9b": ("9.24B", None), "gemma-3-1b": ("1.0B", None),
    "phi-3-mini-4k": ("3.8B", None),
}

LLAMA_3_2_1B = {"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                "num_key_value_heads": 8, "tie_word_embeddings": True}
QWEN2_5_0_5B = {"num_hidden_layers": 24, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                "num_key_value_heads": 2}
QWEN3_0_6B = {"num_hidden_layers": 28, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
              "num_key_value_heads": 8}
GEMMA_2_2B = {"num_hidden_layers": 26, "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
              "num_key_value_heads": 4}

# (teacher, student.config, the published model of the same dims or None, published student size or None)
PAIRS = [
    ("llama-3.1-8b", LLAMA_3_2_1B, "llama-3.2-1b", "1.24B"),
    ("qwen2.5-1.5b", QWEN2_5_0_5B, "qwen2.5-0.5b", "0.49B"),
    # 7B's 152,064 embedding rows (padded) stay: 128 rows more than the 0.5B's 151,936.
    ("qwen2.5-7b", {**QWEN2_5_0_5B, "tie_word_embeddings": True}, None, "0.49B"),
    ("qwen3-4b", QWEN3_0_6B, "qwen3-0.6b", "0.6B"),
    ("gemma-2-9b", GEMMA_2_2B, "gemma-2-2b", "2.61B"),
    ("mistral-7b-v0.3", {"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 7168,
                         "num_attention_heads": 16, "num_key_value_heads": 8}, None, None),
    ("gemma-3-1b", {"num_hidden_layers": 13}, None, None),
    ("phi-3-mini-4k", {"num_hidden_layers": 16, "hidden_size": 1536, "intermediate_size": 4096,
                       "num_attention_heads": 16, "num_key_value_heads": 16}, None, None),
]


def _cfg(teacher: str, overrides: dict, init: str = "random"):
    return from_dict({"teacher": {"model": str(FIXTURES / teacher)}, "student": {"config": overrides, "init": init}})


def _teacher_config(name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(FIXTURES / name)


def _meta_params(config) -> tuple[int, int]:
    """(total, embedding) parameter counts of the model ``config`` builds, on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  for p in m.parameters()}
    return sum(p.numel() for p in model.parameters()), sum(embeddings.values())


def _formula(config) -> int:
    """Parameters of a decoder-only transformer with gated MLPs, from its config alone (checks the builds)."""
    d, hd, kind = config.hidden_size, head_dim(config), config.model_type
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    attention = d * hd * 2 * (heads + kv) + (hd * (heads + 2 * kv) if kind == "qwen2" else 0)  # Qwen2: q/k/v biases
    norms = d * (4 if kind.startswith("gemma") else 2)  # Gemma 2 / 3: four norms per layer
    norms += 2 * hd if kind in ("qwen3", "gemma3_text") else 0  # their q and k norms
    layer = attention + 3 * d * config.intermediate_size + norms
    embeddings = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * layer + d


def _near_public(count: int, figure: str) -> bool:
    """``count`` matches a published figure to its last digit, which cards round or truncate ("7.61B" for
    7,615,616,512): within one unit of that digit."""
    decimals = len(figure.rstrip("B").partition(".")[2])
    return abs(count / 1e9 - float(figure.rstrip("B"))) < 10 ** -decimals


def _per_layer(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k.endswith("layer_types") and isinstance(v, list)}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_published_configs_build_with_their_published_sizes(name):
    config = _teacher_config(name)
    total, embedding = _meta_params(config)
    figure, non_embedding = PUBLIC[name]
    assert _near_public(total, figure), f"{name}: {total:,} parameters, published {figure}"
    if non_embedding is not None:
        assert _near_public(total - embedding, non_embedding), f"{name}: {total - embedding:,} non-embedding"
    assert total == _formula(config)


@pytest.mark.parametrize("teacher, overrides, same_as, figure", PAIRS, ids=[p[0] for p in PAIRS])
def test_derived_students_build_with_the_expected_sizes(teacher, overrides, same_as, figure):
    config = student_config(_cfg(teacher, overrides))
    total, _ = _meta_params(config)
    assert total == _formula(config)
    for key, values in _per_layer(config).items():
        assert len(values) == config.num_hidden_layers, key
        assert values == getattr(_teacher_config(teacher), key)[:config.num_hidden_layers], key
    if same_as is not None:  # the dims of a published model: exactly its size
        assert total == _meta_params(_teacher_config(same_as))[0]
    if figure is not None:
        assert _near_public(total, figure), f"{teacher} student: {total:,} parameters, expected {figure}"


def test_qwen_0_5b_students_are_0_49_to_0_51b():
    from_1_5b = _meta_params(student_config(_cfg("qwen2.5-1.5b", QWEN2_5_0_5B)))[0]
    from_7b = _meta_params(student_config(_cfg("qwen2.5-7b", {**QWEN2_5_0_5B, "tie_word_embeddings": True})))[0]
    assert 0.49e9 <= from_1_5b <= 0.51e9 and 0.49e9 <= from_7b <= 0.51e9
    assert from_7b - from_1_5b == (152064 - 151936) * 896


def test_alternating_and_periodic_attention_follow_the_layer_count():
    gemma2 = student_config(_cfg("gemma-2-9b", {"num_hidden_layers": 5}))
    assert gemma2.layer_types == ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    # Gemma 3: 5 sliding layers then 1 full, repeated; a deeper student (random init) extends the pattern.
    gemma3 = student_config(_cfg("gemma-3-1b", {"num_hidden_layers": 30}))
    assert gemma3.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 5
    qwen = student_config(_cfg("qwen2.5-1.5b", {"num_hidden_layers": 20}))
    assert qwen.layer_types == ["full_attention"] * 20


def test_per_layer_list_without_a_pattern_is_not_extended(tmp_path):
    import json

    config = json.loads((FIXTURES / "qwen2.5-0.5b" / "config.json").read_text())
    config.update(num_hidden_layers=4, use_sliding_window=True, max_window_layers=3)  # full x3, then sliding
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"student.config.num_hidden_layers = 6 exceeds the teacher's 4 layers .* "
                                          r"set student.config.layer_types \(a list of 6 entries\)"):
        student_config(from_dict({"teacher": {"model": str(tmp_path)},
                                  "student": {"config": {"num_hidden_layers": 6}}}))
    # Given explicitly, the list is the user's and is used as is.
    layer_types = ["full_attention"] * 5 + ["sliding_attention"]
    derived = student_config(from_dict({"teacher": {"model": str(tmp_path)}, "student": {
        "config": {"num_hidden_layers": 6, "layer_types": layer_types}}}))
    assert derived.layer_types == layer_types


def test_bad_student_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"set student.config.num_hidden_layers and student.config.layer_types"):
        student_config(_cfg("qwen2.5-1.5b", {"num_hidden_layers": 20, "layer_types": ["full_attention"] * 28}))
    with pytest.raises(ConfigError, match=r"student.config.num_hidden_layers = '20' is not valid for the teacher's "
                                          r"Qwen2Config .*expected int, got str"):
        student_config(_cfg("qwen2.5-1.5b", {"num_hidden_layers": "20"}))


GPU_CONFIGS = [("gpu_qwen2.5-1.5b_to_0.5b.yaml", "qwen2.5-1.5b", "0.51B"),
               ("gpu_llama3-8b_to_1b.yaml", "meta-llama-3-8b", "1.02B")]


@pytest.mark.parametrize("path, teacher, figure", GPU_CONFIGS, ids=[c[1] for c in GPU_CONFIGS])
def test_shipped_gpu_configs_resolve_and_build_their_students(path, teacher, figure, capsys):
    from tailkd_ray.cli import main

    overrides = [f"teacher.model={FIXTURES / teacher}"]
    assert main(["config", "--config", str(ROOT / "jobs" / "configs" / path), *overrides]) == 0, capsys.readouterr().err
    cfg = load_config(ROOT / "jobs" / "configs" / path, overrides)
    assert cfg.student.init == "truncate"
    config = student_config(cfg)
    check_truncatable(_teacher_config(teacher), config)
    total, _ = _meta_params(config)
    assert total == _formula(config) and _near_public(total, figure), f"{path}: {total:,} parameters"
    for key, values in _per_layer(config).items():
        assert len(values) == config.num_hidden_layers, key


def _tiny(tmp_path, name: str, **dims):
    """A tiny model of a fixture's architecture (its config with small dims), saved with random weights."""
    from transformers import AutoModelForCausalLM

    values = {**_teacher_config(name).to_dict(), "vocab_size": 96, "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None, "layer_types": None, **dims}  # layer_types: regenerated for the new depth
    config = type(_teacher_config(name)).from_dict(values)
    torch.manual_seed(0)
    out = tmp_path / f"tiny-{name}"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def test_truncate_keeps_the_first_layers_and_their_layer_types(tmp_path):
    teacher_dir = _tiny(tmp_path, "qwen2.5-1.5b", num_hidden_layers=4, hidden_size=64, intermediate_size=96,
                        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                        max_window_layers=2)
    cfg = from_dict({"teacher": {"model": str(teacher_dir)}, "student": {"init": "truncate", "config": {
        "num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
        "num_key_value_heads": 1}}})
    student = build_student(cfg)
    assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    teacher = load_teacher(cfg.teacher).state_dict()
    s = student.state_dict()
    expected = {"model.layers.2.self_attn.q_proj.weight": teacher["model.layers.2.self_attn.q_proj.weight"][:32, :32],
                "model.layers.2.self_attn.k_proj.bias": teacher["model.layers.2.self_attn.k_proj.bias"][:16],
                "model.layers.0.mlp.down_proj.weight": teacher["model.layers.0.mlp.down_proj.weight"][:32, :48],
                "lm_head.weight": teacher["model.embed_tokens.weight"][:, :32]}
    for name, value in expected.items():
        torch.testing.assert_close(s[name], value, rtol=0, atol=0, msg=name)


def test_truncate_slices_phi3_fused_projections_part_by_part(tmp_path):
    # 4 query heads and 2 key/value heads of width 16: qkv_proj rows = [q 64 | k 32 | v 32], gate_up = [gate | up].
    teacher_dir = _tiny(tmp_path, "phi-3-mini-4k", num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                        num_attention_heads=4, num_key_value_heads=2)
    cfg = from_dict({"teacher": {"model": str(teacher_dir)}, "student": {"init": "truncate", "config": {
        "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 2,
        "num_key_value_heads": 1}}})
    s = build_student(cfg).state_dict()
    teacher = load_teacher(cfg.teacher).state_dict()
    qkv = teacher["model.layers.0.self_attn.qkv_proj.weight"]
    torch.testing.assert_close(s["model.layers.0.self_attn.qkv_proj.weight"],
                               torch.cat([qkv[0:32, :32], qkv[64:80, :32], qkv[96:112, :32]]), rtol=0, atol=0)
    gate_up = teacher["model.layers.0.mlp.gate_up_proj.weight"]
    torch.testing.assert_close(s["model.layers.0.mlp.gate_up_proj.weight"],
                               torch.cat([gate_up[0:40, :32], gate_up[96:136, :32]]), rtol=0, atol=0)
