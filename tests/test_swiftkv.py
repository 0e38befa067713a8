"""The SwiftKV Llama (models.swiftkv): checkpoints in Snowflake's layout, written here, loaded and
run through the paged step against a float64 numpy oracle of the published forward pass
(``oracles.swiftkv_forward_hf``, whole sequence, no cache); Lkv = L is the Llama step; the paged
equivalences (one prefill = chunked = token by token; mixed = each alone) with logits on the
last token only, as the engine asks; AcrossKV's smaller cache; bad checkpoints and configs.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.kv_cache import KVCache
from arctic_jax.models import llama, swiftkv
from arctic_jax.models.llama_weights import random_weights as llama_random_weights
from arctic_jax.models.registry import SWIFTKV
from arctic_jax.models.swiftkv_config import SwiftKVConfig
from arctic_jax.models.swiftkv_weights import SwiftKVWeights, random_weights
from checkpoints import load_model
from checkpoints.errors import CheckpointError
from helpers import deal_pages
from oracles import rel_err, swiftkv_forward_hf
from test_checkpoints import write_hf as write_checkpoint

PS = 4
NUM_PAGES = 40
ORACLE_TOL = 2e-4
SELF_TOL = 1e-5
BUCKETS = Buckets(tokens=(8, 32), seqs=(1, 4), pages=(8,))

# name -> config.json fields (beyond the common ones below)
CONFIGS = {
    # GQA 2, Lkv = 2 of 4, no AcrossKV.
    "gqa2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_key_value_layers=2, key_value_group_size=1),
    # GQA 4 with attention and MLP biases, tied head, llama3 rope; Lkv = 1 of 5, AcrossKV g = 2.
    "across2_bias": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                         num_key_value_layers=1, key_value_group_size=2, attention_bias=True,
                         mlp_bias=True, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16},
                         rope_theta=500.0),
    # MHA (3 heads), Lkv = 2 of 6, AcrossKV g = 4: the cache holds 3 layers, not 6.
    "across4": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=6,
                    num_attention_heads=3, num_key_value_heads=3, head_dim=16,
                    num_key_value_layers=2, key_value_group_size=4),
}


def config_dict(name: str) -> dict:
    return {"architectures": ["LlamaSwiftKVForCausalLM"], "model_type": "llama_swiftkv",
            "swiftkv": True, "vocab_size": 211, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 256, "tie_word_embeddings": False, **CONFIGS[name]}


def hf_tensors(d: dict, rng: np.random.Generator, teacher: bool = True) -> dict[str, np.ndarray]:
    """Random tensors of a SwiftKV checkpoint in Snowflake's layout; ``teacher``: also the unused
    q/k/v projections of the later layers."""
    H, I, V = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    N, K, D = d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    L, Lkv, g = d["num_hidden_layers"], d["num_key_value_layers"], d["key_value_group_size"]
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
              "model.norm_swiftkv.weight": (H,)}
    if not d["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, H)
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.o_proj.weight": (H, N * D), p + "mlp.gate_proj.weight": (I, H),
                       p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)})
        qkv = ["q", "k", "v"] if i < Lkv or teacher else []
        if i >= Lkv:
            qkv += ["q_swiftkv"] + (["k_swiftkv", "v_swiftkv"] if (i - Lkv) % g == 0 else [])
        for n in qkv:
            rows = N * D if n.startswith("q") else K * D
            shapes[p + f"self_attn.{n[0]}_proj{n[1:]}.weight"] = (rows, H)
            if d.get("attention_bias"):
                shapes[p + f"self_attn.{n[0]}_proj{n[1:]}.bias"] = (rows,)
        if d.get("attention_bias"):
            shapes[p + "self_attn.o_proj.bias"] = (H,)
        if d.get("mlp_bias"):
            shapes.update({p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,),
                           p + "mlp.down_proj.bias": (H,)})
    out = {}
    for n, s in shapes.items():
        if n.endswith("norm.weight") or n.endswith("layernorm.weight") or "norm_swiftkv" in n:
            out[n] = (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)
        else:
            out[n] = (0.15 * rng.standard_normal(s)).astype(np.float32)
    return out


def load(path):
    return load_model(str(path), dtype=jnp.float32, progress=False, use_cache=False)


class Loaded:
    """A written and loaded checkpoint per config, with its jitted forward."""

    def __init__(self, tmp_factory):
        self.tmp, self.cache = tmp_factory, {}

    def __call__(self, name):
        if name not in self.cache:
            d = config_dict(name)
            tensors = hf_tensors(d, np.random.default_rng(len(self.cache) + 7))
            path = write_checkpoint(self.tmp.mktemp(name), d, tensors)
            model = load(path)
            self.cache[name] = (d, tensors, model, step_fn(model.config))
        return self.cache[name]


def step_fn(cfg):
    """The jitted ``(weights, cache, batch) -> (logits, cache)`` of the SwiftKV step."""
    def forward(w, c, b):
        hidden, c = swiftkv.step(w, c, b, cfg=cfg)
        return llama.head(w, hidden, cfg=cfg), c
    return jax.jit(forward, donate_argnums=(1,))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return Loaded(tmp_path_factory)


def stale_cache(cfg, rng) -> KVCache:
    """A cache of random non-zero values (stale slots must never reach a result)."""
    shape = (cfg.num_kv_heads, NUM_PAGES, PS, cfg.head_dim)
    draw = lambda: jnp.asarray(rng.standard_normal(shape, dtype=np.float32) + 3.0)  # noqa: E731
    return KVCache(k=tuple(draw() for _ in range(cfg.num_cache_layers)),
                   v=tuple(draw() for _ in range(cfg.num_cache_layers)), page_size=PS)


def run(step, weights, cache, chunks):
    """One step; per-chunk logits (numpy) and the new cache."""
    batch, n = build_step_batch(chunks, PS, BUCKETS)
    logits, cache = step(weights, cache, batch)
    logits = np.asarray(logits)[:n]
    assert np.isfinite(logits).all()
    out, r = [], 0
    for c in chunks:
        out.append(logits[r:r + len(c.wanted())])
        r += len(c.wanted())
    return out, cache


def chunk(tokens, start, pages, every=False):
    return SequenceChunk(tokens=[int(t) for t in tokens], start=start, pages=pages,
                         logits_at=list(range(len(tokens))) if every else None)


# --------------------------------------------------------------------------- the oracle

@pytest.mark.parametrize("name", list(CONFIGS))
def test_loaded_step_matches_the_oracle(loaded, name):
    """Two sequences prefilled in one step on interleaved pages, logits at every position."""
    d, tensors, model, step = loaded(name)
    cfg = model.config
    assert isinstance(cfg, SwiftKVConfig) and isinstance(model.weights, SwiftKVWeights)
    L, Lkv, g = d["num_hidden_layers"], d["num_key_value_layers"], d["key_value_group_size"]
    assert cfg.num_cache_layers == Lkv + (L - Lkv) // g
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in (13, 17)]
    pages = deal_pages(rng, [-(-len(s) // PS) for s in seqs], NUM_PAGES)
    cache = stale_cache(cfg, rng)
    assert len(cache.k) == cfg.num_cache_layers
    got, _ = run(step, model.weights, cache, [chunk(s, 0, p, every=True)
                                              for s, p in zip(seqs, pages, strict=True)])
    for g_, s in zip(got, seqs, strict=True):
        want = swiftkv_forward_hf(tensors, cfg, s)
        assert rel_err(g_, want) <= ORACLE_TOL


def test_the_oracle_depends_on_the_swiftkv_tensors(loaded):
    """A check that the oracle comparison can fail: the teacher's own late-layer K/V give other
    logits, and so does a perturbed norm_swiftkv."""
    d, tensors, model, _ = loaded("gqa2")
    s = np.random.default_rng(4).integers(0, d["vocab_size"], 11)
    base = swiftkv_forward_hf(tensors, model.config, s)
    teacher = dict(tensors)
    for i in range(d["num_key_value_layers"], d["num_hidden_layers"]):
        for n in "qkv":
            teacher[f"model.layers.{i}.self_attn.{n}_proj_swiftkv.weight"] = \
                tensors[f"model.layers.{i}.self_attn.{n}_proj.weight"]
    assert rel_err(swiftkv_forward_hf(teacher, model.config, s), base) > 0.05
    bumped = {**tensors, "model.norm_swiftkv.weight": tensors["model.norm_swiftkv.weight"] * 1.5}
    assert rel_err(swiftkv_forward_hf(bumped, model.config, s), base) > 0.01


# --------------------------------------------------------------------------- paged equivalences

@pytest.mark.parametrize("name", ["gqa2", "across2_bias"])
def test_prefill_chunked_and_token_by_token_agree(loaded, name):
    """The last-token logits of one prefill, of a chunked prefill (3, 5, 2, 7) and of token by
    token decoding agree, each chunk asking only for its last token (as the engine does)."""
    _, tensors, model, step = loaded(name)
    cfg = model.config
    rng = np.random.default_rng(5)
    s = rng.integers(0, cfg.vocab_size, 17)
    pages = [int(p) for p in rng.permutation(NUM_PAGES)[:5]]
    want = swiftkv_forward_hf(tensors, cfg, s)

    def last_logits(sizes):
        cache, start, out = stale_cache(cfg, rng), 0, []
        for n in sizes:
            (logits,), cache = run(step, model.weights, cache, [chunk(s[start:start + n], start, pages)])
            out.append(logits[0])
            start += n
        return np.stack(out), np.cumsum(sizes) - 1

    for sizes in [(17,), (3, 5, 2, 7), (1,) * 17]:
        got, at = last_logits(sizes)
        assert rel_err(got, want[at]) <= ORACLE_TOL, sizes


def test_mixed_step_matches_each_sequence_alone(loaded):
    """Decodes, a mid-prompt chunk and a fresh prompt in one step, last-token logits each."""
    _, _, model, step = loaded("across2_bias")
    cfg = model.config
    rng = np.random.default_rng(6)
    plan = [(12, 1), (5, 6), (0, 4), (3, 1)]     # (cached prefix, tokens in the mixed step)
    seqs = [rng.integers(0, cfg.vocab_size, pre + n) for pre, n in plan]
    pages = deal_pages(rng, [-(-len(s) // PS) for s in seqs], NUM_PAGES)
    alone = []
    for s, p in zip(seqs, pages, strict=True):
        (logits,), _ = run(step, model.weights, stale_cache(cfg, rng), [chunk(s, 0, p, every=True)])
        alone.append(logits)
    cache = stale_cache(cfg, rng)
    prefixed = [i for i, (pre, _) in enumerate(plan) if pre]
    _, cache = run(step, model.weights, cache, [chunk(seqs[i][:plan[i][0]], 0, pages[i])
                                                for i in prefixed])
    got, _ = run(step, model.weights, cache, [chunk(s[pre:], pre, p) for s, p, (pre, _)
                                              in zip(seqs, pages, plan, strict=True)])
    for i, (g, (pre, n)) in enumerate(zip(got, plan, strict=True)):
        assert rel_err(g[0], alone[i][pre + n - 1]) <= SELF_TOL, f"sequence {i}"


def test_rows_batch_of_a_token_subset():
    """``rows_batch``: rows of consecutive tokens keep their positions and sequences; the KV
    length of a plain sequence ends at its last row; sequences without rows get 0."""
    chunks = [SequenceChunk([1, 2, 3, 4, 5], 3, [0, 1, 2], logits_at=[2, 3]),
              SequenceChunk([6, 7, 8], 0, [3], logits_at=[]),
              SequenceChunk([9], 7, [4, 5])]
    batch, n = build_step_batch(chunks, PS, BUCKETS)
    rows = swiftkv.rows_batch(jax.tree.map(jnp.asarray, batch))
    assert n == 3
    np.testing.assert_array_equal(np.asarray(rows.positions)[:3], [5, 6, 7])
    np.testing.assert_array_equal(np.asarray(rows.tokens)[:3], [3, 4, 9])
    np.testing.assert_array_equal(np.asarray(rows.seq_ids)[:3], [0, 0, 2])
    np.testing.assert_array_equal(np.asarray(rows.query_start), [0, 2, 2, 3, 3])
    np.testing.assert_array_equal(np.asarray(rows.kv_lens), [7, 0, 8, 0])
    assert (np.asarray(rows.slot_mapping)[3:] == -1).all()


# --------------------------------------------------------------------------- Lkv = L

def test_lkv_equal_to_the_layer_count_is_the_llama_step():
    base = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = SwiftKVConfig(**{f: getattr(base, f) for f in base.__dataclass_fields__},
                        num_key_value_layers=3)
    assert cfg.num_cache_layers == 3 and cfg.num_late_layers == 0
    lw = llama_random_weights(base, jax.random.key(2), scale=0.2)
    sw = SwiftKVWeights(embed=lw.embed, final_norm=lw.final_norm, lm_head=lw.lm_head,
                        layers=lw.layers)
    SWIFTKV.validate_weights(sw, cfg)
    rng = np.random.default_rng(9)
    chunks = [chunk(rng.integers(0, 97, 9), 0, [0, 1, 2], every=True),
              chunk(rng.integers(0, 97, 3), 0, [3])]
    batch, _ = build_step_batch(chunks, PS, BUCKETS)
    want, _ = jax.jit(lambda w, c, b: llama.step(w, c, b, cfg=base))(
        lw, stale_cache(base, np.random.default_rng(1)), batch)
    got, _ = jax.jit(lambda w, c, b: swiftkv.step(w, c, b, cfg=cfg))(
        sw, stale_cache(cfg, np.random.default_rng(1)), batch)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_random_weights_validate_and_run():
    cfg = SwiftKVConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                        num_key_value_layers=2, key_value_group_size=2)
    w = random_weights(cfg, jax.random.key(0))
    SWIFTKV.validate_weights(w, cfg)
    assert w.kv_fanout.shape == (32, 1, 2, 2, 8) and w.kv_fanout_bias.shape == (1, 2, 2, 8)
    assert len(w.layers) == 2 and len(w.late_layers) == 2
    with pytest.raises(ValueError, match="late_layers: 1 layers, expected 2"):
        SWIFTKV.validate_weights(SwiftKVWeights(**{**w.__dict__, "late_layers": w.late_layers[:1]}),
                                 cfg)


# --------------------------------------------------------------------------- bad input

def test_teacher_tensors_are_skipped_and_logged(tmp_path, caplog):
    d = config_dict("gqa2")
    tensors = hf_tensors(d, np.random.default_rng(1))
    with caplog.at_level(logging.INFO, logger="checkpoints.hf_layout"):
        load(write_checkpoint(tmp_path / "a", d, tensors))
    assert "model.layers.3.self_attn.q_proj.weight" in caplog.text
    assert "skipping 6 tensors" in caplog.text
    # without them the checkpoint loads as well
    load(write_checkpoint(tmp_path / "b", d, hf_tensors(d, np.random.default_rng(1), teacher=False)))


@pytest.mark.parametrize("name,edit,match", [
    ("gqa2", lambda t: t.pop("model.norm_swiftkv.weight"), "model.norm_swiftkv.weight"),
    ("gqa2", lambda t: t.pop("model.layers.2.self_attn.k_proj_swiftkv.weight"), "k_proj_swiftkv"),
    # AcrossKV g = 2 from layer 1: layer 2 shares layer 1's K/V and must not have its own
    ("across2_bias", lambda t: t.update({"model.layers.2.self_attn.v_proj_swiftkv.weight":
                                         np.ones((12, 48), np.float32)}),
     "unexpected.*layers.2.self_attn.v_proj_swiftkv"),
    ("gqa2", lambda t: t.update({"model.layers.2.self_attn.q_proj_swiftkv.weight":
                                 np.ones((8, 64), np.float32)}), "q_proj_swiftkv"),
    ("gqa2", lambda t: t.update({"model.layers.3.self_attn.q_proj.weight":
                                 np.ones((8, 64), np.float32)}), "layers.3.self_attn.q_proj"),
    ("gqa2", lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"), "layers.1.self_attn.q_proj"),
])
def test_bad_checkpoints_fail_naming_the_tensor(tmp_path, name, edit, match):
    d = config_dict(name)
    tensors = hf_tensors(d, np.random.default_rng(2))
    edit(tensors)
    with pytest.raises(CheckpointError, match=match):
        load(write_checkpoint(tmp_path, d, tensors))


@pytest.mark.parametrize("fields,match", [
    ({"num_key_value_layers": 0}, "num_key_value_layers must be an integer in 1..num_hidden_layers"),
    ({"num_key_value_layers": 5}, "num_key_value_layers must be"),
    ({"num_key_value_layers": 1, "key_value_group_size": 2}, r"\(L - Lkv\) % g must be 0"),
    ({"key_value_group_size": 0}, "key_value_group_size must be a positive integer"),
])
def test_impossible_configs_fail(tmp_path, fields, match):
    d = {**config_dict("gqa2"), **fields}
    write_checkpoint(tmp_path, d, {"x": np.ones(2, np.float32)})
    with pytest.raises(ConfigError, match=match):
        load(tmp_path)


def test_config_defaults_and_swiftkv_false():
    d = config_dict("gqa2")
    assert SWIFTKV.parse_config({**d, "key_value_group_size": None}).key_value_group_size == 1
    assert SWIFTKV.parse_config({**d, "num_key_value_layers": None}).num_key_value_layers == 4
    off = SWIFTKV.parse_config({**d, "swiftkv": False})
    assert off.num_key_value_layers == 4 and off.num_cache_layers == 4


# --------------------------------------------------------------------------- Pallas kernels

@pytest.mark.parametrize("tree", [False, True], ids=["chains", "token-tree"])
def test_pallas_kernels_match_the_reference_on_rows(loaded, tree):
    """The later layers' rows-only batch through the Pallas kernels (interpret mode here): a
    decode, a prefill chunk's last token and multi-row verify chunks (one a token tree) give the
    reference attention's logits."""
    from arctic_jax.attention.strategy import PagedAttention
    from arctic_jax.models.step_options import StepOptions

    _, _, model, _ = loaded("gqa2")
    cfg = model.config
    rng = np.random.default_rng(12)
    pages = deal_pages(rng, [5, 5, 5, 5], NUM_PAGES)
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in (18, 19, 16, 17)]
    cache = stale_cache(cfg, rng)
    prefix = [chunk(s[:12], 0, p) for s, p in zip(seqs, pages, strict=True)]
    parents = [-1, 0, 0, 2, 1] if tree else None
    chunks = [chunk(seqs[0][12:13], 12, pages[0]),                      # decode
              chunk(seqs[1][12:19], 12, pages[1]),                      # prefill, last token
              SequenceChunk([int(t) for t in seqs[2][12:16]], 12, pages[2],
                            logits_at=[0, 1, 2, 3]),                    # verify chain
              SequenceChunk([int(t) for t in seqs[3][12:17]], 12, pages[3],
                            logits_at=[0, 1, 2, 3, 4], parents=parents)]
    out = {}
    for impl in ("reference", "pallas"):
        opts = StepOptions(attention=PagedAttention(impl))

        @jax.jit
        def fwd(w, c, b, opts=opts):
            hidden, c = swiftkv.step(w, c, b, cfg=cfg, opts=opts)
            return llama.head(w, hidden, cfg=cfg), c

        c = jax.tree.map(jnp.copy, cache)
        b, _ = build_step_batch(prefix, PS, Buckets(tokens=(64,), seqs=(4,), pages=(8,)), tree=tree)
        _, c = fwd(model.weights, c, b)
        b, n = build_step_batch(chunks, PS, BUCKETS, tree=tree)
        logits, _ = fwd(model.weights, c, b)
        out[impl] = np.asarray(logits)[:n]
    assert n == 1 + 1 + 4 + 5
    assert rel_err(out["pallas"], out["reference"]) <= 1e-4
