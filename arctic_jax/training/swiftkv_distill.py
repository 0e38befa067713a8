"""Distilling a Llama teacher into its SwiftKV student (``arctic-jax distill-swiftkv``).

Recipe (Snowflake's SwiftKV): the teacher is frozen; the student is the same weights with
``norm_swiftkv``, every later layer's ``q_proj_swiftkv`` and each group's K/V projection trained
(``swiftkv_dense.SwiftKVTrainable``, initialised by ``init_trainable``). Per real (non-padding)
position, loss = T^2 * KL(teacher || student) of the logits softmaxed at temperature T (2) plus
``mse_weight`` (1) * the mean squared difference of the residual stream entering the last
decoder layer (HF's ``hidden_states[-2]``), averaged over the real positions. AdamW without
weight decay after a global-norm clip at 1, linear warm-up over 5% of the steps, cosine decay
(``trainer.optimizer``); one jitted step of a fixed [batch, seq_len] shape, so the run compiles
once. The trained parameters are kept in float32 whatever the teacher's dtype.

Data: token rows (prompt + the teacher's answer), right-padded to ``seq_len``
(``pack_sequences``). Evaluation on held-out rows (``evaluate``): next-token top-1 agreement with
the teacher, mean KL(teacher || student) at T = 1 and the perplexity of both on the rows' tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.models import swiftkv_dense
from arctic_jax.models.registry import SWIFTKV
from arctic_jax.models.swiftkv_dense import SwiftKVTrainable
from arctic_jax.training import trainer

PAD_ID = 0   # token id of padding (never a real position: masked out and causally after them)

# The student's initialisation and assembly (for the layers above, which reach no model module).
init_trainable = swiftkv_dense.init_trainable
student_weights = swiftkv_dense.student_weights


def swiftkv_config(teacher: ModelConfig, num_key_value_layers: int | None, group_size: int) -> Any:
    """The student's ``SwiftKVConfig`` for a Llama teacher: Lkv None means L // 2. ConfigError
    unless 1 <= Lkv < L and ``group_size`` divides L - Lkv."""
    L = teacher.num_layers
    lkv = L // 2 if num_key_value_layers is None else num_key_value_layers
    if not isinstance(lkv, int) or not 1 <= lkv < L:
        raise ConfigError(f"--num-key-value-layers must be in 1..{L - 1} (the teacher has {L} "
                          f"layers and at least one must come after it), got {lkv}")
    if not isinstance(group_size, int) or group_size < 1 or (L - lkv) % group_size:
        raise ConfigError(f"--group-size {group_size} must be a positive divisor of the {L - lkv} "
                          f"layers after num_key_value_layers {lkv} (of {L})")
    fields = {f.name: getattr(teacher, f.name) for f in dataclasses.fields(ModelConfig)}
    return SWIFTKV.config_class(**fields, num_key_value_layers=lkv, key_value_group_size=group_size)


# ------------------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class TokenRows:
    """Sequences right-padded to one length: ``tokens`` [S, T] int32, ``lengths`` [S]."""

    tokens: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """[S, T] float32: 1 at real positions."""
        return (np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]).astype(np.float32)


def pack_sequences(sequences: Sequence[Sequence[int]], seq_len: int) -> tuple[TokenRows, int]:
    """Each sequence's first ``seq_len`` tokens as one row: (rows, tokens cut off the longer
    sequences). ValueError for an empty sequence or seq_len < 2."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not sequences:
        raise ValueError("no sequences")
    tokens = np.full((len(sequences), seq_len), PAD_ID, np.int32)
    lengths = np.zeros(len(sequences), np.int64)
    cut = 0
    for s, seq in enumerate(sequences):
        if len(seq) < 1:
            raise ValueError(f"sequence {s} is empty")
        n = min(len(seq), seq_len)
        tokens[s, :n] = np.asarray(seq[:n], np.int32)
        lengths[s] = n
        cut += len(seq) - n
    return TokenRows(tokens=tokens, lengths=lengths), cut


def subset(rows: TokenRows, index: np.ndarray) -> TokenRows:
    return TokenRows(tokens=rows.tokens[index], lengths=rows.lengths[index])


# ------------------------------------------------------------------------------------- loss

@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The distillation loss: ``temperature``^2 * KL(teacher || student) at ``temperature`` plus
    ``mse_weight`` * MSE of the residual entering the last layer."""

    temperature: float = 2.0
    mse_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"the KL temperature must be positive, got {self.temperature}")
        if not self.mse_weight >= 0:
            raise ValueError(f"the MSE weight must be >= 0, got {self.mse_weight}")


def kl_per_position(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float
                    ) -> jax.Array:
    """[R] KL(softmax(t / T) || softmax(s / T)) of logits [R, V]."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def distill_loss(cfg: Any, lc: LossConfig, trainable: SwiftKVTrainable, teacher: Any,
                 tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(loss, (mean scaled KL, mean MSE)) over the real positions (``mask`` [B, T]) of ``tokens``."""
    out = swiftkv_dense.distill_forward(cfg, teacher, trainable, tokens)
    m = mask.reshape(-1).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)
    kl = lc.temperature ** 2 * kl_per_position(out.teacher_logits, out.student_logits,
                                               lc.temperature)
    diff = out.student_penultimate.astype(jnp.float32) - out.teacher_penultimate.astype(jnp.float32)
    mse = jnp.mean(diff * diff, axis=-1)
    kl_mean, mse_mean = jnp.sum(kl * m) / count, jnp.sum(mse * m) / count
    return kl_mean + lc.mse_weight * mse_mean, (kl_mean, mse_mean)


def make_train_step(cfg: Any, lc: LossConfig, opt: Any) -> Callable:
    """Jitted (trainable, opt_state, teacher, tokens [B, T], mask [B, T]) -> (trainable, opt_state,
    loss, kl, mse); trainable and optimiser state are donated."""

    def train_step(trainable, opt_state, teacher, tokens, mask):
        (loss, (kl, mse)), grads = jax.value_and_grad(
            functools.partial(distill_loss, cfg, lc), has_aux=True)(trainable, teacher, tokens, mask)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, kl, mse

    return jax.jit(train_step, donate_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class TrainResult:
    trainable: SwiftKVTrainable
    losses: np.ndarray   # [steps, 3]: loss, scaled KL, MSE of each step


def train(cfg: Any, teacher: Any, trainable: SwiftKVTrainable, rows: TokenRows,
          tc: trainer.TrainConfig, lc: LossConfig = LossConfig(),
          on_step: Callable[[int, np.ndarray], None] | None = None) -> TrainResult:
    """AdamW (``trainer.optimizer(tc)``) on ``trainable`` (a float32 copy is trained) over batches
    of ``rows`` in seeded order; ``on_step(step, [loss, kl, mse])`` after every step."""
    opt = trainer.optimizer(tc)
    trainable = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), trainable)
    opt_state = trainer.init_state(opt, trainable)
    step_fn = make_train_step(cfg, lc, opt)
    mask = rows.mask
    losses = []
    for step, idx in enumerate(trainer.batch_indices(len(rows), tc.batch_size, tc.steps, tc.seed)):
        trainable, opt_state, *values = step_fn(trainable, opt_state, teacher, rows.tokens[idx],
                                                mask[idx])
        values = np.asarray([float(v) for v in values])
        if not np.isfinite(values).all():
            raise FloatingPointError(f"the distillation loss became {values[0]} at step {step}")
        losses.append(values)
        if on_step is not None:
            on_step(step, values)
    return TrainResult(trainable=trainable, losses=np.stack(losses))


# ------------------------------------------------------------------------------------- eval

@dataclasses.dataclass(frozen=True)
class Quality:
    """The student against the teacher over ``positions`` next-token predictions of held-out
    rows (every real position that has a next token)."""

    positions: int
    top1_agreement: float    # share of positions where both models' argmax agree
    kl: float                # mean KL(teacher || student) at temperature 1
    student_perplexity: float
    teacher_perplexity: float


@functools.cache
def _eval_batch(cfg: Any) -> Callable:
    """Jitted (trainable, teacher, tokens [B, T], mask [B, T]) -> per-position sums over the
    predicting positions: (count, agreements, KL, student NLL, teacher NLL)."""

    def run(trainable, teacher, tokens, mask):
        out = swiftkv_dense.distill_forward(cfg, teacher, trainable, tokens)
        B, T = tokens.shape
        t_logits = out.teacher_logits.reshape(B, T, -1)[:, :-1]
        s_logits = out.student_logits.reshape(B, T, -1)[:, :-1]
        m = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)
        target = tokens[:, 1:]
        agree = (jnp.argmax(t_logits, -1) == jnp.argmax(s_logits, -1)).astype(jnp.float32)
        kl = kl_per_position(t_logits, s_logits, 1.0)

        def nll(logits):
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]

        return tuple(jnp.sum(x * m) for x in (jnp.ones_like(m), agree, kl, nll(s_logits),
                                               nll(t_logits)))

    return jax.jit(run)


def evaluate(cfg: Any, teacher: Any, trainable: SwiftKVTrainable, rows: TokenRows,
             batch_size: int) -> Quality:
    """``Quality`` of the student ``trainable`` on ``rows`` (batches of one shape, the last one
    padded with empty rows)."""
    if len(rows) < 1 or int(np.sum(np.maximum(rows.lengths - 1, 0))) < 1:
        raise ValueError("no held-out positions to evaluate: use more prompts or a larger "
                         "held-out fraction")
    run = _eval_batch(cfg)
    mask = rows.mask
    sums = np.zeros(5, np.float64)
    for start in range(0, len(rows), batch_size):
        idx = np.arange(start, min(start + batch_size, len(rows)))
        pad = batch_size - idx.shape[0]
        tokens = np.concatenate([rows.tokens[idx], np.full((pad, rows.tokens.shape[1]), PAD_ID,
                                                           np.int32)])
        m = np.concatenate([mask[idx], np.zeros((pad, mask.shape[1]), np.float32)])
        sums += np.asarray([float(x) for x in run(trainable, teacher, tokens, m)])
    count, agree, kl, s_nll, t_nll = sums
    return Quality(positions=int(count), top1_agreement=agree / count, kl=kl / count,
                   student_perplexity=math.exp(s_nll / count),
                   teacher_perplexity=math.exp(t_nll / count))


# ----------------------------------------------------------------------------------- report

@dataclasses.dataclass(frozen=True)
class AnswerPair:
    """One fixed prompt's greedy answers by the teacher and by the trained student."""

    prompt: str
    teacher: str
    student: str


@dataclasses.dataclass(frozen=True)
class DistillReport:
    """A distillation run's result, for printing and the benchmark table."""

    num_layers: int
    num_key_value_layers: int
    group_size: int
    steps: int
    train_seconds: float
    losses: np.ndarray             # [steps, 3] loss, scaled KL, MSE
    held_out_prompts: int
    init: Quality
    trained: Quality
    answers: tuple[AnswerPair, ...] = ()
    checkpoint: str = ""

    def table(self) -> str:
        """The quality table (init vs trained) and the side-by-side greedy answers."""
        L, Lkv, g = self.num_layers, self.num_key_value_layers, self.group_size
        i, t = self.init, self.trained
        first, last = self.losses[0], self.losses[-max(1, len(self.losses) // 10):].mean(axis=0)
        lines = [
            f"SwiftKV student: Lkv {Lkv} of {L} layers, group size {g} "
            f"(KV cache layers {L} -> {Lkv + (L - Lkv) // g}); {self.steps} steps in "
            f"{self.train_seconds:.0f} s; loss {first[0]:.4f} -> {last[0]:.4f} "
            f"(KL*T^2 {first[1]:.4f} -> {last[1]:.4f}, MSE {first[2]:.4f} -> {last[2]:.4f})",
            f"held out: {t.positions} next-token positions of {self.held_out_prompts} prompts",
            f"{'':24}{'init':>10}{'trained':>10}",
            f"{'top-1 agreement':24}{i.top1_agreement:>10.2%}{t.top1_agreement:>10.2%}",
            f"{'KL(teacher||student)':24}{i.kl:>10.4f}{t.kl:>10.4f}",
            f"{'student perplexity':24}{i.student_perplexity:>10.3f}{t.student_perplexity:>10.3f}",
            f"{'teacher perplexity':24}{t.teacher_perplexity:>10.3f}{t.teacher_perplexity:>10.3f}",
        ]
        if self.answers:
            same = sum(a.teacher == a.student for a in self.answers)
            lines.append(f"greedy answers, teacher vs trained student ({same} of "
                         f"{len(self.answers)} identical):")
            for a in self.answers:
                lines.append(f"  Q: {a.prompt}")
                lines.append(f"    teacher: {a.teacher!r}")
                lines.append(f"    student: {a.student!r}")
        return "\n".join(lines)
