"""Drafting with a draft model on the device: greedy rows take each step's argmax, sampled rows
draw each step's token from q, the draft logits shaped like the request's own sampling
(temperature, top-k, top-p, min-p), and keep log q for verification
(``rejection.verify_rows``' ``draft_logq``).

Randomness: the draw for the token at sampling step s uses the key folded from (seed, s) and
``DRAFT_STREAM``, a block no other draw of that step uses, so a draft is independent of the
acceptance test and residual draw that later verify it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from arctic_jax.sampling import GREEDY_TEMPERATURE, SamplingMode, SamplingTensors, shaped_logits
from arctic_jax.speculative.draft_model import DraftModelConfig, DraftWeights, draft_step, initial_state

DRAFT_STREAM = 2**32 - 2   # see rejection._ACCEPT_STREAM: beyond every Gumbel block index


def _draft_gumbel(seed: jax.Array, step: jax.Array, v: int) -> jax.Array:
    """[E, V] Gumbel noise of the draft draws; row e depends only on (seed[e], step[e])."""
    def row(s, st):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(s), st), DRAFT_STREAM)
        return jax.random.gumbel(key, (v,), jnp.float32)
    return jax.vmap(row)(seed, step)


def propose(cfg: DraftModelConfig, weights: DraftWeights, hidden: jax.Array, token: jax.Array,
            t: SamplingTensors, k: int,
            mode: SamplingMode = SamplingMode.FILTERED) -> tuple[jax.Array, jax.Array | None]:
    """Draft k tokens per row: (tokens [E, k] int32, log q [E, k, V] f32 or None when ``mode``
    is greedy).

    ``hidden`` [E, Hin]: the base model's final-normed hidden rows that produced ``token`` [E];
    ``t``: the rows' sampling tensors with ``t.step`` the sampling step of the first drafted
    token (draft i uses step + i). ``k`` and ``mode`` are static; ``mode`` must cover every
    row (``SamplingMode.for_params``).
    """
    mode = SamplingMode(mode)
    greedy = t.temperature < GREEDY_TEMPERATURE
    state = initial_state(cfg, hidden)
    tokens, logqs = [], []
    for i in range(k):
        state, logits = draft_step(cfg, weights, state, token, i)
        top = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if mode is SamplingMode.GREEDY:
            token = top
        else:
            shaped = shaped_logits(logits, t, greedy, filtered=mode is SamplingMode.FILTERED)
            noise = _draft_gumbel(t.seed, t.step + i, logits.shape[-1])
            drawn = jnp.argmax(shaped + noise, axis=-1).astype(jnp.int32)
            token = jnp.where(greedy, top, drawn)
            logqs.append(jax.nn.log_softmax(shaped, axis=-1))
        tokens.append(token)
    logq = jnp.stack(logqs, axis=1) if logqs else None
    return jnp.stack(tokens, axis=1), logq
