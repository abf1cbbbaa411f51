"""PSK generation: length, alphabet, uniqueness, uniformity and the entropy floor."""

from __future__ import annotations

import collections
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rotator.errors import ConfigError
from rotator.psk import ALNUM, PRESETS, PskGenerator, PskPolicy


@settings(max_examples=60, deadline=None)
@given(length=st.integers(24, 128), preset=st.sampled_from(sorted(PRESETS)), count=st.integers(1, 50))
def test_length_and_alphabet(length, preset, count):
    alphabet, forbidden = PRESETS[preset]
    policy = PskPolicy(length, alphabet, forbidden)
    if policy.entropy_bits < 128:
        with pytest.raises(ConfigError):
            PskGenerator(policy)
        return
    keys = [k.reveal() for k in PskGenerator(policy).generate(count)]
    assert len(keys) == count
    for key in keys:
        assert len(key) == length and set(key) <= set(alphabet)
        assert key[0] not in forbidden


@settings(max_examples=40, deadline=None)
@given(chars=st.lists(st.characters(min_codepoint=33, max_codepoint=126), min_size=2, max_size=90, unique=True),
       length=st.integers(24, 128))
def test_entropy_floor_is_enforced(chars, length):
    alphabet = "".join(chars)
    policy = PskPolicy(length, alphabet)
    bits = length * math.log2(len(alphabet))
    if bits < 128:
        with pytest.raises(ConfigError):
            policy.validated()
    else:
        assert policy.validated() is policy


def test_keys_are_unique():
    keys = {k.reveal() for k in PskGenerator(PskPolicy()).generate(20000)}
    assert len(keys) == 20000


def test_no_modulo_bias():
    """62 symbols: a naive byte % 62 makes the first 8 symbols ~25% more likely. Chi-square must pass."""
    text = "".join(k.reveal() for k in PskGenerator(PskPolicy(64)).generate(8000))
    counts = collections.Counter(text)
    expected = len(text) / len(ALNUM)
    chi2 = sum((counts[c] - expected) ** 2 / expected for c in ALNUM)
    assert chi2 < 110  # df=61: p ~ 1e-4 threshold; a biased sampler scores in the thousands
    first8 = sum(counts[c] for c in ALNUM[:8]) / 8
    last8 = sum(counts[c] for c in ALNUM[-8:]) / 8
    assert abs(first8 - last8) / expected < 0.05


def test_aws_preset_never_starts_with_zero():
    keys = PskGenerator(PskPolicy.preset("aws", 32)).generate(5000)
    assert not any(k.reveal().startswith("0") for k in keys)
    assert any("." in k.reveal() or "_" in k.reveal() for k in keys)


@pytest.mark.parametrize(("length", "alphabet"), [(23, ALNUM), (129, ALNUM), (32, "a"), (32, "aab"), (32, "ab cd")])
def test_bad_policies_are_config_errors(length, alphabet):
    with pytest.raises(ConfigError):
        PskPolicy(length, alphabet).validated()


def test_unknown_preset():
    with pytest.raises(ConfigError):
        PskPolicy.preset("nope")
