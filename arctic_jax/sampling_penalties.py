"""Logit adjustments that depend on a request's history: logit bias and the presence, frequency
and repetition penalties, applied on the device, per row of one batch.

Semantics (vLLM's and OpenAI's), applied to the raw logits in this order, before temperature and
the filters of ``arctic_jax.sampling``:

1. ``logit_bias``: ``x[t] += bias[t]``;
2. repetition (vLLM; 1 = off): for each token t seen in the prompt or generated so far,
   ``x[t] /= r`` where ``x[t] > 0``, else ``x[t] *= r``;
3. frequency (OpenAI): ``x[t] -= f * c[t]``, c[t] = times t was generated so far by the request;
4. presence (OpenAI): ``x[t] -= p * (c[t] > 0)``.

The history lives in device buffers, one row per sequence slot (``PenaltyState``, S slots):
``SlotFill`` loads a request's prompt, generated tokens and bias into its row when it is admitted
to a slot (again after a preemption), and the sampler adds each sampled token with
``record_tokens``. A sampler row with ``PenaltyRows.slot`` < 0 passes its logits unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.pytree import pytree_dataclass

FILL_ENTRIES = 512   # (slot, token) entries one SlotFill carries (more take several fills)


@pytree_dataclass
class PenaltyState:
    """Per sequence slot, on the device (S slots, V tokens): 9 S V bytes."""

    output_counts: jax.Array   # [S, V] int32 times each token was generated so far
    prompt_mask: jax.Array     # [S, V] bool the token occurs in the prompt
    logit_bias: jax.Array      # [S, V] f32 added to the logits

    @classmethod
    def zeros(cls, num_slots: int, vocab_size: int) -> PenaltyState:
        return cls(output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
                   prompt_mask=jnp.zeros((num_slots, vocab_size), jnp.bool_),
                   logit_bias=jnp.zeros((num_slots, vocab_size), jnp.float32))


@pytree_dataclass
class PenaltyRows:
    """Per sampler row (R rows): which state row adjusts it and how."""

    slot: jax.Array        # [R] int32 state row, or -1: logits unchanged, token not recorded
    presence: jax.Array    # [R] f32
    frequency: jax.Array   # [R] f32
    repetition: jax.Array  # [R] f32 (1 = off)

    @classmethod
    def from_values(cls, slots: Sequence[int], presence: Sequence[float],
                    frequency: Sequence[float], repetition: Sequence[float],
                    num_rows: int) -> PenaltyRows:
        """Host (numpy) rows for the first len(slots) rows, padded to ``num_rows`` rows that are
        left unchanged."""
        n = len(slots)
        if not (len(presence) == len(frequency) == len(repetition) == n) or num_rows < n:
            raise ValueError(f"PenaltyRows: {n} slots, {len(presence)}/{len(frequency)}/"
                             f"{len(repetition)} penalties, {num_rows} rows")

        def col(values: Sequence[float], fill: float, dtype: type) -> np.ndarray:
            out = np.full(num_rows, fill, dtype)
            out[:n] = values
            return out

        return cls(slot=col(slots, -1, np.int32), presence=col(presence, 0.0, np.float32),
                   frequency=col(frequency, 0.0, np.float32),
                   repetition=col(repetition, 1.0, np.float32))


def apply_penalties(logits: jax.Array, state: PenaltyState, rows: PenaltyRows) -> jax.Array:
    """Adjusted logits [R, V] f32 of ``logits`` [R, V]; rows with ``slot`` < 0 are unchanged."""
    logits = logits.astype(jnp.float32)
    active = rows.slot >= 0
    s = jnp.maximum(rows.slot, 0)
    counts = state.output_counts[s]                               # [R, V]
    x = logits + state.logit_bias[s]
    seen = state.prompt_mask[s] | (counts > 0)
    rep = rows.repetition[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    x = x - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0)
    return jnp.where(active[:, None], x, logits)


def record_tokens(state: PenaltyState, slots: jax.Array, tokens: jax.Array) -> PenaltyState:
    """Count ``tokens`` [R] as generated in state rows ``slots`` [R] (rows < 0 are skipped)."""
    s = jnp.where(slots < 0, state.output_counts.shape[0], slots)   # out of range: dropped
    counts = state.output_counts.at[s, tokens].add(1, mode="drop")
    return PenaltyState(output_counts=counts, prompt_mask=state.prompt_mask,
                        logit_bias=state.logit_bias)


@pytree_dataclass
class SlotFill:
    """Loads histories into state rows: first zero the rows ``clear``, then write F entries.

    A step's fills clear every row they write (in its first fill), and name every (slot, token)
    pair at most once.
    """

    clear: jax.Array       # [C] int32 rows to zero, or -1
    slot: jax.Array        # [F] int32 row, or -1 (padding)
    token: jax.Array       # [F] int32
    count: jax.Array       # [F] int32 times the request generated the token
    in_prompt: jax.Array   # [F] int32 1 if the token occurs in the prompt
    bias: jax.Array        # [F] f32 its logit bias


def apply_fill(state: PenaltyState, fill: SlotFill) -> PenaltyState:
    """``state`` with ``fill``'s rows cleared and its entries written."""
    num_slots = state.output_counts.shape[0]
    clear = jnp.where(fill.clear < 0, num_slots, fill.clear)
    slot = jnp.where(fill.slot < 0, num_slots, fill.slot)
    counts = state.output_counts.at[clear].set(0, mode="drop")
    prompt = state.prompt_mask.at[clear].set(False, mode="drop")
    bias = state.logit_bias.at[clear].set(0.0, mode="drop")
    return PenaltyState(
        output_counts=counts.at[slot, fill.token].add(fill.count, mode="drop"),
        prompt_mask=prompt.at[slot, fill.token].set(fill.in_prompt != 0, mode="drop"),
        logit_bias=bias.at[slot, fill.token].add(fill.bias, mode="drop"))


def _entries(slot: int, prompt: Sequence[int], output: Sequence[int],
             bias_pairs: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """One history's entries: int32 [4, n] (slot, token, count, in_prompt) and f32 bias [n], one
    per distinct token of the prompt, the output and the bias."""
    prompt_tokens = np.unique(np.asarray(prompt, np.int64))
    out_tokens, out_counts = np.unique(np.asarray(output, np.int64), return_counts=True)
    bias_tokens = np.asarray([t for t, _ in bias_pairs], np.int64)
    tokens = np.union1d(np.union1d(prompt_tokens, out_tokens), bias_tokens)
    ints = np.zeros((4, len(tokens)), np.int32)
    ints[0], ints[1] = slot, tokens
    ints[2, np.searchsorted(tokens, out_tokens)] = out_counts
    ints[3] = np.isin(tokens, prompt_tokens)
    bias = np.zeros(len(tokens), np.float32)
    bias[np.searchsorted(tokens, bias_tokens)] = [b for _, b in bias_pairs]
    return ints, bias


def build_fills(histories: Sequence[tuple[int, Sequence[int], Sequence[int],
                                          Sequence[tuple[int, float]]]],
                num_clear: int, size: int = FILL_ENTRIES) -> list[SlotFill]:
    """Host fills (numpy) loading ``histories``: (slot, prompt ids, generated ids, logit bias
    pairs) each, every slot distinct. The first fill clears the slots (``num_clear`` >= their
    number); one fill per ``size`` entries, at least one."""
    if len(histories) > num_clear:
        raise ValueError(f"build_fills: {len(histories)} slots but room to clear {num_clear}")
    clear = np.full(num_clear, -1, np.int32)
    clear[:len(histories)] = [h[0] for h in histories]
    parts = [_entries(*h) for h in histories]
    ints = np.concatenate([p[0] for p in parts] + [np.zeros((4, 0), np.int32)], axis=1)
    bias = np.concatenate([p[1] for p in parts] + [np.zeros(0, np.float32)])
    fills = []
    for start in range(0, max(ints.shape[1], 1), size):
        n = min(size, ints.shape[1] - start)
        chunk = np.zeros((4, size), np.int32)
        chunk[0] = -1
        chunk[:, :n] = ints[:, start:start + n]
        chunk_bias = np.zeros(size, np.float32)
        chunk_bias[:n] = bias[start:start + n]
        fills.append(SlotFill(clear=clear if start == 0 else np.full(num_clear, -1, np.int32),
                              slot=chunk[0], token=chunk[1], count=chunk[2], in_prompt=chunk[3],
                              bias=chunk_bias))
    return fills
