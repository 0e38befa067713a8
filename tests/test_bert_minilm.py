"""The embedded all-MiniLM-L6-v2 against sentence-transformers (f32, CPU), single and packed;
Matryoshka truncation; reading sentence-transformers pooling configs."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
import sentence_transformers as st
import transformers

from arctic_jax.config import ConfigError
from arctic_jax.encoder_batch import build_encoder_batch
from arctic_jax.models.pooling import PoolingConfig, finalize, pool
from arctic_jax.models.registry import BERT
from checkpoints.loader import DEFAULT_EMBEDDING_MODEL, default_embedding_model_path, load_model
from checkpoints.sentence_transformers import read_pooling_config
from helpers import cosine

SEED = int(np.random.SeedSequence().entropy % (2 ** 31))  # fresh each run; printed on failure
MIN_COSINE = 0.99999
FIXED_TEXTS = [
    "Hi",
    "A man is eating food.",
    "The new movie is awesome, and the soundtrack is even better!",
    "Paris is the capital of France; its population is about 2.1 million (2023 estimate).",
]


@pytest.fixture(scope="module")
def directory():
    return default_embedding_model_path()


@pytest.fixture(scope="module")
def tokenizer(directory):
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def texts(tokenizer):
    """Short fixed sentences plus two fresh random-word texts of ~60 and ~200 tokens."""
    rng = np.random.default_rng(SEED)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    random_texts = [" ".join(rng.choice(words, n)) + "." for n in (50, 170)]
    out = FIXED_TEXTS + random_texts
    lengths = [len(tokenizer(t)["input_ids"]) for t in out]
    assert max(lengths) <= 250 and max(lengths) >= 150, lengths  # under max_seq_length 256
    return out


@pytest.fixture(scope="module")
def reference(directory, texts):
    model = st.SentenceTransformer(directory, device="cpu")
    return model.encode(texts, convert_to_numpy=True)


@pytest.fixture(scope="module")
def loaded():
    return load_model(DEFAULT_EMBEDDING_MODEL, dtype=np.float32, use_cache=False, progress=False)


@pytest.fixture(scope="module")
def pooling(directory):
    return read_pooling_config(directory)


@functools.cache
def embed_fn(cfg, mode: str, normalize: bool):
    """One jitted encode + pool + finalize per (config, pooling); one compile per bucket."""

    def fn(weights, batch):
        return finalize(pool(BERT.step(weights, batch, cfg=cfg), batch, mode), None, normalize)

    return jax.jit(fn)


def embed(loaded, pooling, token_ids, num_tokens, num_seqs):
    batch = build_encoder_batch(token_ids, num_tokens, num_seqs)
    fn = embed_fn(loaded.config, pooling.mode, pooling.normalize)
    return np.asarray(fn(loaded.weights, batch))[:len(token_ids)]


def test_embedded_model_and_its_pooling_config(loaded, pooling, directory):
    assert loaded.name == DEFAULT_EMBEDDING_MODEL and loaded.spec.task == "embed"
    assert loaded.tokenizer_source.path == os.path.abspath(directory)
    assert (loaded.config.hidden_size, loaded.config.num_layers) == (384, 6)
    assert pooling == PoolingConfig(mode="mean", normalize=True, max_seq_length=256)


def test_single_sequences_match_sentence_transformers(loaded, pooling, tokenizer, texts,
                                                      reference):
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        got = embed(loaded, pooling, [ids], 256, 2)[0]
        cos = cosine(got, reference[i])
        assert cos >= MIN_COSINE, f"text {i} ({len(ids)} tokens): cosine {cos} (seed {SEED})"
        np.testing.assert_allclose(np.linalg.norm(got), 1.0, rtol=1e-6)


def test_packed_batch_matches_sentence_transformers(loaded, pooling, tokenizer, texts, reference):
    ids = [tokenizer(t)["input_ids"] for t in texts]
    order = np.random.default_rng(SEED).permutation(len(ids))  # any order of packing
    got = embed(loaded, pooling, [ids[i] for i in order], 512, 8)
    cos = cosine(got, reference[order])
    assert (cos >= MIN_COSINE).all(), f"cosines {cos} (seed {SEED})"


def test_matryoshka_truncates_then_renormalises(loaded, pooling, tokenizer, texts, reference,
                                                directory, tmp_path):
    copy = tmp_path / "mrl"
    copy.mkdir()
    for name in ("modules.json", "config_sentence_transformers.json"):
        shutil.copy(os.path.join(directory, name), copy / name)
    shutil.copytree(os.path.join(directory, "1_Pooling"), copy / "1_Pooling")
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    with open(copy / "config.json", "w") as f:
        json.dump({**cfg, "matryoshka_dimensions": [128, 256]}, f)
    mrl = read_pooling_config(copy)
    assert mrl.matryoshka_dimensions == (128, 256) and mrl.mode == "mean" and mrl.normalize
    ids = [tokenizer(t)["input_ids"] for t in texts[:3]]
    full = embed(loaded, dataclasses.replace(mrl, normalize=False), ids, 512, 8)
    for d in (128, 256):
        assert mrl.resolve_dimensions(d, 384) == d
        got = np.asarray(finalize(full, mrl.resolve_dimensions(d, 384), mrl.normalize))
        ref = reference[:3, :d] / np.linalg.norm(reference[:3, :d], axis=-1, keepdims=True)
        assert got.shape == (3, d)
        np.testing.assert_allclose(got, ref, atol=2e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-6)
    assert mrl.resolve_dimensions(None, 384) is None and mrl.resolve_dimensions(384, 384) is None
    with pytest.raises(ValueError, match="dimensions 100 is not supported.*128, 256"):
        mrl.resolve_dimensions(100, 384)
    with pytest.raises(ValueError, match="does not support the dimensions parameter"):
        pooling.resolve_dimensions(128, 384)


def test_finalize_against_numpy():
    rng = np.random.default_rng(SEED)
    emb = rng.standard_normal((5, 16)).astype(np.float32)
    emb[3] = 0.0  # an empty slot stays zero, never NaN
    got = np.asarray(finalize(emb, 6, True))
    norms = np.linalg.norm(emb[:, :6], axis=-1, keepdims=True)
    np.testing.assert_allclose(got, emb[:, :6] / np.maximum(norms, 1e-12), rtol=1e-6, atol=1e-7)
    assert np.isfinite(got).all() and (got[3] == 0).all()
    np.testing.assert_array_equal(np.asarray(finalize(emb, None, False)), emb)
    with pytest.raises(ValueError, match=r"dimensions must be in 1\.\.16, got 17"):
        finalize(emb, 17, True)


# --- reading sentence-transformers files ---------------------------------------------------


def write_st(directory, *, modules=None, pooling=None, st_config=None, hf_config=None):
    os.makedirs(directory, exist_ok=True)
    if modules is not None:
        with open(os.path.join(directory, "modules.json"), "w") as f:
            json.dump([{"idx": i, "name": str(i), "path": p, "type": t}
                       for i, (t, p) in enumerate(modules)], f)
    if pooling is not None:
        os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
        with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
            json.dump(pooling, f)
    if st_config is not None:
        with open(os.path.join(directory, "config_sentence_transformers.json"), "w") as f:
            json.dump(st_config, f)
    if hf_config is not None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf_config, f)
    return str(directory)


TRANSFORMER = ("sentence_transformers.models.Transformer", "")
POOLING = ("sentence_transformers.models.Pooling", "1_Pooling")
NORMALIZE = ("sentence_transformers.models.Normalize", "2_Normalize")
LEGACY = {"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
          "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
          "pooling_mode_mean_sqrt_len_tokens": False}


@pytest.mark.parametrize("pooling, modules, expected", [
    ({**LEGACY, "pooling_mode_cls_token": True}, [TRANSFORMER, POOLING, NORMALIZE], ("cls", True)),
    ({**LEGACY, "pooling_mode_lasttoken": True}, [TRANSFORMER, POOLING], ("last", False)),
    (LEGACY, [TRANSFORMER, POOLING], ("mean", False)),  # no flag set: mean (sentence-transformers)
    ({"embedding_dimension": 64, "pooling_mode": "cls"},
     [("sentence_transformers.base.modules.transformer.Transformer", ""),
      ("sentence_transformers.sentence_transformer.modules.pooling.Pooling", "1_Pooling"),
      ("sentence_transformers.base.modules.normalize.Normalize", "2_Normalize")], ("cls", True)),
    ({"pooling_mode": ["lasttoken"]}, [TRANSFORMER, POOLING], ("last", False)),
])
def test_pooling_modes_are_read(tmp_path, pooling, modules, expected):
    cfg = read_pooling_config(write_st(tmp_path / "m", modules=modules, pooling=pooling))
    assert (cfg.mode, cfg.normalize) == expected


@pytest.mark.parametrize("pooling, modules, message", [
    ({**LEGACY, "pooling_mode_max_tokens": True}, [TRANSFORMER, POOLING],
     r"1_Pooling/config.json: pooling mode 'max' is not supported"),
    ({"pooling_mode": "weightedmean"}, [TRANSFORMER, POOLING],
     r"1_Pooling/config.json: pooling mode 'weightedmean' is not supported"),
    ({**LEGACY, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
     [TRANSFORMER, POOLING], r"1_Pooling/config.json: combined pooling modes \(cls, mean\)"),
    ({"pooling_mode": "mean", "include_prompt": False}, [TRANSFORMER, POOLING],
     "include_prompt false"),
    ({"pooling_mode": "cls"}, [TRANSFORMER, POOLING, ("sentence_transformers.models.Dense", "2_Dense")],
     r"modules.json: unsupported sentence-transformers modules sentence_transformers.models.Dense"),
    ({"pooling_mode": "cls"}, [TRANSFORMER], "expected exactly one Pooling module, found 0"),
])
def test_unsupported_pooling_fails_naming_the_file(tmp_path, pooling, modules, message):
    with pytest.raises(ConfigError, match=message):
        read_pooling_config(write_st(tmp_path / "m", modules=modules, pooling=pooling))


def test_prompts_and_plain_hf_defaults(tmp_path):
    prompts = {"query": "Represent this sentence for searching relevant passages: ",
               "document": ""}
    plain = read_pooling_config(write_st(
        tmp_path / "plain", st_config={"prompts": prompts, "default_prompt_name": "query"},
        hf_config={"hidden_size": 64, "matryoshka_dimensions": [32]}))
    assert plain == PoolingConfig(mode="cls", normalize=True, matryoshka_dimensions=(32,),
                                  prompts=prompts, default_prompt_name="query")
    assert read_pooling_config(write_st(tmp_path / "empty")) == PoolingConfig()
    with pytest.raises(ConfigError, match="default_prompt_name 'passage' is not one of the prompts"):
        read_pooling_config(write_st(tmp_path / "bad", st_config={"prompts": prompts,
                                                                  "default_prompt_name": "passage"}))
    with pytest.raises(ConfigError, match=r"matryoshka_dimensions \[128\] exceed hidden_size 64"):
        read_pooling_config(write_st(tmp_path / "wide", hf_config={"hidden_size": 64,
                                                                   "matryoshka_dimensions": [128]}))
