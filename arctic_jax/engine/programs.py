"""The compiled step programs: the one place that jits model steps.

A step is two device programs, launched back to back without waiting:

- the model program reads decode tokens that are still on the device from the token
  buffer, runs the model's ``step`` (hidden rows [R, H]) and its ``head`` (logits [R, V]):
  (weights, cache, token buffer, packed inputs) -> (cache, logits);
- the sampler program samples one token per logits row, writes plain decodes' tokens into
  the token buffer and packs everything the host needs into one int32 array, so a step
  costs one host-to-device and one device-to-host transfer.

With a draft model (Arctic's speculator) a third program follows: it reads the model
program's hidden rows and the sampler's packed result, finds each sequence's last accepted
row, drafts the next tokens and appends them to the packed result as extra columns (still
one transfer); a sampled request's draft distributions q stay in a device buffer that the
next step's sampler reads to verify them.

Requests with penalties or a logit bias (``arctic_jax.sampling_penalties``) keep their history
in per-slot device buffers: a small fill program loads a request's row when it takes a slot,
and a sampler variant that only runs in steps with such a request applies and updates them.

Model programs are compiled per deployment variant and attention route (and per bucket
shape); the sampler, whose shape only depends on R, once per ``SamplingMode`` (and penalties). The host
picks the mode from the step's requests, so no program holds a data-dependent branch: on
a GPU such a branch makes the launching thread wait for the device, which would undo the
engine's overlap of host work with the running step.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.attention.strategy import AttentionStrategy
from arctic_jax.config import ModelConfig
from arctic_jax.engine.packing import PackedLayout, unpack
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.step_options import StepOptions
from arctic_jax.pytree import replace
from arctic_jax.sampling import SamplingMode, sample
from arctic_jax.sampling_penalties import PenaltyState, apply_fill, apply_penalties, record_tokens
from arctic_jax.speculative.draft_model import DraftModelConfig
from arctic_jax.speculative.draft_propose import propose
from arctic_jax.speculative.rejection import verify_rows
from sharding.deployment import Deployment


def model_step(weights: Any, cache: KVCache, token_buffer: jax.Array, packed_inputs: jax.Array,
               layout: PackedLayout, *, step: Callable, head: Callable, cfg: ModelConfig,
               opts: StepOptions, keep_hidden: bool = False) -> tuple:
    """The model part of a step: returns the updated cache and logits [R, V] (and with
    ``keep_hidden`` the final-normed hidden rows [R, H] the logits came from).

    ``packed_inputs`` is the int32 buffer of ``pack(ModelInputs)`` (one transfer);
    ``layout`` (static) unpacks it. Tokens marked in ``token_src`` come from the token
    buffer [max_num_seqs] (sampled by the previous step, never seen by the host).
    """
    inputs = unpack(packed_inputs, layout)
    batch = inputs.batch
    from_buffer = token_buffer[jnp.maximum(inputs.token_src, 0)]
    tokens = jnp.where(inputs.token_src >= 0, from_buffer, batch.tokens)
    hidden, cache = step(weights, cache, replace(batch, tokens=tokens), cfg=cfg, opts=opts)
    logits = head(weights, hidden, cfg=cfg, sharding=opts.sharding)
    return (cache, logits, hidden) if keep_hidden else (cache, logits)


def sampler_step(logits: jax.Array, token_buffer: jax.Array, draft_q: jax.Array | None,
                 packed_inputs: jax.Array, layout: PackedLayout,
                 penalty_state: PenaltyState | None = None, *, mode: SamplingMode,
                 num_top_logprobs: int, verify: bool = False, penalties: bool = False) -> tuple:
    """Sample logits [R, V]; returns the updated token buffer and the packed result (and with
    ``penalties`` the updated penalty state).

    The result is int32 [R, 2 + 2 * num_top_logprobs (+ 1 when ``verify``)]: token, logprob
    bits, top ids, top logprob bits, and with ``verify`` whether the row accepted its draft.
    ``verify`` (static): rows with a draft (``inputs.draft`` >= 0) run rejection sampling
    (``speculative.rejection.verify_rows``, exact at any temperature, the argmax test for greedy
    rows); the row's token is then the draft if accepted, else the token to emit instead.
    ``draft_q`` [Q, V] (or None): the draft model's log q rows; row r's draft was drawn from
    ``draft_q[inputs.q_row[r]]`` where ``q_row`` >= 0.
    ``penalties`` (static): rows with ``inputs.penalties.slot`` >= 0 draw from logits adjusted by
    ``penalty_state`` (``sampling_penalties.apply_penalties``), and their tokens are counted
    there; not with ``verify``.
    """
    inputs = unpack(packed_inputs, layout)
    if penalties and verify:
        raise ValueError("sampler_step: penalties cannot be combined with draft verification")
    adjusted = apply_penalties(logits, penalty_state, inputs.penalties) if penalties else None
    result = sample(logits, inputs.sampling, num_top_logprobs, mode, adjusted)
    tokens = result.tokens
    if verify:
        logq = has_q = None
        if draft_q is not None:
            logq, has_q = draft_q[jnp.maximum(inputs.q_row, 0)], inputs.q_row >= 0
        drawn, accepted = verify_rows(logits, inputs.sampling, inputs.draft, mode, logq, has_q)
        tokens = jnp.where(accepted, inputs.draft, drawn)
        logits32 = logits.astype(jnp.float32)
        logprob = (jnp.take_along_axis(logits32, tokens[:, None], axis=-1)[:, 0]
                   - jax.nn.logsumexp(logits32, axis=-1))
    else:
        logprob = result.logprob
    slots = jnp.where(inputs.sample_slot < 0, token_buffer.shape[0], inputs.sample_slot)
    token_buffer = token_buffer.at[slots].set(tokens, mode="drop")
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    columns = [tokens[:, None], bits(logprob.astype(jnp.float32))[:, None]]
    if num_top_logprobs:
        columns += [result.top_ids.astype(jnp.int32), bits(result.top_logprobs.astype(jnp.float32))]
    if verify:
        columns.append(accepted.astype(jnp.int32)[:, None])
    if penalties:
        penalty_state = record_tokens(penalty_state, inputs.penalties.slot, tokens)
        return token_buffer, jnp.concatenate(columns, axis=1), penalty_state
    return token_buffer, jnp.concatenate(columns, axis=1)


def draft_program(weights: Any, hidden: jax.Array, result: jax.Array, draft_q: jax.Array,
                  packed_inputs: jax.Array, layout: PackedLayout, *, cfg: DraftModelConfig, k: int,
                  mode: SamplingMode, window: int,
                  accepted_col: int | None) -> tuple[jax.Array, jax.Array]:
    """Draft after a step: returns the updated q buffer and the packed result [R, C + k].

    Entry e (of E <= R) of ``pack(DraftInputs)`` names a sampled chunk by its logits rows [first_row,
    first_row + num_rows). Its last accepted row (``first_row`` + the leading accepted flags in
    column ``accepted_col`` of ``result``; none without it) gives the hidden row [H] and the
    token (column 0) the draft starts from; entry e's k drafts land in row e's new columns.
    ``window`` (static) bounds num_rows. Sampled entries write log q to ``draft_q`` rows
    ``q_slot[e] + i`` (dropped where q_slot < 0).
    """
    inputs = unpack(packed_inputs, layout)
    r = result.shape[0]
    n = jnp.zeros_like(inputs.first_row)
    if accepted_col is not None:
        offs = jnp.arange(window, dtype=jnp.int32)[None, :]
        rows = jnp.minimum(inputs.first_row[:, None] + offs, r - 1)
        acc = (result[rows, accepted_col] != 0) & (offs < inputs.num_rows[:, None] - 1)
        n = jnp.sum(jnp.cumprod(acc.astype(jnp.int32), axis=1), axis=1)
    last = jnp.minimum(inputs.first_row + n, r - 1)
    sampling = replace(inputs.sampling, step=inputs.sampling.step + n)
    tokens, logq = propose(cfg, weights, hidden[last], result[last, 0], sampling, k, mode)
    if logq is not None:
        q_rows = jnp.where(inputs.q_slot[:, None] >= 0,
                           inputs.q_slot[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :],
                           draft_q.shape[0])
        draft_q = draft_q.at[q_rows.reshape(-1)].set(
            logq.reshape(-1, logq.shape[-1]).astype(draft_q.dtype), mode="drop")
    tokens = jnp.pad(tokens, ((0, r - tokens.shape[0]), (0, 0)))
    return draft_q, jnp.concatenate([result, tokens], axis=1)


@functools.cache
def _jit_model_step(step: Callable, head: Callable, cfg: ModelConfig, opts: StepOptions,
                    weight_shardings: Any, cache_sharding: Any, replicated: Any,
                    keep_hidden: bool = False) -> Callable:
    """One jitted program family per (model, placed config, options, shardings): engines of
    the same model on the same devices share compiled programs."""
    fn = functools.partial(model_step, step=step, head=head, cfg=cfg, opts=opts,
                           keep_hidden=keep_hidden)
    outs = (cache_sharding, replicated) + ((replicated,) if keep_hidden else ())
    return jax.jit(fn, donate_argnums=(1,), static_argnums=(4,),
                   in_shardings=(weight_shardings, cache_sharding, replicated, replicated),
                   out_shardings=outs)


def jit_model_step(spec: Any, dep: Deployment, variant: str, attention: AttentionStrategy,
                   keep_hidden: bool = False) -> Callable:
    """The engine's model program of one variant and attention route:
    ``(weights, cache, token_buffer, packed, layout) -> (cache, logits[, hidden])``, cache
    donated."""
    opts = StepOptions(attention=attention, sharding=dep.activation_sharding(variant))
    return _jit_model_step(spec.step, spec.head, dep.cfg, opts, dep.weight_shardings(variant),
                           dep.cache_sharding, dep.replicated, keep_hidden)


@functools.cache
def jit_sampler_step(mode: SamplingMode, num_top_logprobs: int, verify: bool = False,
                     penalties: bool = False) -> Callable:
    """The jitted sampler of one mode (``verify``: with rejection-sampling verify rows):
    ``(logits, token_buffer, draft_q | None, packed, layout) -> (token_buffer, result)``; the
    token buffer is donated. ``penalties``: the variant that applies and records penalties,
    ``(..., layout, penalty_state) -> (token_buffer, result, penalty_state)``, state donated."""
    fn = functools.partial(sampler_step, mode=mode, num_top_logprobs=num_top_logprobs,
                           verify=verify, penalties=penalties)
    return jax.jit(fn, donate_argnums=(1, 5), static_argnums=(4,))


def penalty_fill(state: PenaltyState, packed_inputs: jax.Array,
                 layout: PackedLayout) -> PenaltyState:
    """Load requests' histories into their slots' penalty rows (``pack(SlotFill)``)."""
    return apply_fill(state, unpack(packed_inputs, layout))


@functools.cache
def jit_penalty_fill() -> Callable:
    """``(penalty_state, packed, layout) -> penalty_state``, the state donated."""
    return jax.jit(penalty_fill, donate_argnums=(0,), static_argnums=(2,))


@functools.cache
def jit_draft_program(cfg: DraftModelConfig, k: int, mode: SamplingMode, window: int,
                      accepted_col: int | None) -> Callable:
    """The jitted draft program of one sampling mode and result layout:
    ``(draft_weights, hidden, result, draft_q, packed, layout) -> (draft_q, result')``; the
    q buffer is donated."""
    fn = functools.partial(draft_program, cfg=cfg, k=k, mode=mode, window=window,
                           accepted_col=accepted_col)
    return jax.jit(fn, donate_argnums=(3,), static_argnums=(5,))


def forward(weights: Any, cache: KVCache, batch: Any, *, step: Callable, head: Callable,
            cfg: ModelConfig, opts: StepOptions) -> tuple[jax.Array, KVCache]:
    """``step`` then ``head`` on a plain ``StepBatch``: logits [R, V] and the updated cache."""
    hidden, cache = step(weights, cache, batch, cfg=cfg, opts=opts)
    return head(weights, hidden, cfg=cfg, sharding=opts.sharding), cache


def jit_forward(spec: Any, dep: Deployment, variant: str,
                attention: AttentionStrategy) -> Callable:
    """``(weights, cache, batch) -> (logits, cache)`` of one variant, cache donated (tests and
    benchmarks drive the model with plain batches through this)."""
    opts = StepOptions(attention=attention, sharding=dep.activation_sharding(variant))
    fn = functools.partial(forward, step=spec.step, head=spec.head, cfg=dep.cfg, opts=opts)
    return jax.jit(fn, donate_argnums=(1,),
                   in_shardings=(dep.weight_shardings(variant), dep.cache_sharding, dep.replicated),
                   out_shardings=(dep.replicated, dep.cache_sharding))
