"""models.py: student from overrides, truncate-init slices, seeded random init, clear errors."""

from __future__ import annotations

import pytest
import torch

from tailkd_ray.config import ConfigError, from_dict
from tailkd_ray.models import StudentWithHead, build_student, export_dtype, load_teacher, student_config

SMALL_LLAMA = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
               "num_key_value_heads": 1}


def _cfg(teacher_dir, overrides, init="truncate", seed=0):
    return from_dict({"teacher": {"model": str(teacher_dir)},
                      "student": {"config": overrides, "init": init}, "train": {"seed": seed}})


def test_truncate_copies_leading_slices_of_first_layers(tiny_llama_dir):
    teacher = load_teacher(_cfg(tiny_llama_dir, {}).teacher).state_dict()
    student = build_student(_cfg(tiny_llama_dir, SMALL_LLAMA))
    s = student.state_dict()
    assert student.config.num_hidden_layers == 1 and "model.layers.1.mlp.up_proj.weight" not in s
    expected = {
        "model.embed_tokens.weight": teacher["model.embed_tokens.weight"][:, :32],
        "model.layers.0.self_attn.q_proj.weight": teacher["model.layers.0.self_attn.q_proj.weight"][:32, :32],
        "model.layers.0.self_attn.k_proj.weight": teacher["model.layers.0.self_attn.k_proj.weight"][:16, :32],
        "model.layers.0.self_attn.o_proj.weight": teacher["model.layers.0.self_attn.o_proj.weight"][:32, :32],
        "model.layers.0.mlp.down_proj.weight": teacher["model.layers.0.mlp.down_proj.weight"][:32, :64],
        "model.layers.0.input_layernorm.weight": teacher["model.layers.0.input_layernorm.weight"][:32],
        "model.norm.weight": teacher["model.norm.weight"][:32],
        "lm_head.weight": teacher["lm_head.weight"][:, :32],
    }
    for name, value in expected.items():
        assert s[name].shape == value.shape, name
        torch.testing.assert_close(s[name], value, rtol=0, atol=0, msg=name)
    # Teacher weights are random normal: a non-truncated tensor would not match by chance.
    assert not torch.equal(s["model.layers.0.self_attn.q_proj.weight"],
                           teacher["model.layers.1.self_attn.q_proj.weight"][:32, :32])


def test_truncate_slices_gpt2_fused_qkv_part_by_part(tiny_gpt2_dir):
    teacher = load_teacher(_cfg(tiny_gpt2_dir, {}).teacher).state_dict()
    student = build_student(_cfg(tiny_gpt2_dir, {"n_embd": 32, "n_head": 2, "n_layer": 1}))
    s = student.state_dict()
    w = teacher["transformer.h.0.attn.c_attn.weight"]  # Conv1D [64, 3·64] = [q | k | v]
    torch.testing.assert_close(s["transformer.h.0.attn.c_attn.weight"],
                               torch.cat([w[:32, 0:32], w[:32, 64:96], w[:32, 128:160]], dim=1), rtol=0, atol=0)
    b = teacher["transformer.h.0.attn.c_attn.bias"]
    torch.testing.assert_close(s["transformer.h.0.attn.c_attn.bias"], torch.cat([b[0:32], b[64:96], b[128:160]]),
                               rtol=0, atol=0)
    # tied embeddings stay tied
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()


def test_random_init_is_seeded(tiny_llama_dir):
    a = build_student(_cfg(tiny_llama_dir, SMALL_LLAMA, init="random", seed=3)).state_dict()
    b = build_student(_cfg(tiny_llama_dir, SMALL_LLAMA, init="random", seed=3)).state_dict()
    c = build_student(_cfg(tiny_llama_dir, SMALL_LLAMA, init="random", seed=4)).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_bad_override_key_names_it(tiny_llama_dir):
    with pytest.raises(ConfigError, match="student.config.num_layerz"):
        build_student(_cfg(tiny_llama_dir, {"num_layerz": 1}, init="random"))


def test_invalid_student_architecture_is_a_config_error(tiny_llama_dir):
    """The teacher's 4 heads do not divide a 66-wide student: a ConfigError naming the cause, from student_config
    (which run_training calls on the driver), not an unpicklable library error inside a worker."""
    from transformers import LlamaConfig

    if not hasattr(LlamaConfig(), "validate"):
        pytest.skip("this transformers has no config validation")
    with pytest.raises(ConfigError, match=r"student.config .*hidden_size.: 66.* not a multiple of the number of "
                                          r"attention heads \(4\)"):
        student_config(_cfg(tiny_llama_dir, {"hidden_size": 66}, init="random"))


def test_truncate_needs_same_head_dim(tiny_llama_dir):
    with pytest.raises(ConfigError, match="head_dim"):
        build_student(_cfg(tiny_llama_dir, {**SMALL_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 2}))


def test_student_with_head_matches_model_logits(tiny_gpt2_dir):
    model = build_student(from_dict({"teacher": {"model": str(tiny_gpt2_dir)}, "student": {"model": str(tiny_gpt2_dir)}}))
    ids = torch.randint(0, 320, (2, 7))
    logits = StudentWithHead(model)(ids, lambda h, w, b: h @ w.t() + (0 if b is None else b))
    torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                         ("float16", torch.float16)])
def test_export_dtype_names_the_torch_dtype(name, dtype):
    assert export_dtype(from_dict({"export": {"dtype": name}})) is dtype
