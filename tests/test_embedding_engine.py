"""The embedding engine, its async front, the Embedder and ``arctic-jax embed``.

Oracles: transformers' BertModel (PyTorch, f32) run on each sequence alone, pooled and
normalised in numpy; sentence-transformers on the embedded all-MiniLM-L6-v2; HF tokenizers.
The engines compile once per module (a few small buckets); a test counts compilations while
serving varied shapes and requires none.
"""
from __future__ import annotations

import asyncio
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from arctic_jax.config import ConfigError
from arctic_jax.engine.compile_counter import CompileCounter
from arctic_jax.engine.embedding_config import EmbeddingEngineConfig
from arctic_jax.engine.embedding_engine import EmbeddingEngine, truncate_embeddings
from arctic_jax.engine.embedding_front import AsyncEmbeddingEngine
from arctic_jax.engine.embedding_scheduler import plan_all, plan_batch, program_shapes
from arctic_jax.engine.embedding_tokenizer import EmbeddingTokenizer
from arctic_jax.models.pooling import PoolingConfig, finalize
from checkpoints import load_model
from checkpoints.loader import DEFAULT_EMBEDDING_MODEL, default_embedding_model_path
from checkpoints.sentence_transformers import read_pooling_config
from helpers import cosine

SEED = int(np.random.SeedSequence().entropy % (2 ** 31))  # fresh each run; printed on failure
TOL = 2e-5
HF = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
          layer_norm_eps=1e-6, hidden_act="gelu")
MATRYOSHKA = (16, 32)
PROMPTS = {"query": "search for: ", "doc": "passage: "}
# 4 token buckets x 2 sequence buckets: 8 programs, each compiled once for the module.
ENGINE = dict(max_num_batched_tokens=128, token_buckets=(16, 32, 64, 128), max_num_seqs=8,
              seq_buckets=(2, 8))


@pytest.fixture(scope="module")
def rng():
    print(f"SEED={SEED}")
    return np.random.default_rng(SEED)


def random_bert(seed: int):
    cfg = transformers.BertConfig(**HF)
    cfg._attn_implementation = "eager"
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random (transformers zero-initialises biases)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1.0 + 0.1 * noise if "LayerNorm.weight" in name else 0.1 * noise)
    return model


def write_json(path, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def st_checkpoint(model, directory, *, mode: str, normalize: bool) -> str:
    """A sentence-transformers checkpoint of ``model``: Pooling (+ Normalize), prompts,
    Matryoshka dimensions."""
    directory = str(directory)
    model.save_pretrained(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    write_json(os.path.join(directory, "modules.json"), modules)
    write_json(os.path.join(directory, "1_Pooling", "config.json"),
               {"word_embedding_dimension": HF["hidden_size"],
                "pooling_mode_cls_token": mode == "cls", "pooling_mode_mean_tokens": mode == "mean"})
    write_json(os.path.join(directory, "config_sentence_transformers.json"),
               {"prompts": PROMPTS, "default_prompt_name": None})
    if normalize:  # only the first model declares Matryoshka dimensions
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        write_json(os.path.join(directory, "config.json"),
                   {**config, "matryoshka_dimensions": list(MATRYOSHKA)})
    return directory


def oracle(model, seqs, mode: str, normalize: bool) -> np.ndarray:
    """transformers' BertModel on each sequence alone, pooled (and normalised) in numpy."""
    out = []
    with torch.no_grad():
        for ids in seqs:
            hidden = model(input_ids=torch.tensor([list(ids)])).last_hidden_state[0].numpy()
            row = hidden[0] if mode == "cls" else hidden.mean(axis=0)
            out.append(row / np.linalg.norm(row) if normalize else row)
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, warmed-up engine): mean pooling, normalised, Matryoshka 16/32."""
    model = random_bert(SEED)
    directory = st_checkpoint(model, tmp_path_factory.mktemp("tiny"), mode="mean", normalize=True)
    loaded = load_model(directory, dtype=jnp.float32, use_cache=False, progress=False)
    engine = EmbeddingEngine(loaded, read_pooling_config(directory), EmbeddingEngineConfig(**ENGINE))
    counter = CompileCounter()
    engine.warmup()
    counter.close()
    assert counter.count >= len(engine.shapes) == 8  # the counter does see compiles
    yield model, engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    """(torch model, engine): CLS pooling, no normalisation, no Matryoshka; one program."""
    model = random_bert(SEED + 1)
    directory = st_checkpoint(model, tmp_path_factory.mktemp("tiny_cls"), mode="cls",
                              normalize=False)
    loaded = load_model(directory, dtype=jnp.float32, use_cache=False, progress=False)
    engine = EmbeddingEngine(loaded, read_pooling_config(directory),
                             EmbeddingEngineConfig(token_buckets=(64,), seq_buckets=(8,)))
    yield model, engine
    engine.close()


def batches_run(engine) -> float:
    return engine.metrics.registry.get_sample_value("arctic_embedding_batches_total")


def random_seqs(rng, lengths):
    return [rng.integers(0, HF["vocab_size"], int(n)).tolist() for n in lengths]


# ----------------------------------------------------------------------------- batching plan
def test_plan_packs_fifo_into_compiled_shapes(rng):
    tokens, seqs = (16, 32, 64, 128), (2, 8)
    shapes = set(program_shapes(tokens, seqs, 8))
    for _ in range(200):
        lengths = rng.integers(1, 65, rng.integers(1, 40)).tolist()
        plans = plan_all(lengths, tokens, seqs, 8)
        assert sum(p.num_seqs for p in plans) == len(lengths)
        start = 0
        for p in plans:
            assert p.num_tokens == sum(lengths[start:start + p.num_seqs]) <= p.token_bucket
            assert p.num_seqs <= p.seq_bucket and (p.token_bucket, p.seq_bucket) in shapes
            start += p.num_seqs


def test_plan_fills_the_budget_and_avoids_big_padding():
    tokens, seqs = (16, 32, 64, 128), (2, 8)
    assert plan_batch([40] * 5, tokens, seqs, 8).num_seqs == 3                 # 120 of 128
    assert plan_batch([1] * 20, tokens, seqs, 8).num_seqs == 8                 # max_num_seqs
    p = plan_batch([64, 8], tokens, seqs, 8)        # 72 tokens: 128 pads 44%; 64 + 16 pad less
    assert (p.num_seqs, p.token_bucket) == (1, 64)
    p = plan_batch([30, 30], tokens, seqs, 8)       # 60 of 64: little padding, one batch
    assert (p.num_seqs, p.token_bucket, p.seq_bucket) == (2, 64, 2)
    assert plan_batch([40, 40, 10], tokens, seqs, 8).token_bucket == 128  # 90: split pads more


# ----------------------------------------------------------------------------- numerics
def test_embeddings_match_each_sequence_alone_across_batches(tiny, rng):
    model, engine = tiny
    lengths = rng.integers(1, 65, 30)
    lengths[:3] = (1, 64, 2)
    seqs = random_seqs(rng, lengths)
    batches = batches_run(engine)
    got = engine.embed_token_ids(seqs)
    assert got.shape == (30, HF["hidden_size"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, oracle(model, seqs, "mean", True), atol=TOL, rtol=0)
    plans = engine.plan([len(s) for s in seqs])
    assert len(plans) >= 3 and max(p.num_seqs for p in plans) > 1
    assert batches_run(engine) - batches == len(plans)


def test_cls_pooling_without_normalisation(tiny_cls, rng):
    model, engine = tiny_cls
    seqs = random_seqs(rng, [5, 64, 1, 17, 33, 2])
    got = engine.embed_token_ids(seqs)
    np.testing.assert_allclose(got, oracle(model, seqs, "cls", False), atol=TOL, rtol=1e-5)
    with pytest.raises(ValueError, match="matryoshka"):
        engine.embed_token_ids(seqs, dimensions=16)
    np.testing.assert_array_equal(engine.embed_token_ids(seqs, dimensions=HF["hidden_size"]), got)


def test_matryoshka_dimensions_truncate_then_renormalise(tiny, rng):
    model, engine = tiny
    seqs = random_seqs(rng, [3, 40, 12])
    raw = oracle(model, seqs, "mean", False)
    for d in MATRYOSHKA:
        got = engine.embed_token_ids(seqs, dimensions=d)
        assert got.shape == (3, d)
        np.testing.assert_allclose(got, np.asarray(finalize(jnp.asarray(raw), d, True)),
                                   atol=TOL, rtol=0)
    rows = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    for normalize in (True, False):
        np.testing.assert_allclose(truncate_embeddings(rows, 16, normalize),
                                   np.asarray(finalize(jnp.asarray(rows), 16, normalize)),
                                   rtol=1e-6, atol=1e-7)


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny, rng):
    _, engine = tiny
    long_seq = random_seqs(rng, [80])[0]
    short = random_seqs(rng, [10])[0]
    got = engine.embed_token_ids([long_seq, short], truncate_prompt_tokens=20)
    np.testing.assert_allclose(got, engine.embed_token_ids([long_seq[-20:], short]), atol=1e-6)
    got = engine.embed_token_ids([long_seq], truncate_prompt_tokens=-1)      # max_model_len
    np.testing.assert_allclose(got, engine.embed_token_ids([long_seq[-64:]]), atol=1e-6)
    for bad in (0, -2, 65, 2.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            engine.embed_token_ids([short], truncate_prompt_tokens=bad)


def test_truncation_keeps_a_leading_cls_token(tiny, rng):
    """With the tokenizer's leading special id ([CLS]) known, cutting a token-id input keeps it
    first and the last k - 1 tokens after it; other inputs keep their last k tokens."""
    _, engine = tiny
    seq, other = (list(map(int, s)) for s in random_seqs(rng, [80, 50]))
    saved = engine.leading_special_ids
    try:
        engine.leading_special_ids = frozenset({seq[0]})
        got, plain = engine.prepare([seq, [x for x in other if x != seq[0]]], 20)
        assert got.tolist() == seq[:1] + seq[-19:]
        assert plain.tolist() == [x for x in other if x != seq[0]][-20:]
    finally:
        engine.leading_special_ids = saved


@pytest.mark.parametrize("inputs, dims, message", [
    ([], None, "no inputs"),
    ([[1, 2], []], None, "input 1 is empty"),
    ([[1, 2], [3] * 65], None, "input 1 has 65 tokens, more than max_model_len 64"),
    ([[1, 97]], None, "token id 97 outside"),
    ([[1, -1]], None, "token id -1 outside"),
    ([[1.5, 2.0]], None, "integer token ids"),
    (["abc"], None, "string"),
    ([[1, 2]], 24, "dimensions 24 is not supported"),
    ([[1, 2]], 0, "at least 1"),
    ([[1, 2]], 65, "not supported"),
    ([[1, 2]], True, "must be an integer"),
])
def test_bad_input_is_named(tiny, inputs, dims, message):
    _, engine = tiny
    with pytest.raises(ValueError, match=message):
        engine.embed_token_ids(inputs, dims)


def test_bad_configs_fail_clearly(tiny):
    _, engine = tiny
    for kwargs, message in [
        (dict(max_model_len=65), "exceeds the model's max_position_embeddings 64"),
        (dict(max_num_batched_tokens=32), "token budget 32 .* is below max_model_len 64"),
        (dict(max_num_batched_tokens=128, token_buckets=(32, 64)), "must equal max_num_batched"),
        (dict(max_num_seqs=8, seq_buckets=(2, 4)), "must equal max_num_seqs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            EmbeddingEngineConfig(**kwargs).resolve(64, "cpu")
    for kwargs, message in [(dict(token_buckets=(64, 32)), "increasing"),
                            (dict(max_num_seqs=0), "positive integer"),
                            (dict(attention_impl="flash"), "attention_impl"),
                            (dict(dtype="int8"), "dtype")]:
        with pytest.raises(ConfigError, match=message):
            EmbeddingEngineConfig(**kwargs)
    limits = EmbeddingEngineConfig().resolve(512, "cpu")
    assert (limits.max_model_len, limits.attention_impl) == (512, "reference")
    assert limits.token_buckets[-1] == limits.max_num_batched_tokens >= 512
    assert EmbeddingEngineConfig().resolve(512, "cpu", max_seq_length=256).max_model_len == 256
    assert EmbeddingEngineConfig().resolve(128, "cpu", max_seq_length=256).max_model_len == 128
    assert EmbeddingEngineConfig(max_model_len=512).resolve(512, "cpu", 256).max_model_len == 512
    # GPU: the Pallas kernel where it takes the heads, else the reference; never silently wrong
    assert EmbeddingEngineConfig().resolve(512, "gpu", head_dim=64).attention_impl == "pallas"
    assert EmbeddingEngineConfig().resolve(512, "gpu", head_dim=48).attention_impl == "reference"
    with pytest.raises(ConfigError, match="'pallas' needs a head_dim that is a power of 2 >= 16"):
        EmbeddingEngineConfig(attention_impl="pallas").resolve(512, "gpu", head_dim=48)
    generator = type("Loaded", (), {"spec": type("Spec", (), {"task": "generate", "name": "llama"}),
                                    "name": "smollm2"})
    with pytest.raises(ConfigError, match="not an embedding model"):
        EmbeddingEngine(generator, engine.pooling)


# ----------------------------------------------------------------------------- async front
def run_async(front, requests, *, hold: bool = True, **kwargs):
    """Submit every request concurrently; with ``hold`` the worker waits until all are
    queued (so the batches are exactly the plan of their concatenation). Returns the
    results (or exceptions) in order."""
    async def main():
        if not hold:
            return await asyncio.gather(*(front.embed(r, **kwargs) for r in requests),
                                        return_exceptions=True)
        with front._cond:  # re-entrant: the submitting coroutines run on this thread
            tasks = [asyncio.ensure_future(front.embed(r, **kwargs)) for r in requests]
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks, return_exceptions=True)
    return asyncio.run(main())


@pytest.fixture(scope="module")
def front(tiny):
    front = AsyncEmbeddingEngine(tiny[1])
    front.start()
    yield front
    front.shutdown()


def test_coalesced_requests_equal_one_call(tiny, front, rng):
    _, engine = tiny
    sizes = [1, 12, 3, 1, 7, 25, 2, 5]          # request 5 spans several batches
    requests = [random_seqs(rng, rng.integers(1, 65, n)) for n in sizes]
    flat = [s for r in requests for s in r]
    expected = engine.embed_token_ids(flat)
    batches = batches_run(engine)
    results = run_async(front, requests)
    assert batches_run(engine) - batches == len(engine.plan([len(s) for s in flat]))
    assert len(engine.plan([len(s) for s in flat])) < sum(len(engine.plan([len(s) for s in r]))
                                                          for r in requests)
    offsets = np.cumsum([0] + sizes)
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got, expected[offsets[i]:offsets[i + 1]])
    unheld = run_async(front, requests, hold=False, dimensions=16)  # any interleaving
    for i, got in enumerate(unheld):
        np.testing.assert_allclose(got, truncate_embeddings(expected[offsets[i]:offsets[i + 1]],
                                                            16, True), atol=1e-6)
    queue_time = front.metrics.registry.get_sample_value("arctic_embedding_queue_time_seconds_sum")
    assert queue_time > 0 and front.num_requests() == 0
    assert b"arctic_embedding_batch_fill_ratio" in front.render_metrics()


def test_a_bad_request_never_affects_others(tiny, front, rng, monkeypatch):
    _, engine = tiny
    good = [random_seqs(rng, [30, 5]), random_seqs(rng, [64])]
    bad = [[], [[1, 2], []], [[5] * 65], [[200]]]
    results = run_async(front, [good[0], *bad, good[1]], hold=False)
    np.testing.assert_allclose(results[0], engine.embed_token_ids(good[0]), atol=1e-6)
    np.testing.assert_allclose(results[-1], engine.embed_token_ids(good[1]), atol=1e-6)
    assert all(isinstance(r, ValueError) for r in results[1:-1])

    # A device batch that fails fails only its own requests.
    first = random_seqs(rng, [16] * 8)           # exactly one full batch
    later = random_seqs(rng, [9, 3])
    real_collect = engine.collect
    calls = []

    def failing_collect(out, n):
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real_collect(out, n)

    monkeypatch.setattr(engine, "collect", failing_collect)
    results = run_async(front, [first, later])
    assert isinstance(results[0], RuntimeError) and "device lost" in str(results[0])
    np.testing.assert_array_equal(results[1], engine.embed_token_ids(later))
    assert front.alive


def test_a_cancelled_request_is_dropped(tiny, front, rng):
    _, engine = tiny
    big, small = random_seqs(rng, [60] * 6), random_seqs(rng, [10, 20])
    failed = front.metrics.registry.get_sample_value("arctic_embedding_requests_failed_total")
    batches = batches_run(engine)

    async def main():
        with front._cond:  # nothing runs until the big request is cancelled
            first = asyncio.ensure_future(front.embed(big))
            second = asyncio.ensure_future(front.embed(small))
            await asyncio.sleep(0)
            first.cancel()
            await asyncio.sleep(0)
        return await asyncio.gather(first, second, return_exceptions=True)

    cancelled, result = asyncio.run(main())
    assert isinstance(cancelled, asyncio.CancelledError)
    np.testing.assert_array_equal(result, engine.embed_token_ids(small))
    assert batches_run(engine) - batches == 2          # small's batch, then the check's own
    assert front.metrics.registry.get_sample_value(
        "arctic_embedding_requests_failed_total") == failed + 1
    assert front.alive and front.num_requests() == 0


def test_no_compilation_while_serving(tiny, front, rng):
    _, engine = tiny
    counter = CompileCounter()
    engine.compile_counter.count = 0  # process-wide: other tests' compilations are not ours
    try:
        for lengths in ([1], [64], [64, 64], [1] * 20, rng.integers(1, 65, 40)):
            engine.embed_token_ids(random_seqs(rng, lengths))
        engine.embed_token_ids(random_seqs(rng, [7, 50]), dimensions=32)
        run_async(front, [random_seqs(rng, rng.integers(1, 65, n)) for n in (1, 9, 4, 30)],
                  hold=False)
        assert counter.count == 0
        assert engine.compiles_after_warmup == 0
    finally:
        counter.close()


# ----------------------------------------------------------------------------- text, Embedder, CLI
TEXTS = ["hello world",
         "The quick brown fox jumps over the lazy dog.",
         "Embeddings map text to vectors; similar meanings land close together. " * 6,
         "a",
         "JAX compiles a program once per shape, so the engine pads batches to buckets.",
         "Pallas kernels: " + "attention within each packed sequence, " * 10]
EMBEDDER = dict(max_num_batched_tokens=512, token_buckets=(64, 512), max_num_seqs=8,
                seq_buckets=(8,))


@pytest.fixture(scope="module")
def minilm():
    from arctic_jax import Embedder

    return Embedder(DEFAULT_EMBEDDING_MODEL, **EMBEDDER)


@pytest.fixture(scope="module")
def minilm_expected(minilm):
    import sentence_transformers as st
    model = st.SentenceTransformer(default_embedding_model_path(), device="cpu")
    return model.encode(TEXTS, convert_to_numpy=True, batch_size=4)


def test_embedder_matches_sentence_transformers(minilm, minilm_expected):
    lengths = [len(ids) for ids in minilm.tokenize(TEXTS)]
    assert max(lengths) < 256 and min(lengths) == 3  # below sentence-transformers' truncation
    got = minilm.embed(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert cosine(got, minilm_expected).min() >= 0.99999
    for i in (2, 3):                                 # each text alone (no packing)
        assert cosine(minilm.embed(TEXTS[i])[0], minilm_expected[i]) >= 0.99999
    np.testing.assert_allclose(minilm.embed(TEXTS, batch_size=4), got, atol=1e-6)


def test_embedder_tokenization_prompts_and_errors(minilm):
    hf = minilm.tokenizer.tokenizer
    assert minilm.tokenize(TEXTS) == [hf(t)["input_ids"] for t in TEXTS]
    keep = minilm.tokenize([TEXTS[5]], truncate_prompt_tokens=12)
    hf.truncation_side = "left"
    try:
        assert keep == [hf(TEXTS[5], truncation=True, max_length=12)["input_ids"]]
    finally:
        hf.truncation_side = "right"
    with pytest.raises(ValueError, match="unknown prompt_name 'query'; this model's prompts: none"):
        minilm.embed(TEXTS, prompt_name="query")
    with pytest.raises(ValueError, match="no inputs"):
        minilm.embed([])
    with pytest.raises(ValueError, match="input 4 is an empty string"):
        minilm.embed(["a", "b", "c", "d", ""], batch_size=2)
    assert minilm.max_model_len == 256   # sentence-transformers' max_seq_length, below 512
    with pytest.raises(ValueError, match="input 1 has 300 tokens, more than max_model_len 256"):
        minilm.embed(["ok", "word " * 298])
    with pytest.raises(ValueError, match="no matryoshka_dimensions"):
        minilm.embed(TEXTS, dimensions=128)


def test_tokenizer_prompts_and_threads(minilm):
    hf = minilm.tokenizer.tokenizer
    pooling = PoolingConfig(mode="mean", prompts=PROMPTS, default_prompt_name="doc")
    tok = EmbeddingTokenizer(hf, pooling, num_threads=3)
    assert tok.encode(["x y"], prompt_name="query") == [hf("search for: x y")["input_ids"]]
    assert tok.encode(["x y"]) == [hf("passage: x y")["input_ids"]]   # the default prompt

    async def many():
        return await asyncio.gather(*(tok.encode_async(TEXTS, prompt_name="query")
                                      for _ in range(12)))
    expected = [hf(PROMPTS["query"] + t)["input_ids"] for t in TEXTS]
    assert all(r == expected for r in asyncio.run(many()))
    # Truncation cuts the text, never the prompt: [CLS] prompt <last text tokens> [SEP].
    text = " ".join(TEXTS)
    prompt_ids = hf(PROMPTS["query"], add_special_tokens=False)["input_ids"]
    text_ids = hf(text, add_special_tokens=False)["input_ids"]
    [cut] = tok.encode([text], prompt_name="query", keep=16)
    assert cut == ([hf.cls_token_id] + prompt_ids + text_ids[-(16 - 2 - len(prompt_ids)):]
                   + [hf.sep_token_id])
    with pytest.raises(ValueError, match="no room for text besides the 2 special tokens and the"):
        tok.encode([text], prompt_name="query", keep=2 + len(prompt_ids))
    tok.close()


def test_embed_command_writes_npy(minilm, minilm_expected, tmp_path, capsys):
    from arctic_jax.cli import main

    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    flags = ["--max-num-batched-tokens", "512", "--token-buckets", "64,512", "--max-num-seqs", "8",
             "--seq-buckets", "8"]
    assert main(["embed", "--input", str(source), "--output", str(out), *flags]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"{len(TEXTS)} texts, ")
    assert "tokens/s" in summary[0]
    got = np.load(out)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert cosine(got, minilm_expected).min() >= 0.99999

    source.write_text("one\n\nthree\n", encoding="utf-8")
    assert main(["embed", "--input", str(source), "--output", str(out), *flags]) == 2
    assert "line 2 is empty" in capsys.readouterr().err
