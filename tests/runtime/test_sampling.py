"""Next-token choice (`runtime/sampling.py`): greedy, temperature, top-k and top-p, each against a distribution
written out by hand, and the generator that makes a draw reproducible.

Sampled tests draw many tokens at once (one row per draw) from a fixed seed, so they are deterministic; the
tolerances are about five standard deviations of the empirical frequencies.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import GenerationError
from lmforge.runtime.sampling import SamplingConfig, next_token

DRAWS = 20_000
TOL = 0.02  # five standard deviations of a frequency near 1/2 over DRAWS draws


def _logits(probs: list[float]) -> torch.Tensor:
    """(1, vocab) logits whose softmax is `probs` (0 -> -inf)."""
    return torch.tensor([[math.log(p) if p > 0 else float("-inf") for p in probs]])


def _frequencies(probs: list[float], cfg: SamplingConfig, seed: int = 0) -> list[float]:
    """How often each token is drawn, over DRAWS rows of the same logits."""
    logits = _logits(probs).expand(DRAWS, -1)
    tokens = next_token(logits, cfg, torch.Generator().manual_seed(seed))
    assert tokens.shape == (DRAWS,) and tokens.dtype == torch.long
    return (torch.bincount(tokens, minlength=len(probs)).double() / DRAWS).tolist()


def _assert_distribution(freq: list[float], expected: list[float]) -> None:
    for token, (f, e) in enumerate(zip(freq, expected)):
        if e == 0:
            assert f == 0, f"token {token} is filtered out but was drawn {f:.4f} of the time"
        else:
            assert abs(f - e) < TOL, f"token {token}: drawn {f:.4f} of the time, expected {e:.4f}"


def _normalise(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


# --- greedy ------------------------------------------------------------------------------------------


def test_greedy_is_the_argmax_of_each_row_and_ignores_the_generator():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9],
                           [5.0, float("-inf"), 4.0, 0.0],
                           [-3.0, -2.0, -1.0, -0.5]])
    cfg = SamplingConfig()
    assert not cfg.do_sample
    for seed in (0, 1, 2):
        assert next_token(logits, cfg, torch.Generator().manual_seed(seed)).tolist() == [1, 0, 3]
    assert next_token(logits, cfg).tolist() == [1, 0, 3]
    # settings that only matter when sampling change nothing
    assert next_token(logits, SamplingConfig(temperature=0.1, top_k=2, top_p=0.5)).tolist() == [1, 0, 3]


def test_greedy_on_half_precision_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.bfloat16)
    token = next_token(logits, SamplingConfig())
    assert token.tolist() == [1] and token.dtype == torch.long


# --- temperature -------------------------------------------------------------------------------------


def test_temperature_one_samples_the_softmax():
    probs = [0.5, 0.3, 0.2]
    _assert_distribution(_frequencies(probs, SamplingConfig(do_sample=True)), probs)


@pytest.mark.parametrize("temperature, expected", [
    (2.0, [0.4154, 0.3218, 0.2628]),  # sqrt(0.5, 0.3, 0.2) / 1.7020: flatter
    (0.5, [0.6579, 0.2368, 0.1053]),  # (0.25, 0.09, 0.04) / 0.38: sharper
])
def test_temperature_divides_the_logits(temperature, expected):
    """softmax(log p / T) is p ** (1 / T), renormalised."""
    freq = _frequencies([0.5, 0.3, 0.2], SamplingConfig(do_sample=True, temperature=temperature))
    _assert_distribution(freq, expected)


def test_tokens_with_minus_infinity_are_never_drawn():
    _assert_distribution(_frequencies([0.0, 0.6, 0.0, 0.4], SamplingConfig(do_sample=True, temperature=3.0)),
                         _normalise([0.0, 0.6 ** (1 / 3), 0.0, 0.4 ** (1 / 3)]))


# --- top-k -------------------------------------------------------------------------------------------


def test_top_k_keeps_the_k_most_likely_tokens():
    """Logits (1, 3, 2, 5, 4), k = 2: only tokens 3 and 4 remain, with probabilities e^5 : e^4."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]]).expand(DRAWS, -1)
    tokens = next_token(logits, SamplingConfig(do_sample=True, top_k=2), torch.Generator().manual_seed(0))
    freq = (torch.bincount(tokens, minlength=5).double() / DRAWS).tolist()
    e = math.e
    _assert_distribution(freq, [0, 0, 0, e / (e + 1), 1 / (e + 1)])  # 0.7311, 0.2689


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(do_sample=True, temperature=100.0, top_k=1)
    assert torch.equal(next_token(logits, cfg, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_top_k_of_the_whole_vocabulary_filters_nothing():
    probs = [0.4, 0.35, 0.25]
    _assert_distribution(_frequencies(probs, SamplingConfig(do_sample=True, top_k=3)), probs)
    _assert_distribution(_frequencies(probs, SamplingConfig(do_sample=True, top_k=10)), probs)


# --- top-p -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_p, kept", [
    (0.7, [1, 3]),  # 0.5 < 0.7, then 0.5 + 0.25 = 0.75 reaches it: tokens 1 and 3
    (0.8, [1, 3, 2]),  # 0.75 < 0.8: the 0.15 token joins; 0.9 reaches it
    (0.3, [1]),  # the most likely token alone already reaches p
    (1e-6, [1]),  # the first token always stays
    (1.0, [1, 3, 2, 0]),  # p = 1 keeps everything
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    """Probabilities (0.1, 0.5, 0.15, 0.25), out of order on purpose (the filter sorts, then maps back)."""
    probs = [0.1, 0.5, 0.15, 0.25]
    expected = _normalise([p if i in kept else 0.0 for i, p in enumerate(probs)])
    _assert_distribution(_frequencies(probs, SamplingConfig(do_sample=True, top_p=top_p)), expected)


def test_top_p_applies_to_the_tempered_distribution():
    """T = 0.5 turns (0.6, 0.3, 0.1) into (0.36, 0.09, 0.01) / 0.46 = (0.783, 0.196, 0.022): p = 0.75 keeps the
    first token alone; untempered, the first two."""
    probs = [0.6, 0.3, 0.1]
    _assert_distribution(_frequencies(probs, SamplingConfig(do_sample=True, temperature=0.5, top_p=0.75)), [1, 0, 0])
    _assert_distribution(_frequencies(probs, SamplingConfig(do_sample=True, top_p=0.75)), [2 / 3, 1 / 3, 0])


def test_top_k_filters_before_top_p():
    """(0.4, 0.3, 0.2, 0.1) with p = 0.75 keeps three tokens (0.4 + 0.3 < 0.75); after top-k 3 the others are
    renormalised to (0.444, 0.333, 0.222), where 0.444 + 0.333 already reaches 0.75: two tokens."""
    probs = [0.4, 0.3, 0.2, 0.1]
    _assert_distribution(_frequencies(probs, SamplingConfig(do_sample=True, top_p=0.75)), _normalise([0.4, 0.3, 0.2, 0]))
    _assert_distribution(_frequencies(probs, SamplingConfig(do_sample=True, top_k=3, top_p=0.75)), [4 / 7, 3 / 7, 0, 0])


# --- rows and seeds ----------------------------------------------------------------------------------


def test_each_row_samples_its_own_distribution():
    rows = torch.cat([_logits([0.9, 0.1, 0.0]), _logits([0.0, 0.2, 0.8])]).repeat(DRAWS // 2, 1)
    tokens = next_token(rows, SamplingConfig(do_sample=True), torch.Generator().manual_seed(0))
    first, second = tokens[0::2], tokens[1::2]
    assert set(first.tolist()) == {0, 1} and set(second.tolist()) == {1, 2}
    assert abs((first == 0).double().mean().item() - 0.9) < TOL
    assert abs((second == 2).double().mean().item() - 0.8) < TOL


def test_the_generator_makes_a_draw_reproducible():
    logits = torch.zeros(1000, 32)  # uniform: every draw is a coin toss
    cfg = SamplingConfig(do_sample=True, top_k=20, top_p=0.9)
    draw = lambda seed: next_token(logits, cfg, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    # without a generator, torch's global one decides
    torch.manual_seed(11)
    a = next_token(logits, cfg)
    torch.manual_seed(11)
    assert torch.equal(a, next_token(logits, cfg))


# --- bad settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
    (dict(temperature=-1.0), "temperature must be > 0, got -1.0"),
    (dict(top_k=0), "top_k must be >= 1, got 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        SamplingConfig(do_sample=True, **kwargs)
