"""The encoder's input: sequences of different lengths packed into one flat token batch.

No padding between sequences: S sequences lie back to back in T token slots, then padding up to
the compiled token bucket. Attention is bidirectional within a sequence and never across
sequences (segment ids), so a packed batch gives each sequence the embedding it gets alone.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from arctic_jax.pytree import pytree_dataclass


@pytree_dataclass
class EncoderBatch:
    """One packed encoder step (numpy on the host, jax arrays inside jit).

    - ``token_ids`` [T] int32: sequences back to back, then padding (id 0).
    - ``token_types`` [T] int32: BERT token-type (segment A/B) ids; 0 for padding.
    - ``positions`` [T] int32: each token's position in its own sequence; 0 for padding.
    - ``segment_ids`` [T] int32: the sequence index s of each token; padding gets S (the
      number of sequence slots), which no real token has.
    - ``seq_start`` [S + 1] int32: sequence s holds tokens seq_start[s] .. seq_start[s+1] - 1;
      unused sequence slots are empty (seq_start[s] == seq_start[s + 1] == number of real tokens).
    """

    token_ids: jax.Array
    token_types: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    seq_start: jax.Array

    @property
    def num_token_slots(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seq_slots(self) -> int:
        return int(self.seq_start.shape[0]) - 1


def build_encoder_batch(sequences: Sequence[Sequence[int]], num_tokens: int, num_seqs: int,
                        token_types: Sequence[Sequence[int]] | None = None) -> EncoderBatch:
    """Pack ``sequences`` (token id lists, each non-empty) into ``num_tokens`` token slots and
    ``num_seqs`` sequence slots (the compiled bucket). ValueError if they do not fit."""
    if not sequences:
        raise ValueError("an encoder batch needs at least one sequence")
    if len(sequences) > num_seqs:
        raise ValueError(f"{len(sequences)} sequences do not fit {num_seqs} sequence slots")
    lengths = np.array([len(s) for s in sequences], np.int64)
    if (lengths < 1).any():
        raise ValueError(f"sequence {int(np.argmin(lengths))} is empty")
    total = int(lengths.sum())
    if total > num_tokens:
        raise ValueError(f"{total} tokens do not fit {num_tokens} token slots")
    if token_types is not None and [len(t) for t in token_types] != lengths.tolist():
        raise ValueError("token_types must have one id per token of each sequence")
    seq_start = np.full(num_seqs + 1, total, np.int32)
    seq_start[:len(sequences) + 1] = np.concatenate([[0], np.cumsum(lengths)])
    token_ids = np.zeros(num_tokens, np.int32)
    types = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    segment_ids = np.full(num_tokens, num_seqs, np.int32)
    for s, seq in enumerate(sequences):
        a, b = seq_start[s], seq_start[s + 1]
        token_ids[a:b] = seq
        if token_types is not None:
            types[a:b] = token_types[s]
        positions[a:b] = np.arange(b - a)
        segment_ids[a:b] = s
    return EncoderBatch(token_ids=token_ids, token_types=types, positions=positions,
                        segment_ids=segment_ids, seq_start=seq_start)
