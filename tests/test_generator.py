"""CPMGenerator on the briefly trained tiny model: parity with the torch reference, batching, limits."""

import numpy as np
import pytest

from cpm_deploy.exporter import load_checkpoint
from cpm_deploy.exporter.model import greedy_generate
from cpm_deploy.runtime import CPMGenerator, GenerationError, SamplingConfig

PROMPTS = ["清华大学", "今天天气很好，我们", "中国足球队在比赛中", "股市"]


@pytest.fixture(scope="module")
def reference(trained_hf):
    return load_checkpoint(trained_hf).model


def test_greedy_equals_torch_reference(trained_generator, reference):
    tok = trained_generator.tokenizer
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        want = greedy_generate(reference, ids, 24, eod_id=tok.eod_id)
        got = trained_generator.generate_ids([prompt], max_new_tokens=24)[0]
        assert got == want, prompt
    assert len(set(tuple(trained_generator.generate_ids([p], max_new_tokens=8)[0]) for p in PROMPTS)) > 1


def test_batch_equals_one_by_one(trained_generator):
    batch = trained_generator.generate_ids(PROMPTS, max_new_tokens=16)
    single = [trained_generator.generate_ids([p], max_new_tokens=16)[0] for p in PROMPTS]
    assert batch == single


def test_pipeline_call_like_transformers(trained_generator):
    out = trained_generator("清华大学", max_length=20, do_sample=True, top_p=0.9, seed=3)
    assert isinstance(out, list) and set(out[0]) == {"generated_text"}
    assert out[0]["generated_text"].startswith("清华大学")
    again = trained_generator("清华大学", max_length=20, do_sample=True, top_p=0.9, seed=3)
    assert out == again
    many = trained_generator(["清华大学", "股市"], max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=1)
    assert [len(x) for x in many] == [3, 3] and many[1][0]["generated_text"].startswith("股市")


def test_max_length_counts_the_prompt(trained_generator):
    prompt_len = len(trained_generator.tokenizer.encode("今天天气很好，我们"))
    gen_eod, trained_generator.eod_id = trained_generator.eod_id, -1  # no early stop for counting
    try:
        ids = trained_generator.generate_ids(["今天天气很好，我们"], max_length=prompt_len + 7)[0]
    finally:
        trained_generator.eod_id = gen_eod
    assert len(ids) == 7


def test_eod_stops_a_row(trained_generator):
    gen = trained_generator
    ids = gen.generate_ids(PROMPTS, max_new_tokens=60)
    assert any(gen.eod_id in row for row in ids), "the trained model should end some headline within 60 tokens"
    assert all(row.index(gen.eod_id) == len(row) - 1 for row in ids if gen.eod_id in row)


def test_stop_strings_cut_text_and_stream(trained_generator):
    full = trained_generator("清华大学", max_new_tokens=30)[0]["generated_text"][len("清华大学"):]
    assert len(full) > 2
    stop = full[1:3]
    cut = trained_generator("清华大学", max_new_tokens=30, stop=[stop])[0]["generated_text"]
    assert cut == "清华大学" + full[:full.index(stop)]
    streamed = "".join(trained_generator.stream("清华大学", max_new_tokens=30, stop=stop))
    assert streamed == full[:full.index(stop)]


def test_stream_joins_to_the_call(trained_generator):
    text = "".join(trained_generator.stream("中国足球队在比赛中", max_new_tokens=20))
    assert "中国足球队在比赛中" + text == trained_generator("中国足球队在比赛中", max_new_tokens=20)[0]["generated_text"]


class ScriptedDecoder:
    """Same logits at every step: token 20 best, 21 second, 22 third; the rest far below."""

    kind = "scripted"

    def __init__(self, vocab=40):
        self.logits = np.full((1, vocab), -5.0, np.float32)
        self.logits[0, [20, 21, 22]] = [3.0, 2.0, 1.0]

    def prefill(self, rows, capacity, pad_id=0):
        return np.repeat(self.logits, len(rows), 0), None

    def step(self, state, tokens):
        return np.repeat(self.logits, len(tokens), 0)


def scripted(trained_generator, vocab=40):
    gen = CPMGenerator(ScriptedDecoder(vocab), trained_generator.tokenizer,
                       dict(trained_generator.config, vocab_size=vocab))
    gen.eod_id = -1
    return gen


def test_repetition_penalty_uses_prompt_and_generated_tokens(trained_generator):
    gen = scripted(trained_generator)
    assert gen.iter_ids([[1, 2]], 3, 1, SamplingConfig()).__next__() == [[20]]
    out = list(gen.iter_ids([[1, 2]], 3, 1, SamplingConfig(repetition_penalty=2.0)))[-1]
    # step 2: 20 is seen, 3/2 < 2 so 21; step 3: 20 (1.5) beats 21 (2/2) and 22 (1): the penalty is
    # applied once per seen token, not compounded, as transformers does
    assert out == [[20, 21, 20]]
    out = list(gen.iter_ids([[20, 2]], 1, 1, SamplingConfig(repetition_penalty=2.0)))[-1]
    assert out == [[21]]  # a prompt token counts as seen


def test_sampled_rows_are_independent_and_seeded(trained_generator):
    gen = scripted(trained_generator)
    gen.decoder.logits[:] = 0.0  # flat: every row should wander on its own
    cfg = SamplingConfig(do_sample=True, seed=0)
    rows = list(gen.iter_ids([[1]], 12, 4, cfg))[-1]
    assert len({tuple(r) for r in rows}) == 4
    assert rows == list(gen.iter_ids([[1]], 12, 4, cfg))[-1]


def test_ids_past_the_tokenizer_are_never_generated(trained_generator):
    """A model vocabulary padded beyond the tokenizer's: those ids cannot be decoded, so never chosen."""
    vocab = trained_generator.tokenizer.vocab_size + 10
    gen = scripted(trained_generator, vocab)
    gen.decoder.logits[0, vocab - 5] = 100.0
    assert list(gen.iter_ids([[1]], 2, 1, SamplingConfig()))[-1] == [[20, 20]]


def test_length_limits(trained_generator):
    gen = trained_generator  # trained with 128 positions
    long_prompt = "清华大学是中国著名的高等学府" * 30
    with pytest.raises(GenerationError, match="exceeds the model's 128 positions"):
        gen(long_prompt, max_new_tokens=10)
    out = gen.generate_ids([long_prompt], max_new_tokens=10, truncate_prompt=True)
    assert 1 <= len(out[0]) <= 10
    with pytest.raises(GenerationError, match="exceeds the model's 128 positions"):
        gen("股市", max_length=200)
    with pytest.raises(GenerationError, match="empty prompt"):
        gen("  ")
    with pytest.raises(GenerationError, match="not both"):
        gen("股市", max_length=10, max_new_tokens=3)
    with pytest.raises(GenerationError, match="needs do_sample"):
        gen("股市", num_return_sequences=2)


def test_max_length_beyond_1024_positions_refused(tiny_bundle):
    gen = CPMGenerator.from_bundle(tiny_bundle)
    with pytest.raises(GenerationError, match="1024 positions"):
        gen("清华大学", max_length=1025)


def test_sampling_on_the_trained_model_is_reproducible(trained_generator):
    a = trained_generator.generate_ids(["股市"], max_new_tokens=12, do_sample=True, num_return_sequences=4, seed=0)
    assert a == trained_generator.generate_ids(["股市"], max_new_tokens=12, do_sample=True, num_return_sequences=4, seed=0)
    assert all(len(r) >= 1 for r in a)


def test_generation_needs_no_torch_or_onnx(trained_bundle):
    import subprocess
    import sys

    code = (f"import sys; from cpm_deploy.runtime import CPMGenerator; "
            f"g = CPMGenerator.from_bundle({str(trained_bundle)!r}); g('股市', max_new_tokens=3); "
            f"g = CPMGenerator.from_bundle({str(trained_bundle)!r}, variant='cpu-int4'); g('股市', max_new_tokens=3); "
            "bad = {'torch', 'onnx', 'onnxscript', 'onnx_ir', 'transformers'} & set(sys.modules); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_stop_string_is_one_string_not_its_characters(trained_generator):
    gen, prompt = trained_generator, "股市"
    endless = {"logit_bias": {gen.eod_id: -100.0}}
    cont = gen(prompt, max_new_tokens=24, **endless)[0]["generated_text"][len(prompt):]
    assert len(cont) >= 2
    stop = cont[1] + "\u2603"  # its first character is in the text; the string never is
    assert gen(prompt, max_new_tokens=24, stop=stop, **endless)[0]["generated_text"] == prompt + cont
