"""``--speculative-config`` parsing and validation."""
from __future__ import annotations

import dataclasses

import pytest

from arctic_jax.speculative import SpeculativeConfig
from arctic_jax.speculative.config import UNSUPPORTED_METHODS


def test_parse_full():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, '
                                '"prompt_lookup_max": 4, "prompt_lookup_min": 1}')
    assert (c.method, c.num_speculative_tokens) == ("ngram", 4)
    assert (c.prompt_lookup_max, c.prompt_lookup_min) == (4, 1)
    assert c.as_dict() == {"method": "ngram", "num_speculative_tokens": 4,
                           "prompt_lookup_max": 4, "prompt_lookup_min": 1,
                           "adaptive_disable_batch_size": 32}
    assert SpeculativeConfig.from_dict(c.as_dict()) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.method = "x"


@pytest.mark.parametrize("given, lo, hi", [
    ({}, 5, 5),                                               # vLLM: neither given -> 5 / 5
    ({"prompt_lookup_max": 3}, 3, 3),                         # one given -> the other copies it
    ({"prompt_lookup_min": 2}, 2, 2),
    ({"prompt_lookup_min": 2, "prompt_lookup_max": 6}, 2, 6),
])
def test_lookup_defaults_follow_vllm(given, lo, hi):
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, **given})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (lo, hi)


@pytest.mark.parametrize("method", UNSUPPORTED_METHODS)
def test_known_methods_not_supported_yet(method):
    with pytest.raises(ValueError, match=f"method '{method}' is not supported yet"):
        SpeculativeConfig.from_dict({"method": method, "num_speculative_tokens": 3})


@pytest.mark.parametrize("d, message", [
    ({"method": "ngram", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1},
     "unknown key\\(s\\) 'draft_tensor_parallel_size'; accepted keys: method, num_speculative_tokens, "
     "disable_by_batch_size, hard_disable_by_batch_size, adaptive_disable_batch_size, "
     "prompt_lookup_max, prompt_lookup_min, "
     "suffix_cache_max_depth"),
    ({"method": "ngram", "num_speculative_tokens": 3, "model": "x"},
     "model applies to method 'arctic', not 'ngram'"),
    ({"method": "telepathy", "num_speculative_tokens": 3},
     "unknown method 'telepathy'; supported: ngram, suffix, arctic, mlp_speculator; not supported "
     "yet: draft_model"),
    ({"method": "ngram", "num_speculative_tokens": 3, "suffix_cache_max_depth": 8},
     "suffix_cache_max_depth applies to method 'suffix', not 'ngram'"),
    ({"method": "suffix", "prompt_lookup_max": 3},
     "prompt_lookup_max applies to method 'ngram', not 'suffix'"),
    ({"method": "suffix", "suffix_min_token_prob": 1.5},
     "suffix_min_token_prob must be in \\[0.0, 1.0\\], got 1.5"),
    ({"method": "suffix", "suffix_cache_max_depth": 0}, "suffix_cache_max_depth must be >= 1, got 0"),
    ({"method": "suffix", "suffix_cache_max_requests": -2}, "suffix_cache_max_requests must be >= -1"),
    ({"method": "suffix", "suffix_max_spec_factor": "1"}, "suffix_max_spec_factor must be a number"),
    ({"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 0},
     "disable_by_batch_size must be >= 1, got 0"),
    ({"num_speculative_tokens": 3}, "'method' is required"),
    ({"method": "ngram"}, "'num_speculative_tokens' is required for method 'ngram'"),
    ({"method": 1, "num_speculative_tokens": 3}, "method must be a string, got int 1"),
    ({"method": "ngram", "num_speculative_tokens": "4"},
     "num_speculative_tokens must be an integer, got str '4'"),
    ({"method": "ngram", "num_speculative_tokens": 4.0},
     "num_speculative_tokens must be an integer, got float"),
    ({"method": "ngram", "num_speculative_tokens": True},
     "num_speculative_tokens must be an integer, got bool"),
    ({"method": "ngram", "num_speculative_tokens": 0},
     "num_speculative_tokens must be in \\[1, 32\\], got 0"),
    ({"method": "ngram", "num_speculative_tokens": 33},
     "num_speculative_tokens must be in \\[1, 32\\], got 33"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 0},
     "prompt_lookup_min must be >= 1, got 0"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": -1, "prompt_lookup_min": 1},
     "prompt_lookup_max must be >= 1, got -1"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": None, "prompt_lookup_min": "2"},
     "prompt_lookup_min must be an integer, got str '2'"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min=4 must be <= prompt_lookup_max=2"),
])
def test_bad_dicts_name_the_problem(d, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(d)


@pytest.mark.parametrize("text, message", [
    ('{"method": "ngram", ', "not valid JSON \\(Expecting property name"),
    ("", "not valid JSON \\(Expecting value: line 1 column 1"),
    ("[1, 2]", "must be a JSON object / dict, got list"),
    ('"ngram"', "must be a JSON object / dict, got str"),
])
def test_bad_json(text, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(text)


def test_parse_rejects_non_string():
    with pytest.raises(ValueError, match="must be a JSON string, got dict"):
        SpeculativeConfig.parse({"method": "ngram"})


def test_suffix_defaults_follow_upstream_vllm():
    c = SpeculativeConfig.parse('{"method": "suffix"}')
    assert (c.suffix_cache_max_depth, c.suffix_cache_max_requests, c.suffix_max_spec_factor,
            c.suffix_max_spec_offset, c.suffix_min_token_prob) == (24, 10000, 1.0, 0.0, 0.1)
    assert c.num_speculative_tokens == 24 and c.disable_by_batch_size == 64
    assert c.prompt_lookup_max is None and c.hard_disable_by_batch_size is None
    assert SpeculativeConfig.from_dict(c.as_dict()) == c
    full = SpeculativeConfig.from_dict({
        "method": "suffix", "num_speculative_tokens": 16, "suffix_cache_max_depth": 24,
        "suffix_cache_max_requests": 10000, "suffix_max_spec_factor": 1.0,
        "suffix_max_spec_offset": 0.0, "suffix_min_token_prob": 0.1,
        "disable_by_batch_size": 8, "hard_disable_by_batch_size": 32})
    assert (full.num_speculative_tokens, full.disable_by_batch_size,
            full.hard_disable_by_batch_size) == (16, 8, 32)
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2}').as_dict() == {
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 5, "prompt_lookup_min": 5,
        "adaptive_disable_batch_size": 32}
