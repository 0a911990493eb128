import numpy as np
import pytest

from cpm_deploy.runtime.sampling import (SamplingConfig, apply_openai_penalties, apply_repetition_penalty,
                                         filter_top_k_top_p, next_tokens)


def test_greedy_is_argmax_per_row():
    logits = np.array([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]], np.float32)
    assert next_tokens(logits, SamplingConfig(), np.random.default_rng(0)).tolist() == [1, 0]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs)
    kept = np.isfinite(filter_top_k_top_p(logits, 0, 0.79))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.79
    kept = np.isfinite(filter_top_k_top_p(logits, 0, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    assert np.isfinite(filter_top_k_top_p(logits, 0, 0.1)).sum() == 1  # never empty


def test_top_k_per_row():
    logits = np.array([[1.0, 4.0, 3.0, 2.0], [9.0, 8.0, 7.0, 6.0]])
    kept = np.isfinite(filter_top_k_top_p(logits, 2, 1.0))
    assert kept.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_repetition_penalty_like_transformers():
    logits = np.array([[2.0, -2.0, 1.0]])
    seen = np.array([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_follows_the_distribution_and_the_seed():
    logits = np.log(np.array([[0.7, 0.2, 0.1]] * 20000))
    cfg = SamplingConfig(do_sample=True, seed=0)
    draws = next_tokens(logits, cfg, np.random.default_rng(0))
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.02)
    again = next_tokens(logits, cfg, np.random.default_rng(0))
    assert np.array_equal(draws, again)


def test_temperature_sharpens():
    logits = np.log(np.array([[0.6, 0.4]] * 5000))
    cold = next_tokens(logits, SamplingConfig(do_sample=True, temperature=0.1), np.random.default_rng(1))
    assert (cold == 0).mean() > 0.95


def test_presence_and_frequency_penalties_as_openai_defines_them():
    logits = np.array([[5.0, 5.0, 5.0, 5.0]], np.float32)
    counts = np.array([[0, 1, 3, 0]])
    cfg = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25)
    # logit - frequency * count - presence * (count > 0)
    assert apply_openai_penalties(logits, counts, cfg).tolist() == [[5.0, 4.25, 3.75, 5.0]]
    assert logits.tolist() == [[5.0] * 4]  # the caller's logits are left as they were
    assert next_tokens(np.array([[1.0, 1.2]]), SamplingConfig(presence_penalty=1.0), np.random.default_rng(0),
                       counts=np.array([[0, 1]])).tolist() == [0]  # greedy honours it too


def test_logit_bias_is_added_before_sampling_and_can_force_or_ban():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]], np.float32)
    assert apply_openai_penalties(logits, None, SamplingConfig(logit_bias=((0, 1.5), (2, -1.0)))).tolist() == \
        [[1.5, 3.0, 0.0], [3.5, 0.0, 0.0]]
    rng = np.random.default_rng(0)
    forced = next_tokens(np.zeros((500, 3)), SamplingConfig(do_sample=True, logit_bias=((2, 100.0),)), rng)
    assert (forced == 2).all()
    banned = next_tokens(np.zeros((500, 3)), SamplingConfig(do_sample=True, logit_bias=((1, -100.0),)), rng)
    assert (banned != 1).all() and set(banned.tolist()) == {0, 2}


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1},
                                    {"repetition_penalty": 0}, {"stop": ("",)}, {"presence_penalty": 2.5},
                                    {"frequency_penalty": -3}, {"logit_bias": ((5, 101.0),)},
                                    {"logit_bias": ((-1, 1.0),)}, {"logit_bias": ((5, float("nan")),)}])
def test_invalid_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)
