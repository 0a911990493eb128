import numpy as np
import pytest

from cpm_deploy.runtime.sampling import SamplingConfig, apply_repetition_penalty, filter_top_k_top_p, next_tokens


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


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1},
                                    {"repetition_penalty": 0}, {"stop": ("",)}])
def test_invalid_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)
