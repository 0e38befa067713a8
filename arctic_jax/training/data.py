"""Self-distilled training data for a draft model: the base model's own generations (greedy
for some prompts, sampled for the rest) with its final-normed hidden states, a held-out split
by prompt, the (hidden, token window) training examples, and an ``.npz`` cache of it all.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from arctic_jax.training.hidden_states import BaseModel, hidden_states

log = logging.getLogger(__name__)

# Independent random streams of one --seed (numpy ``default_rng((seed, stream))``).
SAMPLED_STREAM, SPLIT_STREAM = 1, 2

# Below this share of greedy tokens matching the base head's argmax over the recomputed hidden
# states, the states are not aligned with the tokens (numerical near-ties give a few misses
# in low precision, an off-by-one gives almost all).
MIN_GREEDY_AGREEMENT = 0.9


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """What a data set was generated with; a cached set is reused only for equal settings."""

    model: str
    num_prompts: int
    max_tokens: int
    sampled_fraction: float
    temperature: float
    seed: int

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.max_tokens < 1:
            raise ValueError(f"num_prompts and max_tokens must be positive, got {self.num_prompts} "
                             f"and {self.max_tokens}")
        if not 0.0 <= self.sampled_fraction <= 1.0:
            raise ValueError(f"sampled_fraction must be in [0, 1], got {self.sampled_fraction}")
        if self.sampled_fraction > 0 and self.temperature <= 0:
            raise ValueError(f"sampled generations need a temperature > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class DistilledData:
    """Generations of S prompts, N generated tokens in all, with the base model's states.

    Sequence s owns rows ``offsets[s]:offsets[s + 1]``: ``tokens[r]`` is a generated token and
    ``hidden[r]`` the base model's final-normed hidden state at the position before it (the
    state whose head predicted it; the first row of a sequence is its last prompt position);
    ``logprobs[r]`` the token's log-probability as the engine computed it while generating.
    """

    tokens: np.ndarray        # [N] int32
    hidden: np.ndarray        # [N, H] float32
    logprobs: np.ndarray      # [N] float32
    offsets: np.ndarray       # [S + 1] int64
    prompt_lens: np.ndarray   # [S] int64
    sampled: np.ndarray       # [S] bool: sampled (else greedy) generation
    vocab_size: int
    architectures: tuple[str, ...]
    settings: GenerationSettings
    greedy_agreement: float   # share of greedy tokens equal to the head's argmax of their row

    def __post_init__(self) -> None:
        n, s = self.tokens.shape[0], self.prompt_lens.shape[0]
        if self.hidden.ndim != 2 or self.hidden.shape[0] != n:
            raise ValueError(f"hidden must be [{n}, H], got {self.hidden.shape}")
        if self.offsets.shape != (s + 1,) or self.offsets[0] != 0 or self.offsets[-1] != n \
                or (np.diff(self.offsets) < 1).any():
            raise ValueError(f"offsets must rise from 0 to {n} over {s} non-empty sequences")
        if self.logprobs.shape != (n,):
            raise ValueError(f"logprobs must be [{n}], got {self.logprobs.shape}")
        if self.sampled.shape != (s,):
            raise ValueError(f"sampled must be [{s}], got {self.sampled.shape}")
        if n and not 0 <= int(self.tokens.min()) <= int(self.tokens.max()) < self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")

    @property
    def num_sequences(self) -> int:
        return int(self.prompt_lens.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.hidden.shape[1])

    # ----------------------------------------------------------------- cache
    def save(self, path: str | os.PathLike) -> None:
        """Write the set to an ``.npz`` file."""
        meta = {"vocab_size": self.vocab_size, "architectures": list(self.architectures),
                "settings": dataclasses.asdict(self.settings),
                "greedy_agreement": self.greedy_agreement}
        tmp = f"{os.fspath(path)}.tmp.npz"
        np.savez(tmp, tokens=self.tokens, hidden=self.hidden, logprobs=self.logprobs,
                 offsets=self.offsets,
                 prompt_lens=self.prompt_lens, sampled=self.sampled, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DistilledData:
        with np.load(path, allow_pickle=False) as f:
            try:
                meta = json.loads(str(f["meta"]))
                return cls(tokens=f["tokens"], hidden=f["hidden"], logprobs=f["logprobs"],
                           offsets=f["offsets"],
                           prompt_lens=f["prompt_lens"], sampled=f["sampled"],
                           vocab_size=int(meta["vocab_size"]),
                           architectures=tuple(meta["architectures"]),
                           settings=GenerationSettings(**meta["settings"]),
                           greedy_agreement=float(meta["greedy_agreement"]))
            except KeyError as e:
                raise ValueError(f"{path} is not a draft-training data cache (no {e})") from None


def load_cached(path: str | os.PathLike, settings: GenerationSettings) -> DistilledData:
    """A cached set made with ``settings``; ValueError naming every setting that differs."""
    data = DistilledData.load(path)
    if data.settings != settings:
        diff = [f"{k}: cached {v!r}, asked {getattr(settings, k)!r}"
                for k, v in dataclasses.asdict(data.settings).items() if getattr(settings, k) != v]
        raise ValueError(f"data cache {path} was generated with other settings ({'; '.join(diff)}); "
                         f"delete it or pass the same settings")
    return data


# --------------------------------------------------------------------- generation
def sampled_mask(num_prompts: int, fraction: float, seed: int) -> np.ndarray:
    """[num_prompts] bool: which prompts get a sampled generation (round(fraction * n) of them,
    a seeded choice)."""
    mask = np.zeros(num_prompts, bool)
    order = np.random.default_rng((seed, SAMPLED_STREAM)).permutation(num_prompts)
    mask[order[:round(fraction * num_prompts)]] = True
    return mask


def distill(llm: Any, conversations: Sequence[Any], settings: GenerationSettings, *,
            attention_impl: str | None = None) -> DistilledData:
    """Generate a reply to every conversation with ``llm`` (an ``arctic_jax.llm.LLM``), then
    recompute the base model's hidden states over prompt + reply.

    Sampled prompts draw at ``settings.temperature`` with seed ``settings.seed + prompt index``;
    the rest are greedy. ValueError when the recomputed states disagree with the greedy
    generations (their head's argmax must reproduce at least ``MIN_GREEDY_AGREEMENT`` of them).
    """
    from arctic_jax.sampling import SamplingParams
    from arctic_jax.tokenizer import encode_chat

    if len(conversations) != settings.num_prompts:
        raise ValueError(f"{len(conversations)} conversations for num_prompts={settings.num_prompts}")
    prompts = [encode_chat(llm.tokenizer, c) for c in conversations]
    sampled = sampled_mask(len(prompts), settings.sampled_fraction, settings.seed)
    params = [SamplingParams(max_tokens=settings.max_tokens, temperature=settings.temperature,
                             seed=settings.seed + i) if s
              else SamplingParams(max_tokens=settings.max_tokens, temperature=0.0)
              for i, s in enumerate(sampled)]
    log.info("generating %d replies (%d sampled) of up to %d tokens", len(prompts),
             int(sampled.sum()), settings.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    replies = [list(o.token_ids) for o in outputs]
    empty = [i for i, r in enumerate(replies) if not r]
    if empty:
        raise ValueError(f"prompts {empty[:5]} got empty replies")
    model = BaseModel.of_llm(llm)
    log.info("generated %d tokens in %.1f s; computing the hidden states",
             sum(len(r) for r in replies), time.perf_counter() - start)
    start = time.perf_counter()
    states = hidden_states(model, [p + r for p, r in zip(prompts, replies, strict=True)],
                           [len(p) - 1 for p in prompts], attention_impl=attention_impl)
    log.info("hidden states of %d sequences in %.1f s", len(prompts), time.perf_counter() - start)
    tokens = np.concatenate([np.asarray(r, np.int32) for r in replies])
    hidden = np.concatenate([h for h, _ in states]).astype(np.float32)
    greedy_rows = [(np.asarray(r), a) for r, (_, a), s in zip(replies, states, sampled, strict=True)
                   if not s]
    agreement = (float(np.mean(np.concatenate([r == a for r, a in greedy_rows])))
                 if greedy_rows else float("nan"))
    if greedy_rows and agreement < MIN_GREEDY_AGREEMENT:
        raise ValueError(f"the recomputed hidden states reproduce only {agreement:.1%} of the greedy "
                         f"tokens through the base model's head: states and tokens are misaligned")
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in replies])]).astype(np.int64)
    logprobs = np.concatenate([np.asarray(o.logprobs, np.float32) for o in outputs])
    if logprobs.shape != tokens.shape:
        raise ValueError(f"the engine returned {logprobs.shape[0]} logprobs for {tokens.shape[0]} tokens")
    return DistilledData(tokens=tokens, hidden=hidden, logprobs=logprobs, offsets=offsets,
                         prompt_lens=np.asarray([len(p) for p in prompts], np.int64),
                         sampled=sampled, vocab_size=int(model.cfg.vocab_size),
                         architectures=model.architectures, settings=settings,
                         greedy_agreement=agreement)


# ----------------------------------------------------------------------- examples
@dataclasses.dataclass(frozen=True)
class Examples:
    """Training windows: for the position t of row ``rows[e]`` (hidden h_t, which predicted
    x_{t+1}), ``tokens[e]`` = x_{t+1} .. x_{t+n+1}; the draft reads h_t and x_{t+1} .. x_{t+n}
    and head i learns x_{t+i+2}."""

    rows: np.ndarray       # [E] int64 rows of DistilledData.hidden
    tokens: np.ndarray     # [E, n + 1] int32
    sequences: np.ndarray  # [E] int64 the sequence (prompt) of each window

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def windows(data: DistilledData, sequences: Sequence[int], n_predict: int) -> Examples:
    """Every window of ``n_predict + 1`` generated tokens of the given sequences (a sequence of
    G tokens gives max(G - n_predict, 0))."""
    if n_predict < 1:
        raise ValueError(f"n_predict must be positive, got {n_predict}")
    rows, toks, seqs = [], [], []
    width = n_predict + 1
    for s in sequences:
        start, end = int(data.offsets[s]), int(data.offsets[s + 1])
        count = end - start - n_predict
        if count <= 0:
            continue
        r = np.arange(start, start + count)
        rows.append(r)
        seqs.append(np.full(count, s, np.int64))
        toks.append(data.tokens[r[:, None] + np.arange(width)[None, :]])
    if not rows:
        return Examples(rows=np.zeros(0, np.int64), tokens=np.zeros((0, width), np.int32),
                        sequences=np.zeros(0, np.int64))
    return Examples(rows=np.concatenate(rows).astype(np.int64),
                    tokens=np.concatenate(toks).astype(np.int32), sequences=np.concatenate(seqs))


def split_by_prompt(num_sequences: int, held_out_fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) sequence indices, a seeded split with at least one prompt on each side."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    if num_sequences < 2:
        raise ValueError(f"a held-out split needs at least 2 prompts, got {num_sequences}")
    held = min(max(1, round(held_out_fraction * num_sequences)), num_sequences - 1)
    order = np.random.default_rng((seed, SPLIT_STREAM)).permutation(num_sequences)
    return np.sort(order[held:]), np.sort(order[:held])
