import numpy as np
import pytest

from cpm_deploy.runtime.generation.sampling import (PICK_BLOCK, NonFiniteLogits, SamplingConfig, _pick, apply_openai_penalties,
                                         apply_repetition_penalty, kept_tokens, next_tokens)


def reference_kept(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The definition, by sorting all V: top-k keeps every tie at the k-th; top-p keeps the shortest
    stable-sorted prefix (ties in id order) whose mass reaches top_p."""
    keep = np.ones(len(x), bool)
    if 0 < top_k < len(x):
        keep &= x >= np.sort(x)[len(x) - top_k]
    if top_p < 1.0:
        ids = np.flatnonzero(keep)
        order = ids[np.argsort(-x[ids], kind="stable")]
        p = np.exp(x[order].astype(np.float64) - x[order].max())
        before = np.concatenate(([0.0], np.cumsum(p)[:-1])) / p.sum()
        keep[:] = False
        keep[order[before < top_p]] = True
    return np.flatnonzero(keep)


def test_greedy_is_argmax_per_row():
    logits = np.array([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]], np.float32)
    assert next_tokens(logits, SamplingConfig(), np.random.default_rng(0)).tolist() == [1, 0]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert kept_tokens(logits, 0, 0.79).tolist() == [0, 1]  # 0.5 + 0.3 reaches 0.79
    assert kept_tokens(logits, 0, 0.81).tolist() == [0, 1, 2]
    assert kept_tokens(logits, 0, 0.1).tolist() == [0]  # never empty


def test_top_k_keeps_the_k_largest():
    logits = np.array([1.0, 4.0, 3.0, 2.0], np.float32)
    assert kept_tokens(logits, 2, 1.0).tolist() == [1, 2]
    assert kept_tokens(logits, 0, 1.0) is None  # every token


@pytest.mark.parametrize("shape", ["flat", "peaked", "ties", "masked"])
@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.5), (0, 0.999), (40, 1.0), (40, 0.9), (5000, 0.95),
                                          (0, 1e-9), (1, 0.9)])
def test_kept_tokens_equal_sorting_everything(shape, top_k, top_p):
    rng = np.random.default_rng(top_k + int(top_p * 1000))
    for _ in range(5):
        x = rng.standard_normal(30000).astype(np.float32)
        x = {"flat": x, "peaked": x * 12, "ties": np.round(x * 2) * 3, "masked": np.where(x > 1.5, -np.inf, x * 6)}[shape]
        got = kept_tokens(x, top_k, top_p)
        want = reference_kept(x, top_k, top_p)
        assert np.array_equal(np.arange(len(x)) if got is None else got, want)


def test_draws_land_on_positive_weights_only_and_follow_them():
    w = np.zeros(3 * PICK_BLOCK + 17, np.float32)
    w[[3, PICK_BLOCK + 5, 3 * PICK_BLOCK + 2]] = [1.0, 2.0, 1.0]
    # the running sum (1, 3, 4) first reaches (1 - r) * 4
    edges = [0.0, np.nextafter(1.0, 0.0), 0.5, 0.2, 0.76]
    assert [_pick(w, r) for r in edges] == [3 * PICK_BLOCK + 2, 3, PICK_BLOCK + 5, 3 * PICK_BLOCK + 2, 3]
    draws = np.bincount([_pick(w, r) for r in np.random.default_rng(0).random(20000)], minlength=len(w))
    assert np.allclose(draws[[3, PICK_BLOCK + 5, 3 * PICK_BLOCK + 2]] / 20000, [0.25, 0.5, 0.25], atol=0.015)
    assert draws.sum() == draws[[3, PICK_BLOCK + 5, 3 * PICK_BLOCK + 2]].sum()


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(do_sample=True, top_p=0.9),
                                 SamplingConfig(do_sample=True, top_k=5)], ids=["greedy", "top-p", "top-k"])
def test_non_finite_logits_are_refused_by_name_not_turned_into_tokens(cfg):
    ok = np.zeros((2, 100), np.float32)
    ok[0, 50:] = -np.inf  # masked tokens are fine
    assert next_tokens(ok, cfg, np.random.default_rng(0))[0] < 50
    for bad in (np.nan, np.inf):
        logits = ok.copy()
        logits[1, 7] = bad
        with pytest.raises(NonFiniteLogits, match="row 1"):
            next_tokens(logits, cfg, np.random.default_rng(0))
    with pytest.raises(NonFiniteLogits, match="row 0"):
        next_tokens(np.full((1, 100), -np.inf, np.float32), cfg, np.random.default_rng(0))


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


def test_a_vanishing_temperature_is_greedy_and_never_overflows():
    logits = np.array([[1.0, 3.0, 2.9, -np.inf], [2.0, 2.0, 1.0, 0.0]], np.float32)
    rng = np.random.default_rng(0)
    draws = np.array([next_tokens(logits, SamplingConfig(do_sample=True, temperature=1e-300), rng) for _ in range(200)])
    assert (draws[:, 0] == 1).all() and set(draws[:, 1].tolist()) == {0, 1}  # ties stay a draw


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
    assert apply_openai_penalties(logits, counts, cfg).dtype == np.float32  # float64 would slow what follows
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
                                    {"logit_bias": ((-1, 1.0),)}, {"logit_bias": ((5, float("nan")),)},
                                    {"seed": -1}, {"seed": 1.5}])
def test_invalid_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)
