"""Training and evaluation of a draft model on self-distilled windows (``data.Examples``).

Loss: the teacher-forced draft (``draft_model.teacher_forced_logits``) reads h_t and
x_{t+1} .. x_{t+n}; head i's cross-entropy against x_{t+i+2}, averaged over the batch and
summed over the heads. AdamW with linear warm-up and cosine decay; one jitted step of a fixed
batch size, so the whole run compiles once.

Evaluation, per held-out window: each head's teacher-forced accuracy, and the greedy draft's
accepted length (``draft_model.greedy_draft`` from (h_t, x_{t+1}), the length of the prefix
that matches x_{t+2} ..); a verify step then yields that many tokens plus one of its own.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from arctic_jax.speculative.draft_model import (
    DraftModelConfig,
    DraftWeights,
    greedy_draft,
    teacher_forced_logits,
)
from arctic_jax.training.data import Examples
from sharding.rules import replicated

BATCH_STREAM = 3   # the batch order's random stream of a seed (see data.SAMPLED_STREAM)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings. ``warmup_steps`` None: 5% of ``steps`` (at least 1)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and "
                             f"{self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 20) if self.warmup_steps is None else self.warmup_steps


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr``, then cosine decay to 0 at ``steps``."""
    if tc.warmup == 0:
        return optax.cosine_decay_schedule(tc.lr, tc.steps)
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, tc.steps, end_value=0.0)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(lr_schedule(tc), weight_decay=tc.weight_decay))


def init_state(opt: optax.GradientTransformation, params: Any) -> Any:
    """``opt.init(params)`` with every leaf on the mesh of ``params`` (when they are on one):
    the step counters are made without one, the jitted step returns them on it, and the
    second step would compile again for the different input types."""
    state = opt.init(params)
    sharding = jax.tree_util.tree_leaves(params)[0].sharding
    if not isinstance(sharding, NamedSharding):
        return state
    copy = replicated(sharding.mesh)
    return jax.tree_util.tree_map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, copy), state)


def head_losses(cfg: DraftModelConfig, weights: DraftWeights, hidden: jax.Array,
                tokens: jax.Array) -> jax.Array:
    """[B, n] cross-entropy of each head; hidden [B, Hin], tokens [B, n + 1] (see Examples)."""
    logits = teacher_forced_logits(cfg, weights, hidden, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def loss_fn(cfg: DraftModelConfig, weights: DraftWeights, hidden: jax.Array,
            tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed-over-heads mean cross-entropy, per-head mean [n])."""
    per_head = jnp.mean(head_losses(cfg, weights, hidden, tokens), axis=0)
    return jnp.sum(per_head), per_head


def make_train_step(cfg: DraftModelConfig, opt: optax.GradientTransformation) -> Callable:
    """Jitted (weights, opt_state, hidden [B, Hin], tokens [B, n+1]) -> (weights, opt_state,
    loss, per-head loss [n]); weights and optimiser state are donated."""

    def train_step(weights, opt_state, hidden, tokens):
        (loss, per_head), grads = jax.value_and_grad(
            functools.partial(loss_fn, cfg), has_aux=True)(weights, hidden, tokens)
        updates, opt_state = opt.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss, per_head

    return jax.jit(train_step, donate_argnums=(0, 1))


def batch_indices(num_examples: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` index batches of exactly ``batch_size``, walking seeded permutations of the
    examples back to back (an epoch's tail continues into the next permutation)."""
    if num_examples < 1:
        raise ValueError("no training examples: the generations are shorter than n_predict + 1 "
                         "tokens; use more prompts or longer generations")
    rng = np.random.default_rng((seed, BATCH_STREAM))
    pool = np.zeros(0, np.int64)
    for _ in range(steps):
        while pool.shape[0] < batch_size:
            pool = np.concatenate([pool, rng.permutation(num_examples)])
        yield pool[:batch_size]
        pool = pool[batch_size:]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    weights: DraftWeights
    losses: np.ndarray           # [steps] summed loss of each step
    head_losses: np.ndarray      # [steps, n]


def train(cfg: DraftModelConfig, weights: DraftWeights, hidden: np.ndarray, examples: Examples,
          tc: TrainConfig, on_step: Callable[[int, float, np.ndarray], None] | None = None
          ) -> TrainResult:
    """Train ``weights`` on ``examples`` (rows of ``hidden`` [N, Hin]); ``on_step(step, loss,
    head_losses)`` is called after every step (losses are read back each step)."""
    if examples.tokens.shape[1] != cfg.n_predict + 1:
        raise ValueError(f"examples hold windows of {examples.tokens.shape[1]} tokens; a draft "
                         f"model with n_predict={cfg.n_predict} needs {cfg.n_predict + 1}")
    if hidden.shape[1] != cfg.input_hidden_dim:
        raise ValueError(f"hidden states of width {hidden.shape[1]} for a draft model reading "
                         f"{cfg.input_hidden_dim}")
    opt = optimizer(tc)
    weights = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), weights)  # own copy
    opt_state = init_state(opt, weights)
    step_fn = make_train_step(cfg, opt)
    losses, per_head = [], []
    for step, idx in enumerate(batch_indices(len(examples), tc.batch_size, tc.steps, tc.seed)):
        h = hidden[examples.rows[idx]]
        weights, opt_state, loss, heads = step_fn(weights, opt_state, h, examples.tokens[idx])
        loss, heads = float(loss), np.asarray(heads)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at step {step}")
        losses.append(loss)
        per_head.append(heads)
        if on_step is not None:
            on_step(step, loss, heads)
    return TrainResult(weights=weights, losses=np.asarray(losses), head_losses=np.stack(per_head))


# --------------------------------------------------------------------------- eval
@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Per held-out window: each head's teacher-forced hit and cross-entropy, and the greedy
    draft's accepted length."""

    correct: np.ndarray    # [E, n] bool
    loss: np.ndarray       # [E, n] float
    accepted: np.ndarray   # [E] int: matching prefix of the greedy n-token draft

    @property
    def num_examples(self) -> int:
        return int(self.accepted.shape[0])

    @property
    def head_accuracy(self) -> np.ndarray:
        return self.correct.mean(axis=0)

    @property
    def head_loss(self) -> np.ndarray:
        return self.loss.mean(axis=0)

    @property
    def mean_accepted(self) -> float:
        return float(self.accepted.mean())

    @property
    def tokens_per_step(self) -> float:
        """Tokens a verify step yields on average: the accepted drafts plus its own."""
        return 1.0 + self.mean_accepted

    def subset(self, mask: np.ndarray) -> EvalResult:
        """The windows where ``mask`` [E] is true."""
        return EvalResult(correct=self.correct[mask], loss=self.loss[mask],
                          accepted=self.accepted[mask])


@functools.cache
def _eval_batch(cfg: DraftModelConfig) -> Callable:
    """Jitted (weights, hidden [B, Hin], tokens [B, n+1]) -> (correct [B, n], loss [B, n],
    accepted [B])."""

    def run(weights, hidden, tokens):
        targets = tokens[:, 1:]
        logits = teacher_forced_logits(cfg, weights, hidden, tokens[:, :-1])
        correct = jnp.argmax(logits, axis=-1) == targets
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        drafted, _ = greedy_draft(cfg, weights, hidden, tokens[:, 0])
        accepted = jnp.sum(jnp.cumprod(drafted == targets, axis=1), axis=1)
        return correct, ce, accepted

    return jax.jit(run)


def evaluate(cfg: DraftModelConfig, weights: DraftWeights, hidden: np.ndarray, examples: Examples,
             batch_size: int = 256) -> EvalResult:
    """Accuracy and acceptance of every example (batches of one size, the last padded)."""
    if len(examples) < 1:
        raise ValueError("no held-out examples to evaluate: use more prompts, a larger "
                         "held-out fraction or longer generations")
    run = _eval_batch(cfg)
    parts = []
    for start in range(0, len(examples), batch_size):
        idx = np.arange(start, min(start + batch_size, len(examples)))
        real = idx.shape[0]
        idx = np.concatenate([idx, np.zeros(batch_size - real, np.int64)])
        out = run(weights, hidden[examples.rows[idx]], examples.tokens[idx])
        parts.append([np.asarray(x)[:real] for x in out])
    correct, loss, accepted = (np.concatenate(p) for p in zip(*parts, strict=True))
    return EvalResult(correct=correct, loss=loss.astype(np.float64), accepted=accepted)
