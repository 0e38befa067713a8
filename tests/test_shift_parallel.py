"""Shift parallelism at the model-step level, on 8 simulated CPU devices (f32).

Every layout (TP=8, SP=8, SP=4 x TP=2, SP=2 x TP=4) and both step variants of
the shift layouts must reproduce the single-device step (``make_step_fn``) on
prefill, decode, mixed and chunked steps, with KV heads replicated and zero q
heads added where the heads do not split. The cache keeps one sharding across
variants: no program moves it, and a sequence may switch variant at any step.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.attention.strategy import PagedAttention
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.engine.engine import EngineConfig
from arctic_jax.engine.programs import jit_forward
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.llama import make_step_fn
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.models.registry import LLAMA
from oracles import rel_err
from sharding.deployment import Deployment
from sharding.mesh import ParallelConfig, make_mesh, resolve_parallel_config
from sharding.placement import place_weights, placed_config, plan_heads

TOL = 1e-4
PS = 4
NUM_PAGES = 37  # a page count no activation shape shares (the HLO check looks for cache shapes)
# One shape for every step: T=32 (a multiple of every SP size), S=4, 16 pages of 4 per sequence.
BUCKETS = Buckets(tokens=(32,), seqs=(4,), pages=(16,))

CONFIGS = {
    # GQA 4: KV heads replicated x4 on 8 devices, no zero heads.
    "gqa4": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=8, num_kv_heads=2, head_dim=16),
    # 8 KV heads: nothing to place; head_dim 8.
    "kv8": ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_layers=2,
                       num_heads=16, num_kv_heads=8, head_dim=8, rope_theta=500.0),
    # GQA 1 (MHA) with attention and MLP biases, tied head, vocab 100 (does not split over 8):
    # KV heads x2, 4 zero q heads (whose q bias must be zeroed too).
    "mha_bias": ModelConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=4, head_dim=12, attention_bias=True,
                            mlp_bias=True, tie_word_embeddings=True),
}

LAYOUTS = {
    "tp8": ParallelConfig(1, 8, "tp"),
    "sp8": ParallelConfig(8, 1, "sp"),
    "sp4tp2": ParallelConfig(4, 2, "shift"),
    "sp2tp4": ParallelConfig(2, 4, "shift"),
}
PROGRAMS = [(layout, v) for layout, pc in LAYOUTS.items() for v in pc.variants]

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


# --------------------------------------------------------------------------- helpers

def deal_pages(rng, counts, num_pages=NUM_PAGES):
    """Shuffled page ids dealt round-robin, so the sequences' pages interleave."""
    pool = [int(p) for p in rng.permutation(num_pages)]
    pages = [[] for _ in counts]
    while any(len(p) < c for p, c in zip(pages, counts, strict=True)):
        for p, c in zip(pages, counts, strict=True):
            if len(p) < c:
                p.append(pool.pop())
    return pages


@dataclasses.dataclass
class Scenario:
    """Steps of three sequences: prefill of 13 tokens, mixed, decode, chunked mixed, decode."""

    batches: list           # numpy StepBatch per step
    num_logits: list[int]   # real logits rows per step
    written: np.ndarray     # every cache slot the steps write


def make_scenario(vocab: int, seed: int) -> Scenario:
    rng = np.random.default_rng(seed)
    pa, pb, pc = deal_pages(rng, [5, 6, 2])
    seqs = {"a": (rng.integers(0, vocab, 17), pa), "b": (rng.integers(0, vocab, 22), pb),
            "c": (rng.integers(0, vocab, 8), pc)}

    def chunk(name, start, n):
        tokens, pages = seqs[name]
        return SequenceChunk(tokens=[int(t) for t in tokens[start:start + n]], start=start,
                             pages=pages)

    plan = [
        [chunk("a", 0, 13)],                                          # prefill, 13 tokens
        [chunk("a", 13, 1), chunk("b", 0, 9), chunk("c", 0, 5)],      # mixed, 15 tokens
        [chunk("a", 14, 1), chunk("b", 9, 1), chunk("c", 5, 1)],      # decode
        [chunk("b", 10, 11), chunk("a", 15, 1), chunk("c", 6, 1)],    # chunked prefill + decode
        [chunk("a", 16, 1), chunk("b", 21, 1), chunk("c", 7, 1)],     # decode
    ]
    batches, counts = [], []
    for chunks in plan:
        batch, n = build_step_batch(chunks, PS, BUCKETS)
        batches.append(batch)
        counts.append(n)
    written = np.concatenate([b.slot_mapping[b.slot_mapping >= 0] for b in batches])
    assert len(written) == 17 + 22 + 8 == len(set(written.tolist()))
    return Scenario(batches=batches, num_logits=counts, written=written)


def stale_cache(num_kv_heads: int, cfg: ModelConfig, rng, sharding=None) -> KVCache:
    """A cache of random non-zero values: stale slots must never reach a result."""
    shape = (num_kv_heads, NUM_PAGES, PS, cfg.head_dim)

    def draw():
        x = rng.standard_normal(shape, dtype=np.float32) + 3.0
        return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)

    return KVCache(k=tuple(draw() for _ in range(cfg.num_layers)),
                   v=tuple(draw() for _ in range(cfg.num_layers)), page_size=PS)


def run_steps(step, weights, cache, batches, counts):
    logits = []
    for batch, n in zip(batches, counts, strict=True):
        out, cache = step(weights, cache, batch)
        out = np.asarray(out)[:n]
        assert np.isfinite(out).all()
        logits.append(out)
    return logits, cache


def written_kv(cache: KVCache, slots: np.ndarray) -> np.ndarray:
    """[layers, 2, kv_heads, len(slots), D] of the given slots."""
    def pick(x):
        x = np.asarray(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])[:, slots]
    return np.stack([np.stack([pick(k), pick(v)]) for k, v in zip(cache.k, cache.v, strict=True)])


def assert_matches_reference(logits, cache, ref_logits, ref_kv, slots, kv_replication, what):
    for i, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        assert got.shape == want.shape
        assert rel_err(got, want) <= TOL, f"{what}: step {i} logits"
    got_kv = written_kv(cache, slots)
    # Placed KV head j is a replica of original head j // r.
    want_kv = np.repeat(ref_kv, kv_replication, axis=2)
    assert got_kv.shape == want_kv.shape
    assert rel_err(got_kv, want_kv) <= TOL, f"{what}: KV cache contents"


class Models:
    """Weights, references, deployments and compiled programs, built once per module."""

    def __init__(self):
        self.weights, self.refs, self.deps, self.programs = {}, {}, {}, {}
        self.ref_steps = {}

    def cfg_weights(self, name):
        if name not in self.weights:
            cfg = CONFIGS[name]
            self.weights[name] = random_weights(cfg, jax.random.key(len(self.weights) + 3),
                                                scale=0.15)
        return CONFIGS[name], self.weights[name]

    def ref_step(self, name):
        if name not in self.ref_steps:
            self.ref_steps[name] = make_step_fn(CONFIGS[name])
        return self.ref_steps[name]

    def reference(self, name, scenario):
        """Single-device logits per step and written KV of a scenario."""
        key = (name, id(scenario))
        if key not in self.refs:
            cfg, w = self.cfg_weights(name)
            cache = stale_cache(cfg.num_kv_heads, cfg, np.random.default_rng(11))
            logits, cache = run_steps(self.ref_step(name), w, cache, scenario.batches,
                                      scenario.num_logits)
            self.refs[key] = (logits, written_kv(cache, scenario.written))
        return self.refs[key]

    def deployment(self, name, layout) -> Deployment:
        if (name, layout) not in self.deps:
            cfg, w = self.cfg_weights(name)
            self.deps[name, layout] = Deployment.create(cfg, w, LAYOUTS[layout])
        return self.deps[name, layout]

    def program(self, name, layout, variant):
        """The compiled (weights, cache, batch) -> (logits, cache) program of one variant."""
        key = (name, layout, variant)
        if key not in self.programs:
            dep = self.deployment(name, layout)
            cache = dep.allocate_cache(NUM_PAGES, PS, jnp.float32)
            example = make_scenario(dep.cfg.vocab_size, 0).batches[0]
            self.programs[key] = jit_forward(LLAMA, dep, variant, PagedAttention()).lower(
                dep.weights[variant], cache, example).compile()
        return self.programs[key]


@pytest.fixture(scope="module")
def models():
    assert jax.device_count() == 8
    return Models()


@pytest.fixture(scope="module")
def scenarios():
    return {name: make_scenario(cfg.vocab_size, seed=21) for name, cfg in CONFIGS.items()}


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("layout,variant", PROGRAMS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_matches_single_device(models, scenarios, name, layout, variant):
    """Prefill (13 tokens), mixed, decode and chunked steps: logits and written KV."""
    sc = scenarios[name]
    ref_logits, ref_kv = models.reference(name, sc)
    dep = models.deployment(name, layout)
    cfg = CONFIGS[name]
    assert dep.cfg.num_kv_heads == cfg.num_kv_heads * dep.plan.kv_replication
    cache = stale_cache(dep.cfg.num_kv_heads, cfg, np.random.default_rng(5), dep.cache_sharding)
    program = models.program(name, layout, variant)
    before = shard_layout(cache)
    logits, cache = run_steps(program, dep.weights[variant], cache, sc.batches, sc.num_logits)
    assert all(x.sharding == dep.cache_sharding for x in cache.k + cache.v)
    assert shard_layout(cache) == before
    assert_matches_reference(logits, cache, ref_logits, ref_kv, sc.written,
                             dep.plan.kv_replication, f"{name} {layout}/{variant}")


@pytest.fixture(scope="module")
def smollm2():
    from checkpoints import load_model

    model = load_model("default", dtype=jnp.float32, progress=False)
    cfg = model.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (9, 3, 30)
    rng = np.random.default_rng(31)
    pa, pb, pc = deal_pages(rng, [4, 3, 2])
    a = [int(t) for t in rng.integers(0, cfg.vocab_size, 14)]
    steps = [[SequenceChunk(a[:13], 0, pa)],                                    # prefill
             [SequenceChunk(a[13:], 13, pa),                                     # mixed
              SequenceChunk([int(t) for t in rng.integers(0, cfg.vocab_size, 9)], 0, pb),
              SequenceChunk([int(t) for t in rng.integers(0, cfg.vocab_size, 6)], 0, pc)]]
    built = [build_step_batch(c, PS, BUCKETS) for c in steps]
    batches, counts = [b for b, _ in built], [n for _, n in built]
    slots = np.concatenate([b.slot_mapping[b.slot_mapping >= 0] for b in batches])
    cache = stale_cache(cfg.num_kv_heads, cfg, np.random.default_rng(2))
    logits, cache = run_steps(make_step_fn(cfg), model.weights, cache, batches, counts)
    return model, batches, counts, slots, logits, written_kv(cache, slots)


# The two shift layouts run both variants (heads over all 8 devices; Ulysses SP with TP) in
# `make test`; the static tp8 and sp8 ones, whose programs the tiny configs above also cover,
# only in `make soak` (40 s of the CI run).
@pytest.mark.parametrize("layout", [pytest.param(name, marks=[pytest.mark.slow] if name in ("tp8", "sp8")
                                                 else []) for name in LAYOUTS])
def test_smollm2_matches_single_device(smollm2, layout):
    """The embedded SmolLM2 (9 q / 3 kv heads: 24 q / 24 kv on 8 devices), prefill then mixed."""
    model, batches, counts, slots, ref_logits, ref_kv = smollm2
    dep = Deployment.create(model.config, model.weights, LAYOUTS[layout])
    assert (dep.cfg.num_heads, dep.cfg.num_kv_heads, dep.plan.zero_heads) == (24, 24, 15)
    for variant in LAYOUTS[layout].variants:
        cache = stale_cache(dep.cfg.num_kv_heads, model.config, np.random.default_rng(3),
                            dep.cache_sharding)
        logits, cache = run_steps(jit_forward(LLAMA, dep, variant, PagedAttention()),
                                  dep.weights[variant], cache, batches, counts)
        assert_matches_reference(logits, cache, ref_logits, ref_kv, slots,
                                 dep.plan.kv_replication, f"SmolLM2 {layout}/{variant}")


# --------------------------------------------------------------------------- switching

def greedy_run(step_for, weights_for, cache, prompt, pages, chunks, n_new):
    """Prefill ``prompt`` in ``chunks`` then decode greedily; ``step_for(i)`` picks step i's
    program. Returns the generated tokens, the logits of every sampling step, the cache."""
    out, all_logits, start, i = [], [], 0, 0
    for n in chunks:
        batch, _ = build_step_batch([SequenceChunk(prompt[start:start + n], start, pages)],
                                    PS, BUCKETS)
        logits, cache = step_for(i)(weights_for(i), cache, batch)
        start, i = start + n, i + 1
    assert start == len(prompt)
    while True:
        row = np.asarray(logits)[0]
        all_logits.append(row)
        out.append(int(np.argmax(row)))
        if len(out) == n_new:
            return out, all_logits, cache
        batch, _ = build_step_batch([SequenceChunk([out[-1]], start, pages)], PS, BUCKETS)
        logits, cache = step_for(i)(weights_for(i), cache, batch)
        start, i = start + 1, i + 1


def shard_layout(cache: KVCache):
    return [[(s.device, s.index) for s in x.addressable_shards] for x in cache.k + cache.v]


@pytest.fixture(scope="module")
def switching(models):
    """A 29-token prompt and its single-device greedy continuation (gqa4)."""
    cfg, w = models.cfg_weights("gqa4")
    rng = np.random.default_rng(41)
    prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, 29)]
    pages = deal_pages(rng, [10])[0]
    cache = stale_cache(cfg.num_kv_heads, cfg, rng)
    step = models.ref_step("gqa4")
    tokens, logits, _ = greedy_run(lambda i: step, lambda i: w, cache, prompt, pages, [29], 10)
    return prompt, pages, tokens, logits


@pytest.mark.parametrize("schedule", ["sp_prefill_tp_decode", "alternate"])
def test_switching_variants_mid_sequence(models, switching, schedule):
    """One cache passed between SP and TP programs; greedy tokens equal the single device's."""
    prompt, pages, want_tokens, want_logits = switching
    dep = models.deployment("gqa4", "sp4tp2")
    cfg = CONFIGS["gqa4"]
    programs = {v: models.program("gqa4", "sp4tp2", v) for v in ("tp", "sp")}
    if schedule == "sp_prefill_tp_decode":
        chunks, pick = [29], (lambda i: "sp" if i == 0 else "tp")
    else:  # prefill in chunks, then decode, switching variant every step
        chunks, pick = [11, 10, 8], (lambda i: ("sp", "tp")[i % 2])
    cache = stale_cache(dep.cfg.num_kv_heads, cfg, np.random.default_rng(8), dep.cache_sharding)
    before = shard_layout(cache)
    used = []

    def step_for(i):
        used.append(pick(i))
        return programs[pick(i)]

    tokens, logits, cache = greedy_run(step_for, lambda i: dep.weights[pick(i)], cache,
                                       prompt, pages, chunks, 10)
    assert set(used) == {"tp", "sp"}
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits, strict=True):
        assert rel_err(got, want) <= TOL
    for x in cache.k + cache.v:
        assert x.sharding == dep.cache_sharding
        assert x.sharding.spec == dep.cache_sharding.spec
    assert shard_layout(cache) == before


# --------------------------------------------------------------------------- no cache movement

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16)\[([\d,]*)\]")


def _shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(text)]


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(opcode, shapes of its result and operands) for every collective of an HLO module."""
    defined, instrs = {}, []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m:
            name, result, opcode, rest = m.groups()
            defined[name] = _shapes(result)
            instrs.append((opcode, _shapes(result), re.findall(r"%([\w.\-]+)", rest.split(")")[0])))
    found = []
    for opcode, result, operands in instrs:
        if opcode.removesuffix("-start") in COLLECTIVES:
            assert operands and all(o in defined for o in operands), f"unparsed {opcode}"
            found.append((opcode, result + [s for o in operands for s in defined[o]]))
    return found


def cache_moves(hlo: str, cache: KVCache) -> list[str]:
    """Collectives touching an array of the cache's global or per-device shard size."""
    x = cache.k[0]
    sizes = {int(np.prod(x.shape)), int(np.prod(x.addressable_shards[0].data.shape))}
    return [f"{op} {shapes}" for op, shapes in collectives(hlo)
            if any(int(np.prod(s)) in sizes for s in shapes)]


def test_hlo_check_sees_a_cache_gather(models):
    """The checker itself: a program that gathers the cache is caught."""
    dep = models.deployment("gqa4", "sp4tp2")
    cache = dep.allocate_cache(NUM_PAGES, PS, jnp.float32)
    gather = jax.jit(lambda c: c * 2, out_shardings=dep.replicated)
    hlo = gather.lower(cache.k[0]).compile().as_text()
    assert cache_moves(hlo, cache), hlo


@pytest.mark.parametrize("layout,variant", PROGRAMS)
def test_no_collective_moves_the_cache(models, layout, variant):
    dep = models.deployment("gqa4", layout)
    cache = dep.allocate_cache(NUM_PAGES, PS, jnp.float32)
    assert cache.k[0].addressable_shards[0].data.shape == (1, NUM_PAGES, PS, 16)
    hlo = models.program("gqa4", layout, variant).as_text()
    found = collectives(hlo)
    assert found  # the step does communicate
    assert cache_moves(hlo, cache) == []
    if variant == "sp":  # Ulysses: token-split <-> head-split around attention
        assert any(op.startswith("all-to-all") for op, _ in found)


def _lm_head_gathers(hlo: str, cfg: ModelConfig) -> list[str]:
    full = {(cfg.hidden_size, cfg.vocab_size), (cfg.vocab_size, cfg.hidden_size)}
    return [f"{op} {shapes}" for op, shapes in collectives(hlo) if full & set(shapes)]


@pytest.mark.parametrize("variant", ["tp", "sp"])
def test_lm_head_is_not_gathered(models, variant):
    """Each device computes logits for its vocab slice; only [R, V] logits are gathered."""
    hlo = models.program("gqa4", "sp4tp2", variant).as_text()
    assert _lm_head_gathers(hlo, CONFIGS["gqa4"]) == []


@pytest.mark.parametrize("layout", ["sp8", "sp4tp2"])
def test_sp_projects_only_its_own_tokens(models, layout):
    """Under SP no device gathers the full [T, H] hidden states."""
    cfg = CONFIGS["gqa4"]
    hlo = models.program("gqa4", layout, "sp").as_text()
    full = (BUCKETS.tokens[0], cfg.hidden_size)
    assert [op for op, shapes in collectives(hlo)
            if op.startswith("all-gather") and full in shapes] == []


# --------------------------------------------------------------------------- bad configurations

def test_bad_parallel_configurations_fail_clearly(models):
    cfg, w = models.cfg_weights("gqa4")
    with pytest.raises(ConfigError, match=r"16 devices requested, but only 8 are visible"):
        Deployment.create(cfg, w, ParallelConfig(4, 4, "shift"))
    with pytest.raises(ConfigError, match=r"16 devices requested"):
        make_mesh(ParallelConfig(2, 8, "sp"))
    with pytest.raises(ConfigError, match=r"parallel mode must be tp, sp or shift, got 'ring'"):
        ParallelConfig(2, 4, "ring")
    with pytest.raises(ConfigError, match=r"parallel mode must be tp, sp or shift"):
        EngineConfig.from_flags(sequence_parallel_size=2, tensor_parallel_size=4,
                                parallel_mode="ulysses")
    with pytest.raises(ConfigError, match=r"'shift' needs sequence_parallel_size > 1"):
        ParallelConfig(1, 8, "shift")
    with pytest.raises(ConfigError, match=r"'sp' needs sequence_parallel_size > 1"):
        ParallelConfig(1, 4, "sp")
    with pytest.raises(ConfigError, match=r"need more than one device"):
        resolve_parallel_config(parallel_mode="shift")
    with pytest.raises(ConfigError, match=r"sizes must be >= 1"):
        ParallelConfig(0, 8)
    with pytest.raises(ConfigError, match=r"threshold must be a number or 'auto', got 'fast'"):
        EngineConfig.from_flags(sequence_parallel_size=4, tensor_parallel_size=2,
                                parallel_mode="shift", shift_parallel_threshold="fast")
    with pytest.raises(ConfigError, match=r"threshold must be a token count or 'auto', got 'soon'"):
        ParallelConfig(4, 2, "shift", shift_threshold="soon")
    with pytest.raises(ConfigError, match=r"threshold must be >= 1, got 0"):
        ParallelConfig(4, 2, "shift", shift_threshold=0)
    # The string form of a number is accepted from flags.
    assert resolve_parallel_config(2, 4, parallel_mode="shift",
                                   shift_parallel_threshold="64").shift_threshold == 64


def test_heads_or_mlp_that_cannot_split_fail_clearly():
    smol = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=9, num_kv_heads=3, head_dim=8)
    with pytest.raises(ConfigError, match=r"cannot place 9 query heads / 3 KV heads on 8 devices "
                                          r"without zero-padding"):
        plan_heads(smol, 8, allow_padding=False)
    w = random_weights(smol, jax.random.key(1))
    with pytest.raises(ConfigError, match=r"without zero-padding"):
        Deployment.create(smol, w, ParallelConfig(1, 8, "tp"), allow_head_padding=False)
    odd = dataclasses.replace(smol, num_heads=8, num_kv_heads=2, intermediate_size=100)
    with pytest.raises(ValueError, match=r"intermediate_size 100 is not divisible by 8 devices"):
        Deployment.create(odd, random_weights(odd, jax.random.key(2)),
                                  ParallelConfig(2, 4, "shift"))
    with pytest.raises(ConfigError, match=r"at least one device"):
        plan_heads(smol, 0)


# --------------------------------------------------------------------------- head placement

LLAMA_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64)


@pytest.mark.parametrize("devices", [8, 4])
def test_llama8b_placement_changes_nothing(devices):
    plan = plan_heads(LLAMA_8B, devices, allow_padding=False)
    assert not plan.changes_model
    assert (plan.kv_replication, plan.zero_heads) == (1, 0)
    assert plan.q_source == tuple(range(32))
    assert placed_config(LLAMA_8B, plan) == LLAMA_8B


def test_smollm2_placement_on_8_devices():
    plan = plan_heads(SMOLLM2, 8)
    pcfg = placed_config(SMOLLM2, plan)
    assert (pcfg.num_heads, pcfg.num_kv_heads) == (24, 24)
    assert (plan.kv_replication, plan.q_slots_per_kv, plan.zero_heads) == (8, 1, 15)


@pytest.mark.parametrize("n,k,p", [(9, 3, 8), (8, 2, 8), (4, 4, 8), (32, 8, 8), (12, 4, 8),
                                   (14, 2, 4), (6, 3, 2), (40, 8, 16), (16, 8, 1)])
def test_placement_keeps_every_q_head_with_its_kv_head(n, k, p):
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=n, num_kv_heads=k, head_dim=2)
    plan = plan_heads(cfg, p)
    pcfg = placed_config(cfg, plan)
    assert pcfg.num_kv_heads % p == 0 and pcfg.num_heads % p == 0
    assert sorted(s for s in plan.q_source if s >= 0) == list(range(n))  # each head once
    group = n // k
    for i, s in enumerate(plan.q_source):
        placed_kv = i // plan.q_slots_per_kv        # the placed KV head this q head reads
        if s >= 0:
            assert s // group == placed_kv // plan.kv_replication
    # Zero heads only where the q heads of a KV head do not divide over its replicas.
    assert (plan.zero_heads == 0) == (group % plan.kv_replication == 0)


def test_place_weights_replicates_kv_and_zeroes_padding():
    cfg = CONFIGS["mha_bias"]  # 4 q / 4 kv on 8 devices: kv x2, q heads [0, -1, 1, -1, ...]
    w = random_weights(cfg, jax.random.key(9), scale=0.5)
    plan = plan_heads(cfg, 8)
    assert plan.q_source == (0, -1, 1, -1, 2, -1, 3, -1)
    placed = place_weights(w, cfg, plan)
    for orig, new in zip(w.layers, placed.layers, strict=True):
        for j in range(8):
            np.testing.assert_array_equal(new.kv_proj[:, :, j], orig.kv_proj[:, :, j // 2])
            np.testing.assert_array_equal(new.kv_bias[:, j], orig.kv_bias[:, j // 2])
        for i, s in enumerate(plan.q_source):
            for field, axis in (("q_proj", 1), ("o_proj", 0), ("q_bias", 0)):
                got = np.take(np.asarray(getattr(new, field)), i, axis=axis)
                want = (np.zeros_like(got) if s < 0
                        else np.take(np.asarray(getattr(orig, field)), s, axis=axis))
                np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(new.o_bias, orig.o_bias)
        np.testing.assert_array_equal(new.gate_up, orig.gate_up)
