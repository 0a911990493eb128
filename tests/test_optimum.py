"""Optimum loads a bundle as it is (config.json beside decoder.onnx) and generates cpm-run's greedy
tokens. Optimum's ONNX backend pins an older transformers, so it lives outside the test environment:
this runs where it is installed (benchmarks/optimum_loads_bundle.py does the same in its own venv)."""

import pytest


def test_optimum_generates_our_greedy_tokens(trained_bundle, trained_generator):
    ort_models = pytest.importorskip("optimum.onnxruntime", reason="Optimum is not installed (it pins transformers<4.58)")
    torch = pytest.importorskip("torch")
    from cpm_deploy.runtime import SamplingConfig

    model = ort_models.ORTModelForCausalLM.from_pretrained(trained_bundle, file_name="decoder.onnx")
    for prompt in ["清华大学", "股市今天"]:
        ids = trained_generator.tokenizer.encode(prompt)
        ours = list(trained_generator.iter_ids([ids], 16, 1, SamplingConfig()))[-1][0]
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                             pad_token_id=0, eos_token_id=7)
        theirs = out[0, len(ids):].tolist()
        assert ours == theirs[:len(ours)]
