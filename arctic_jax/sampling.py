"""Per-request sampling parameters and the batched, jit-compatible sampler.

``SamplingParams`` is what a user sends with a request. ``SamplingTensors`` is
its per-row device form for one step (R rows, padded with greedy rows).
``sample`` turns logits [R, V] into one token per row:

- rows with temperature below ``GREEDY_TEMPERATURE`` take the argmax;
- other rows divide the logits by the temperature, then keep the top-k tokens,
  then the nucleus (smallest set whose cumulative probability reaches top_p,
  computed on the top-k renormalised distribution; the top token is always
  kept), then drop tokens whose probability is below min_p times the largest,
  and draw with the Gumbel-max trick from the key
  ``fold_in(key(seed), step)``. A seeded row therefore gets the same token
  whatever its row index and whatever other rows share the batch.

Tokens tied with the top-k / top-p cut-off value are all kept.

The work a step needs is chosen on the host as a static ``SamplingMode``: all
greedy rows need only an argmax, and only top-k / top-p need the cut-off search over [R, V].
A device-side ``lax.cond`` would do the same, but on a GPU it makes the host
wait for the step to reach the predicate, which serialises the engine's
overlapped steps.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.pytree import pytree_dataclass

GREEDY_TEMPERATURE = 1e-5   # temperatures below this sample greedily
MAX_LOGPROBS = 20           # most top logprobs a request may ask for
MAX_SEED = 2**32 - 1        # seeds are uint32
MAX_PENALTY = 2.0           # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY]
MAX_LOGIT_BIAS = 100.0      # logit_bias values lie in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]
MAX_N = 16                  # most copies (choices) of one request


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"SamplingParams.{field}={value!r}: {why}")


def _logit_bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` (a dict or (id, bias) pairs) as (id, bias) pairs sorted by id."""
    if value is None:
        return ()
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    if not isinstance(pairs, (list, tuple)):
        raise _bad("logit_bias", value, "must be a dict of token id -> bias")
    out = {}
    for item in pairs:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise _bad("logit_bias", value, f"entry {item!r} is not a (token id, bias) pair")
        token, bias = item
        if not _is_int(token) or token < 0:
            raise _bad("logit_bias", value, f"token id {token!r} is not an integer >= 0")
        if not _is_real(bias) or not (-MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise _bad("logit_bias", value, f"bias {bias!r} of token {token} is not in "
                                            f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if int(token) in out:
            raise _bad("logit_bias", value, f"token id {token} occurs twice")
        out[int(token)] = float(bias)
    return tuple(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """User-facing sampling parameters of one request (vLLM-like).

    temperature 0 means greedy; top_k 0 or -1 disables top-k; top_p 1 and
    min_p 0 disable nucleus and min-p filtering. ``logprobs`` is the number of
    top logprobs to return per generated token (None: none), always those of the raw
    logits (vLLM's default). ``stop`` accepts a string or a sequence of strings and is
    stored as a tuple.

    Logit adjustments, applied in this order before temperature and the filters (vLLM's
    semantics; ``arctic_jax.sampling_penalties`` runs them on the device):

    - ``logit_bias``: token id -> bias in [-100, 100] added to its logit (OpenAI); a dict
      or (id, bias) pairs, stored as a tuple of (id, bias) pairs sorted by id. Ids are
      checked against the model's vocabulary by ``check_vocab`` (the engine calls it);
    - ``repetition_penalty`` > 0 (vLLM; 1 = off): a token that occurs in the prompt or in
      the output so far has its logit divided by it where positive, else multiplied;
    - ``frequency_penalty`` in [-2, 2] (OpenAI): minus the penalty times the number of times
      the token was generated so far by this request;
    - ``presence_penalty`` in [-2, 2] (OpenAI): minus the penalty if the token was generated
      so far by this request.

    ``n`` in [1, MAX_N]: choices per prompt. The engine runs one sequence per request:
    ``copies`` expands a request into its n copies (``LLM.generate`` and
    the server do, through ``engine.choice_jobs``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:   # normalises a field of this frozen instance
            object.__setattr__(self, name, value)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        set_("max_tokens", int(self.max_tokens))

        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise _bad("temperature", t, "must be a finite number >= 0")
        set_("temperature", float(t))

        p = self.top_p
        if not _is_real(p) or not (0.0 < p <= 1.0):  # also rejects nan
            raise _bad("top_p", p, "must be in (0, 1]")
        set_("top_p", float(p))

        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", self.top_k, "must be an integer >= -1 (0 or -1 disables it)")
        set_("top_k", int(self.top_k))

        m = self.min_p
        if not _is_real(m) or not (0.0 <= m <= 1.0):
            raise _bad("min_p", m, "must be in [0, 1]")
        set_("min_p", float(m))

        if self.seed is not None:
            if not _is_int(self.seed) or not (0 <= self.seed <= MAX_SEED):
                raise _bad("seed", self.seed, f"must be None or an integer in [0, {MAX_SEED}]")
            set_("seed", int(self.seed))

        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise _bad("stop", stop, "must be a string or a sequence of strings")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _bad("stop", self.stop, f"entry {s!r} is not a non-empty string")
        set_("stop", tuple(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise _bad("stop_token_ids", ids, "must be a sequence of token ids")
        for i in ids:
            if not _is_int(i) or i < 0:
                raise _bad("stop_token_ids", self.stop_token_ids,
                           f"entry {i!r} is not an integer >= 0")
        set_("stop_token_ids", tuple(int(i) for i in ids))

        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise _bad("ignore_eos", self.ignore_eos, "must be a bool")
        set_("ignore_eos", bool(self.ignore_eos))

        if self.logprobs is not None:
            if not _is_int(self.logprobs) or not (0 <= self.logprobs <= MAX_LOGPROBS):
                raise _bad("logprobs", self.logprobs,
                           f"must be None or an integer in [0, {MAX_LOGPROBS}]")
            set_("logprobs", int(self.logprobs))

        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not (-MAX_PENALTY <= v <= MAX_PENALTY):
                raise _bad(name, v, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
            set_(name, float(v))

        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or r <= 0:
            raise _bad("repetition_penalty", r, "must be a finite number > 0 (1 disables it)")
        set_("repetition_penalty", float(r))

        set_("logit_bias", _logit_bias_pairs(self.logit_bias))

        if not _is_int(self.n) or not (1 <= self.n <= MAX_N):
            raise _bad("n", self.n, f"must be an integer in [1, {MAX_N}]")
        set_("n", int(self.n))

    def adjusts_logits(self) -> bool:
        """True when a penalty or a logit bias changes this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias)

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError naming ``logit_bias`` if one of its token ids is not in [0, vocab_size)."""
        bad = [t for t, _ in self.logit_bias if t >= vocab_size]
        if bad:
            raise _bad("logit_bias", dict(self.logit_bias),
                       f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")

    def copies(self) -> list[SamplingParams]:
        """The ``n`` requests of these parameters, each with n = 1; copy i has the seed
        (seed + i) mod 2**32 (None stays None: every copy draws its own)."""
        return [dataclasses.replace(self, n=1, seed=None if self.seed is None
                                    else (self.seed + i) % (MAX_SEED + 1))
                for i in range(self.n)]

    def is_greedy(self) -> bool:
        """True when the request takes the argmax (temperature < GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE


class SamplingMode(enum.Enum):
    """How much of the sampler a step runs (static under jit)."""

    GREEDY = "greedy"        # every row takes the argmax
    RANDOM = "random"        # temperature, min-p and the Gumbel draw; no top-k / top-p
    FILTERED = "filtered"    # everything, with the sort that top-k / top-p need

    @classmethod
    def for_params(cls, params_list: Sequence[SamplingParams]) -> SamplingMode:
        """The cheapest mode that samples every request of ``params_list`` exactly."""
        mode = cls.GREEDY
        for p in params_list:
            if p.is_greedy():
                continue
            if p.top_k > 0 or p.top_p < 1.0:
                return cls.FILTERED
            mode = cls.RANDOM
        return mode


@pytree_dataclass
class SamplingTensors:
    """Per-row sampling state of one step; R rows (padding rows are greedy)."""

    temperature: jax.Array  # [R] f32; < GREEDY_TEMPERATURE means greedy
    top_k: jax.Array        # [R] int32; 0 = off
    top_p: jax.Array        # [R] f32; 1 = off
    min_p: jax.Array        # [R] f32; 0 = off
    seed: jax.Array         # [R] uint32
    step: jax.Array         # [R] int32 index of the token being generated (tokens so far)

    @property
    def num_rows(self) -> int:
        return int(self.temperature.shape[0])

    @classmethod
    def from_params(cls, params_list: Sequence[SamplingParams], steps: Sequence[int],
                    seeds: Sequence[int], num_rows: int) -> SamplingTensors:
        """Host (numpy) tensors for ``params_list``, padded to ``num_rows`` greedy rows.

        ``steps[i]`` is the number of tokens request i has generated so far;
        ``seeds[i]`` its resolved seed (the engine draws one when
        ``params.seed`` is None). Greedy rows are stored with every filter off.
        """
        n = len(params_list)
        if len(steps) != n or len(seeds) != n:
            raise ValueError(f"from_params: {n} params but {len(steps)} steps and "
                             f"{len(seeds)} seeds")
        if not _is_int(num_rows) or num_rows < n:
            raise ValueError(f"from_params: num_rows={num_rows!r} is less than the "
                             f"{n} requests")
        temperature = np.zeros(num_rows, np.float32)
        top_k = np.zeros(num_rows, np.int32)
        top_p = np.ones(num_rows, np.float32)
        min_p = np.zeros(num_rows, np.float32)
        seed = np.zeros(num_rows, np.uint32)
        step = np.zeros(num_rows, np.int32)
        for i, (p, st, sd) in enumerate(zip(params_list, steps, seeds, strict=True)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"from_params: params_list[{i}] is {type(p).__name__}, "
                                "not SamplingParams")
            if not _is_int(st) or not (0 <= st < 2**31):
                raise ValueError(f"from_params: steps[{i}]={st!r} must be an integer in "
                                 "[0, 2**31)")
            if not _is_int(sd) or not (0 <= sd <= MAX_SEED):
                raise ValueError(f"from_params: seeds[{i}]={sd!r} must be an integer in "
                                 f"[0, {MAX_SEED}]")
            seed[i] = sd
            step[i] = st
            if p.is_greedy():
                continue
            temperature[i] = p.temperature
            top_k[i] = max(p.top_k, 0)
            top_p[i] = p.top_p
            min_p[i] = p.min_p
        return cls(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   seed=seed, step=step)


@pytree_dataclass
class SampleResult:
    tokens: jax.Array                    # [R] int32 chosen tokens
    logprob: jax.Array                   # [R] f32 log-softmax of the raw logits at tokens
    top_ids: jax.Array | None = None     # [R, n] int32 top-n tokens of the raw logits
    top_logprobs: jax.Array | None = None  # [R, n] f32 their log-softmax values


_ABS_BITS = 0x7FFFFFFF


def _order_keys(x: jax.Array) -> jax.Array:
    """int32 keys ordered as the float32 values ``x`` (no NaN)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ _ABS_BITS, bits)


def _key_values(keys: jax.Array) -> jax.Array:
    """The float32 values of ``_order_keys`` keys."""
    return jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ _ABS_BITS, keys), jnp.float32)


def _smallest_key(holds: Any, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """[R] the smallest int32 key t in [lo, hi] with ``holds(t)`` ([R] bool; false below some
    key, true from it on, true at ``hi``): a bisection of 32 halvings, exact over int32,
    unrolled (a device-side loop would make the launching thread wait on a GPU)."""
    for _ in range(32):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)   # floor((lo + hi) / 2) without overflow
        ok = holds(mid)
        lo, hi = jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
    return hi


def cutoff_method(backend: str) -> str:
    """How ``_cutoff_values`` finds the cut-off on ``backend``: "bisect" on a CPU (a sort of
    [R, V] is 7-19x slower there), "sort" elsewhere (on an H100 the 64 reductions of the
    bisection took 0.34-1.4 ms against the sort's 0.19-1.3 ms; benchmarks/RESULTS.md)."""
    return "bisect" if backend == "cpu" else "sort"


def _cutoff_values(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array,
                   method: str | None = None) -> jax.Array:
    """[R] smallest scaled logit kept by top-k then top-p (tokens at or above it are kept).

    The value the sorted-prefix rule gives (the k-th largest value, every token tied with it
    kept; then the smallest value c whose higher tokens hold less than top_p of the kept
    tokens' renormalised probability). ``method``
    (default ``cutoff_method`` of jax's backend): "sort" sorts each row; "bisect" finds it
    without a sort, by two bisections over the values' int32 order keys, each 32 passes over
    [R, V].
    """
    method = method or cutoff_method(jax.default_backend())
    if method not in ("sort", "bisect"):
        raise ValueError(f"cut-off method must be 'sort' or 'bisect', got {method!r}")
    if method == "sort":
        return _sorted_cutoff_values(scaled, top_k, top_p)
    v = scaled.shape[-1]
    keys = _order_keys(scaled)                                     # [R, V]
    lowest, highest = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)
    k = jnp.where((top_k <= 0) | (top_k > v), v, top_k)           # [R]
    kth = _smallest_key(lambda t: jnp.sum(keys > t[:, None], axis=-1) < k, lowest, highest)
    in_k = keys >= kth[:, None]
    probs = jnp.where(in_k, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    nucleus = _smallest_key(
        lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1) < top_p, kth, highest)
    return _key_values(jnp.where(top_p >= 1.0, kth, nucleus))


def _sorted_cutoff_values(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """``_cutoff_values`` through a descending sort of each row."""
    v = scaled.shape[-1]
    srt = jnp.sort(scaled, axis=-1, descending=True)
    k = jnp.where((top_k <= 0) | (top_k > v), v, top_k)[:, None]
    in_k = srt >= jnp.take_along_axis(srt, k - 1, axis=-1)     # ties with the k-th stay in
    probs = jnp.where(in_k, jnp.exp(srt - srt[:, :1]), 0.0)
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    return jnp.take_along_axis(srt, (n_keep - 1)[:, None], axis=-1)[:, 0]


def gumbel_rows(seed: jax.Array, step: jax.Array, v: int) -> jax.Array:
    """[R, V] Gumbel noise; row r depends only on (seed[r], step[r])."""
    def row(s, st):
        key = jax.random.fold_in(jax.random.key(s), st)
        return jax.random.gumbel(key, (v,), jnp.float32)
    return jax.vmap(row)(seed, step)


def shaped_logits(logits: jax.Array, t: SamplingTensors, greedy: jax.Array,
                  filtered: bool) -> jax.Array:
    """[R, V] temperature-scaled logits with the tokens top-k / top-p / min-p drop at -inf.

    The softmax of a non-greedy row is that row's sampling distribution (greedy rows
    are scaled by 1). ``filtered`` (static) runs top-k / top-p; otherwise only min-p.
    """
    temp = jnp.where(greedy, 1.0, t.temperature).astype(jnp.float32)
    scaled = logits / temp[:, None]
    if filtered:
        cutoff = _cutoff_values(scaled, t.top_k.astype(jnp.int32), t.top_p.astype(jnp.float32))
    else:
        cutoff = jnp.full(scaled.shape[:1], -jnp.inf, scaled.dtype)
    # min-p: p_i < min_p * p_max  <=>  scaled_i < max(scaled) + log(min_p)
    row_max = jnp.max(scaled, axis=-1)
    min_p_cut = row_max + jnp.log(t.min_p.astype(jnp.float32))   # -inf when min_p == 0
    cutoff = jnp.maximum(cutoff, min_p_cut)
    return jnp.where(scaled < cutoff[:, None], -jnp.inf, scaled)


def _sample_rows(logits: jax.Array, t: SamplingTensors, greedy: jax.Array,
                 filtered: bool) -> jax.Array:
    v = logits.shape[-1]
    masked = shaped_logits(logits, t, greedy, filtered)
    noise = gumbel_rows(t.seed, t.step, v)
    drawn = jnp.argmax(masked + noise, axis=-1).astype(jnp.int32)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)


def check_logits_rows(caller: str, logits: jax.Array, t: SamplingTensors) -> tuple[int, int]:
    """(R, V) of logits [R, V] whose rows ``t`` describes; ValueError naming ``caller`` if not."""
    if logits.ndim != 2:
        raise ValueError(f"{caller}: logits must be [R, V], got shape {logits.shape}")
    r, v = logits.shape
    if t.temperature.shape != (r,):
        raise ValueError(f"{caller}: {r} logits rows but sampling tensors of shape "
                         f"{t.temperature.shape}")
    return r, v


def sample(logits: jax.Array, t: SamplingTensors, num_top_logprobs: int = 0,
           mode: SamplingMode = SamplingMode.FILTERED,
           adjusted: jax.Array | None = None) -> SampleResult:
    """Draw one token per row of ``logits`` [R, V] f32 under ``t`` (R rows).

    Pure and jit-compatible; ``num_top_logprobs`` (0..V) and ``mode`` are static.
    ``mode`` must cover every row (``SamplingMode.for_params``); a cheaper mode
    ignores the filters it does not run. Any covering mode gives the same tokens.
    ``adjusted`` [R, V]: the logits to draw from instead (penalties and logit bias applied,
    ``arctic_jax.sampling_penalties``); the logprobs always describe ``logits``.
    """
    r, v = check_logits_rows("sample", logits, t)
    if not (0 <= num_top_logprobs <= v):
        raise ValueError(f"sample: num_top_logprobs={num_top_logprobs} not in [0, {v}]")
    logits = logits.astype(jnp.float32)
    drawn_from = logits if adjusted is None else adjusted.astype(jnp.float32)
    mode = SamplingMode(mode)
    if mode is SamplingMode.GREEDY:
        tokens = jnp.argmax(drawn_from, axis=-1).astype(jnp.int32)
    else:
        greedy = t.temperature < GREEDY_TEMPERATURE
        tokens = _sample_rows(drawn_from, t, greedy, filtered=mode is SamplingMode.FILTERED)
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    top_ids = top_logprobs = None
    if num_top_logprobs:
        top_vals, top_ids = jax.lax.top_k(logits, num_top_logprobs)
        top_ids = top_ids.astype(jnp.int32)
        top_logprobs = top_vals - lse[:, None]
    return SampleResult(tokens=tokens, logprob=chosen - lse, top_ids=top_ids,
                        top_logprobs=top_logprobs)
