"""Lossless verification of one-hot drafts (n-gram, suffix) at any temperature.

A request that speculated d1..dk after its last known token runs a chunk of k + 1
rows [last, d1..dk]; row i yields the target distribution p_i of the token after
d1..di and verifies d_{i+1} (the last row verifies nothing and yields the bonus
token). For a one-hot draft q the speculative-sampling test min(1, p(d) / q(d))
is p(d), and the residual norm(max(0, p - q)) is p with d removed, renormalised.
Emitting d when accepted and a residual sample otherwise gives a token distributed
exactly as p: P(x) = p(d) 1[x = d] + (1 - p(d)) p(x) 1[x != d] / (1 - p(d)) = p(x).

A draft model's draft is not one-hot: its token d was drawn from the model's q (shaped
like p), so the test is min(1, p(d) / q(d)) and the residual norm(max(0, p - q));
``verify_rows`` takes each such row's log q in ``draft_logq``.

``verify_rows`` does one step's rows on the device; ``accept_run`` walks one
request's chunk on the host. p is the sampler's shaped distribution
(``arctic_jax.sampling.shaped_logits``: temperature, top-k, top-p, min-p); greedy
rows accept exactly when the draft is the argmax. Randomness depends only on each
row's (seed, step), so sampled output is reproducible whatever shares the batch:
the residual draw reuses the sampler's Gumbel noise for (seed, step) (a row without
a draft gets exactly the token ``sampling.sample`` would give it), and the
acceptance uniform comes from a separate key folded from the same one.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from arctic_jax.sampling import (
    GREEDY_TEMPERATURE,
    SamplingMode,
    SamplingTensors,
    check_logits_rows,
    gumbel_rows,
    shaped_logits,
)

NO_DRAFT = -1   # draft value of a row that verifies nothing

# The acceptance key is fold_in(gumbel_key(seed, step), _ACCEPT_STREAM). A threefry
# fold_in of a key with data c yields words that XOR to that key's c-th 32-bit random
# block, so c must lie beyond every index the Gumbel draw of V < 2**32 values uses.
_ACCEPT_STREAM = 2**32 - 1


def _uniform_rows(seed: jax.Array, step: jax.Array) -> jax.Array:
    """[R] uniforms in [0, 1); row r depends only on (seed[r], step[r])."""
    def row(s, st):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(s), st), _ACCEPT_STREAM)
        return jax.random.uniform(key, (), jnp.float32)
    return jax.vmap(row)(seed, step)


def verify_rows(logits: jax.Array, t: SamplingTensors, draft: jax.Array,
                mode: SamplingMode = SamplingMode.FILTERED, draft_logq: jax.Array | None = None,
                has_q: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Verify one one-hot draft token per row; returns (tokens [R] int32, accepted [R] bool).

    ``logits`` [R, V] f32, ``t`` the rows' sampling tensors (R rows, ``t.step[r]``
    the index of the token row r decides), ``draft`` [R] int32: the token row r
    verifies, or ``NO_DRAFT`` (-1). ``mode`` (static) must cover every row
    (``SamplingMode.for_params``). Pure and jit-compatible.

    - sampled row with a draft d: accepted iff u < p(d); ``tokens`` is a draw from p
      with d removed (the token to emit on rejection; arbitrary when p(d) == 1);
    - greedy row with a draft: accepted iff d == argmax; ``tokens`` is the argmax;
    - row without a draft: ``tokens`` is an ordinary draw from p (the same token
      ``sampling.sample`` gives the row), accepted False.
    ``draft_logq`` [R, V] f32 with ``has_q`` [R] bool: the sampled rows where ``has_q`` holds
    verify a draft drawn from q = exp(draft_logq) (accepted iff u * q(d) < p(d); otherwise
    ``tokens`` is a draw from max(0, p - q), or from p where that has no mass).
    Draft values must lie in [-1, V); this cannot be checked on traced values.
    """
    r, v = check_logits_rows("verify_rows", logits, t)
    if draft.shape != (r,):
        raise ValueError(f"verify_rows: {r} logits rows but draft of shape {draft.shape}")
    if not jnp.issubdtype(draft.dtype, jnp.integer):
        raise ValueError(f"verify_rows: draft must hold integer token ids, got {draft.dtype}")
    logits = logits.astype(jnp.float32)
    draft = draft.astype(jnp.int32)
    has_draft = draft >= 0
    top = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy_accept = has_draft & (draft == top)
    mode = SamplingMode(mode)
    if mode is SamplingMode.GREEDY:
        return top, greedy_accept

    greedy = t.temperature < GREEDY_TEMPERATURE
    masked = shaped_logits(logits, t, greedy, filtered=mode is SamplingMode.FILTERED)
    d = jnp.where(has_draft, draft, 0)
    p = jax.nn.softmax(masked, axis=-1)
    p_d = jnp.take_along_axis(p, d[:, None], axis=-1)[:, 0]
    u = _uniform_rows(t.seed, t.step)
    accepted = has_draft & (u < p_d)
    is_d = has_draft[:, None] & (jnp.arange(v, dtype=jnp.int32)[None, :] == d[:, None])
    residual = jnp.where(is_d, -jnp.inf, masked)
    if draft_logq is not None:
        with_q = has_draft & has_q
        q = jnp.exp(draft_logq.astype(jnp.float32))
        q_d = jnp.take_along_axis(q, d[:, None], axis=-1)[:, 0]
        accepted = jnp.where(with_q, u * q_d < p_d, accepted)
        excess = jnp.maximum(p - q, 0.0)
        has_mass = jnp.sum(excess, axis=-1, keepdims=True) > 0
        q_residual = jnp.where(has_mass, jnp.where(excess > 0, jnp.log(excess), -jnp.inf), masked)
        residual = jnp.where(with_q[:, None], q_residual, residual)
    drawn = jnp.argmax(residual + gumbel_rows(t.seed, t.step, v), axis=-1).astype(jnp.int32)
    return jnp.where(greedy, top, drawn), jnp.where(greedy, greedy_accept, accepted)


def accept_run(drafts: Sequence[int], tokens: Sequence[int],
               accepted: Sequence[bool]) -> list[int]:
    """Tokens one request's verified chunk emits (host side).

    ``drafts`` = [d1..dk]; ``tokens`` and ``accepted`` are ``verify_rows``' outputs for
    the chunk's k + 1 rows (row i verified d_{i+1}; row k verified nothing). Emits
    d_{i+1} while row i accepted; at the first rejection emits tokens[i] and stops;
    with all k accepted emits the bonus tokens[k]. Returns 1..k + 1 tokens.
    """
    k = len(drafts)
    if len(tokens) != k + 1 or len(accepted) != k + 1:
        raise ValueError(f"accept_run: {k} drafts need {k + 1} tokens and accepted flags, got "
                         f"{len(tokens)} tokens and {len(accepted)} flags")
    if bool(accepted[k]):
        raise ValueError("accept_run: the chunk's last row verifies no draft but is marked "
                         "accepted")
    out: list[int] = []
    for i in range(k):
        if not bool(accepted[i]):
            out.append(int(tokens[i]))
            return out
        out.append(int(drafts[i]))
    out.append(int(tokens[k]))
    return out
