"""Arctic's draft models: the MLP speculator and the sum-LSTM speculator, as pure functions.

Both read the base model's final-normed hidden state h [B, Hin] at the last accepted position
and the token t [B] sampled there, and run ``n_predict`` steps; step i yields logits over the
vocabulary for the token i + 1 places after t, and its chosen token feeds step i + 1.

With s the state (s = h before step 0; with ``scale_input`` s = rms(h) / sqrt(2)), D the inner
dimension and the constants sw = 0.5 ** (0.5 / n_predict), ew = sqrt((1 - sw**2) * D / 2),
alpha = ew / sw:

- MLP step i:  s = gelu(LN_i(s @ P_i + alpha * E_i[t])),  logits = s @ W_i.T
- LSTM step i: a = s @ P_min(i,1) + alpha * [E[t], E[t], E[t], E[t]] -> f | i | o | c~ (D each);
  c = c * sigmoid(f) + gelu(LN_cell(c~)) * sigmoid(i); s = gelu(LN_state(c)) * sigmoid(o);
  c starts at 0; logits = s @ W_i.T

LN(x) = x * rsqrt(mean(x**2) + 1e-6) * w + b, and gelu is the exact (erf) form. Matmuls take
the weights' dtype with float32 accumulation; norms, gates and logits are float32.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from arctic_jax.pytree import pytree_dataclass

KINDS = ("mlp", "lstm")
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DraftModelConfig:
    """A draft model's shape. ``input_hidden_dim`` is the base model's hidden size (the MLP
    config's ``emb_dim``); ``inner_dim`` the state size D (the LSTM's emb/proj/inner dims are
    all D). ``tie_weights``: one embedding, head and norm shared by every step (the MLP keeps
    its first projection separate and shares the later ones)."""

    kind: str
    n_predict: int
    vocab_size: int
    input_hidden_dim: int
    inner_dim: int
    tie_weights: bool = False
    scale_input: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"draft model kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("n_predict", "vocab_size", "input_hidden_dim", "inner_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"draft model {name} must be a positive integer, got {value!r}")
        if self.kind == "lstm" and not self.tie_weights:
            raise ValueError("the sum-LSTM draft model shares its weights across steps: "
                             "tie_weights must be true")
        if self.kind == "mlp" and self.tie_weights and self.n_predict < 2:
            raise ValueError("tie_weights needs n_predict >= 2 (there is nothing to tie)")

    @property
    def state_weight(self) -> float:
        return 0.5 ** (0.5 / self.n_predict)

    @property
    def emb_weight(self) -> float:
        return math.sqrt((1.0 - self.state_weight ** 2) * self.inner_dim / 2.0)

    @property
    def alpha(self) -> float:
        """The embedding's weight relative to the projected state."""
        return self.emb_weight / self.state_weight

    @property
    def num_distinct(self) -> int:
        """Distinct embeddings / heads / norms: 1 when tied, else one per step."""
        return 1 if self.tie_weights else self.n_predict


@pytree_dataclass
class MLPDraftWeights:
    """MLP speculator weights (N = ``num_distinct``; projections stored [in, out]).

    The [V, D] embeddings and heads are one array per step, not an [N, V, D] stack: XLA copied a
    stack's slice before the one-row head matmul (5.2 ms instead of 1.1 ms per 8B-sized draft at
    batch 1 on an H100, benchmarks/RESULTS.md)."""

    emb: tuple[jax.Array, ...]   # N x [V, D]
    proj_first: jax.Array   # [Hin, D]     step 0
    proj: jax.Array         # [N', D, D]   steps >= 1 (N' = 1 when tied, else n_predict - 1)
    ln_weight: jax.Array    # [N, D]
    ln_bias: jax.Array      # [N, D]
    head: tuple[jax.Array, ...]  # N x [V, D]


@pytree_dataclass
class LSTMDraftWeights:
    """Sum-LSTM speculator weights; gate blocks of the projections in f, i, o, c~ order."""

    emb: jax.Array          # [V, D]
    proj_first: jax.Array   # [Hin, 4D]    step 0
    proj: jax.Array         # [D, 4D]      steps >= 1
    cell_ln_weight: jax.Array   # [D]
    cell_ln_bias: jax.Array     # [D]
    state_ln_weight: jax.Array  # [D]
    state_ln_bias: jax.Array    # [D]
    head: tuple[jax.Array, ...]  # N x [V, D], one per step (see MLPDraftWeights)


DraftWeights = MLPDraftWeights | LSTMDraftWeights


@pytree_dataclass
class DraftState:
    """The recurrent state between steps: s [B, Hin] before step 0, [B, D] after; the LSTM's
    cell c [B, D] (zeros before step 0; the MLP carries a [B, 0] placeholder)."""

    s: jax.Array
    c: jax.Array


def _norm(x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS)
    if weight is not None:
        x = x * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return x


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _pick(stack: jax.Array | tuple[jax.Array, ...], i: int) -> jax.Array:
    """Step i's entry of a per-step stack or tuple (the shared one when it holds one)."""
    return stack[min(i, len(stack) - 1)]


def initial_state(cfg: DraftModelConfig, hidden: jax.Array) -> DraftState:
    """The state before step 0 from the base model's hidden rows [B, Hin]."""
    if hidden.ndim != 2 or hidden.shape[1] != cfg.input_hidden_dim:
        raise ValueError(f"draft model: hidden rows must be [B, {cfg.input_hidden_dim}], "
                         f"got {hidden.shape}")
    s = hidden.astype(jnp.float32)
    if cfg.scale_input:
        s = _norm(s) / math.sqrt(2.0)
    width = cfg.inner_dim if cfg.kind == "lstm" else 0
    return DraftState(s=s, c=jnp.zeros((hidden.shape[0], width), jnp.float32))


def head_logits(weights: DraftWeights, s: jax.Array, i: int) -> jax.Array:
    """Step i's logits [B, V] float32 from the state s [B, D]."""
    head = _pick(weights.head, i)
    return jnp.einsum("bd,vd->bv", s.astype(head.dtype), head, preferred_element_type=jnp.float32)


def advance(cfg: DraftModelConfig, weights: DraftWeights, state: DraftState, token: jax.Array,
            i: int) -> DraftState:
    """Step i's new state from the state and the token [B] int32 chosen before it (``i`` is
    static: each step has its own weights)."""
    if cfg.kind == "mlp":
        proj = weights.proj_first if i == 0 else _pick(weights.proj, i - 1)
        x = _matmul(state.s, proj) + cfg.alpha * _pick(weights.emb, i)[token].astype(jnp.float32)
        n = min(i, weights.ln_weight.shape[0] - 1)
        return DraftState(s=_gelu(_norm(x, weights.ln_weight[n], weights.ln_bias[n])), c=state.c)
    d = cfg.inner_dim
    proj = weights.proj_first if i == 0 else weights.proj
    z = weights.emb[token].astype(jnp.float32)
    a = _matmul(state.s, proj) + cfg.alpha * jnp.tile(z, (1, 4))
    forget, inp, out = (jax.nn.sigmoid(a[:, k * d:(k + 1) * d]) for k in range(3))
    cell = state.c * forget + _gelu(_norm(a[:, 3 * d:], weights.cell_ln_weight,
                                          weights.cell_ln_bias)) * inp
    s = _gelu(_norm(cell, weights.state_ln_weight, weights.state_ln_bias)) * out
    return DraftState(s=s, c=cell)


def draft_step(cfg: DraftModelConfig, weights: DraftWeights, state: DraftState, token: jax.Array,
               i: int) -> tuple[DraftState, jax.Array]:
    """One step: the new state and its logits [B, V] for the token after ``token``."""
    state = advance(cfg, weights, state, token, i)
    return state, head_logits(weights, state.s, i)


def greedy_draft(cfg: DraftModelConfig, weights: DraftWeights, hidden: jax.Array, token: jax.Array,
                 k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Propose k (default ``n_predict``) tokens greedily: (tokens [B, k] int32, logits
    [B, k, V] float32). Steps past ``n_predict`` reuse the last step's weights."""
    k = cfg.n_predict if k is None else k
    state = initial_state(cfg, hidden)
    tokens, logits = [], []
    for i in range(k):
        state, lg = draft_step(cfg, weights, state, token, i)
        token = jnp.argmax(lg, axis=-1).astype(jnp.int32)
        tokens.append(token)
        logits.append(lg)
    return jnp.stack(tokens, axis=1), jnp.stack(logits, axis=1)


def teacher_forced_logits(cfg: DraftModelConfig, weights: DraftWeights, hidden: jax.Array,
                          tokens: jax.Array) -> jax.Array:
    """Training form: step i consumes the given ``tokens[:, i]`` (tokens [B, n] int32, the
    sampled token and the true continuation) instead of its own choice; logits [B, n, V]."""
    state = initial_state(cfg, hidden)
    logits = []
    for i in range(tokens.shape[1]):
        state, lg = draft_step(cfg, weights, state, tokens[:, i], i)
        logits.append(lg)
    return jnp.stack(logits, axis=1)


def random_weights(cfg: DraftModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32,
                   scale: float = 0.02) -> DraftWeights:
    """Random weights of ``cfg``'s shapes (norm weights near 1, biases near 0)."""
    V, D, H, N = cfg.vocab_size, cfg.inner_dim, cfg.input_hidden_dim, cfg.num_distinct
    keys = iter(jax.random.split(key, 2 * N + 8))

    def normal(*shape: int, s: float = scale, mean: float = 0.0) -> jax.Array:
        return (mean + s * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    if cfg.kind == "mlp":
        n_proj = 1 if cfg.tie_weights else cfg.n_predict - 1
        return MLPDraftWeights(emb=tuple(normal(V, D) for _ in range(N)), proj_first=normal(H, D),
                               proj=normal(n_proj, D, D), ln_weight=normal(N, D, s=0.1, mean=1.0),
                               ln_bias=normal(N, D, s=0.1), head=tuple(normal(V, D) for _ in range(N)))
    return LSTMDraftWeights(emb=normal(V, D), proj_first=normal(H, 4 * D), proj=normal(D, 4 * D),
                            cell_ln_weight=normal(D, s=0.1, mean=1.0), cell_ln_bias=normal(D, s=0.1),
                            state_ln_weight=normal(D, s=0.1, mean=1.0),
                            state_ln_bias=normal(D, s=0.1), head=tuple(normal(V, D) for _ in range(N)))
