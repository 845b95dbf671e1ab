def test_tiny_models_load(tiny_llama_dir, tiny_gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in (tiny_llama_dir, tiny_gpt2_dir):
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
        assert model(ids).logits.shape[-1] == len(tok) == 320
