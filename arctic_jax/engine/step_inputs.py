"""Host-side inputs of one step: the padded batch, where each token comes from, and the
sampler rows.

A scheduled chunk asks for logits on ``chunk.num_logits`` rows: none (a prefill chunk that
is not the last), one (the last token: sample the next), or 1 + k (the last known token and
k draft tokens: verify the drafts). Every logits row is one sampler row, in chunk order.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import numpy as np

from arctic_jax.batch import ALL_VISIBLE, Buckets, SequenceChunk, StepBatch, build_step_batch
from arctic_jax.engine.scheduler import ScheduledStep
from arctic_jax.pytree import pytree_dataclass
from arctic_jax.sampling import SamplingMode, SamplingParams, SamplingTensors
from arctic_jax.sampling_penalties import PenaltyRows, SlotFill, build_fills


@pytree_dataclass
class ModelInputs:
    """Per-step inputs of the model program."""

    batch: StepBatch
    token_src: jax.Array       # [T] int32 token-buffer row holding the token, or -1 (host token)


@pytree_dataclass
class SamplerInputs:
    """Per-step inputs of the sampler program (R rows)."""

    sample_slot: jax.Array     # [R] int32 token-buffer row that receives the sampled token, or -1
    sampling: SamplingTensors  # [R] rows
    draft: jax.Array           # [R] int32 the draft token row r verifies, or -1 (none)
    q_row: jax.Array           # [R] int32 draft-q buffer row of the draft's distribution, or -1
    penalties: PenaltyRows     # [R] rows; slot -1 where the request has no penalty or bias


@pytree_dataclass
class DraftInputs:
    """Per-step inputs of the draft program: E = min(R, max_num_seqs) entries, one per sampled
    chunk, in order (padding entries after them)."""

    first_row: jax.Array       # [E] int32 the chunk's first logits row
    num_rows: jax.Array        # [E] int32 its logits rows (1 + drafts verified); 0: padding
    q_slot: jax.Array          # [E] int32 first draft-q row for its drafts, or -1 (padding)
    sampling: SamplingTensors  # [E] the request's sampling, step = its first draft's step


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Host-side inputs of one step, the sampling mode its requests need, and whether it takes
    the contiguous-prefill route (a fresh prompt's first chunk attends over its own K/V)."""

    model: ModelInputs
    sampler: SamplerInputs
    mode: SamplingMode
    contiguous: bool = False
    verify: bool = False       # some row verifies a draft: the sampler's rejection-sampling variant
    draft: DraftInputs | None = None   # run the draft program after the sampler
    draft_mode: SamplingMode = SamplingMode.GREEDY
    penalties: bool = False    # some row has penalties or a logit bias: the sampler's penalty variant
    fills: tuple[SlotFill, ...] = ()   # penalty rows to load before the step (the runner adds them)

    @property
    def num_tokens(self) -> int:
        return int(self.model.batch.tokens.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.model.batch.logits_indices.shape[0])


def _sampling_rows(params: Sequence[SamplingParams], steps: Sequence[int], seeds: Sequence[int],
                   of_row: np.ndarray, depth: np.ndarray, num_rows: int) -> SamplingTensors:
    """``SamplingTensors`` of ``num_rows`` rows from one entry per chunk (its params, the step
    of its first row, its seed): row r takes chunk ``of_row[r]``'s, at step + ``depth[r]``;
    the rows past ``len(of_row)`` are greedy padding."""
    per_chunk = SamplingTensors.from_params(params, steps=steps, seeds=seeds, num_rows=len(params))
    out = SamplingTensors.from_params([], steps=[], seeds=[], num_rows=num_rows)
    n = len(of_row)
    for name in ("temperature", "top_k", "top_p", "min_p", "seed", "step"):
        getattr(out, name)[:n] = getattr(per_chunk, name)[of_row]
    out.step[:n] += depth
    return out


@dataclasses.dataclass(frozen=True)
class StepInputBuilder:
    """Turns a ``ScheduledStep`` into padded ``StepInputs`` of the compiled bucket shapes."""

    buckets: Buckets
    page_size: int
    contiguous_min_tokens: int = 0   # token buckets >= this have a contiguous route; 0: none
    tree: bool = False               # batches carry tree-attention bits (draft-tree verification)
    draft_k: int = 0                 # a draft model's tokens per step (0: no draft model)

    def contiguous_bucket(self, num_tokens_padded: int) -> bool:
        """Whether this token bucket has a contiguous-prefill program."""
        least = self.contiguous_min_tokens
        return least > 0 and num_tokens_padded >= least

    def uses_contiguous(self, step: ScheduledStep, num_tokens_padded: int) -> bool:
        """True for a step that is one sequence's first chunk (no cached prefix) in a
        contiguous bucket."""
        return (self.contiguous_bucket(num_tokens_padded) and len(step.chunks) == 1
                and step.chunks[0].start == 0 and not step.chunks[0].from_slot)

    def build(self, step: ScheduledStep, draft: bool = False) -> StepInputs:
        """The step's inputs; ``draft``: run the draft program for its sampled chunks."""
        chunks = []
        sampled, depths_of = [], []   # the chunks with logits rows; each row's depth after the last token
        for c in step.chunks:
            first = c.num_tokens - c.num_logits
            parents, depths = None, range(c.num_logits)
            if c.draft_parents is not None:   # [..., last, tree]: the known tokens form a chain
                last = c.num_tokens - len(c.draft) - 1
                parents = list(range(-1, last)) + [last if p < 0 else last + 1 + p
                                                   for p in c.draft_parents]
                depths = [0]
                for p in c.draft_parents:
                    depths.append(depths[p + 1] + 1)
            chunks.append(SequenceChunk(tokens=c.host_tokens, start=c.start, pages=c.request.pages,
                                        logits_at=tuple(range(first, c.num_tokens)), parents=parents))
            if c.num_logits:
                sampled.append(c)
                depths_of.append(depths)
        batch, _ = build_step_batch(chunks, self.page_size, self.buckets, tree=self.tree)
        T = batch.tokens.shape[0]
        R = batch.logits_indices.shape[0]
        token_src = np.full(T, -1, np.int32)
        offset = 0
        for c in step.chunks:
            if c.from_slot:   # the request's last token (a chunk with drafts is never from_slot)
                token_src[offset + c.num_tokens - 1 - len(c.draft)] = c.request.token_slot
            offset += c.num_tokens
        # Per-row values are gathered from per-chunk ones (a step has up to 64 chunks, and a
        # verify chunk 1 + k rows): of_row[r] is row r's chunk in ``sampled``.
        counts = [c.num_logits for c in sampled]
        n = sum(counts)
        of_row = np.repeat(np.arange(len(sampled)), counts)
        depth = np.fromiter(itertools.chain.from_iterable(depths_of), np.int32, n)
        slots = np.array([c.request.token_slot for c in sampled], np.int32)
        num_drafts = np.array([len(c.draft) for c in sampled], np.int32)
        # Only a plain decode's token goes back into the token buffer: a verified request's
        # next tokens are known on the host before it is scheduled again.
        sample_slot = np.full(R, -1, np.int32)
        sample_slot[:n] = np.where(num_drafts == 0, slots, -1)[of_row]
        params = [c.request.params for c in sampled]
        sampling = _sampling_rows(params, [c.request.num_generated - 1 for c in sampled],
                                  [c.request.seed for c in sampled], of_row, depth, R)
        # row i of [last, d1..dk] verifies d_{i+1}; a tree's rows verify nothing on the device
        # (the host walks the tree along the rows' ordinary tokens)
        drafts = np.full(R, -1, np.int32)
        drafts[:n] = list(itertools.chain.from_iterable(
            (*c.draft, -1) if c.draft and c.draft_parents is None else (-1,) * c.num_logits
            for c in sampled))
        q_row = np.full(R, -1, np.int32)
        from_model = np.array([c.draft_from_model for c in sampled], bool)
        q_row[:n] = np.where((depth < num_drafts[of_row]) & from_model[of_row],
                             slots[of_row] * self.draft_k + depth, -1)
        draft_inputs, draft_mode = (self._draft_inputs(step, self.num_entries(R)) if draft
                                    else (None, SamplingMode.GREEDY))
        adjusted = [p.adjusts_logits() for p in params]
        penalties = PenaltyRows.from_values([], [], [], [], num_rows=R)
        if any(adjusted):
            rows = [(sampled[j], params[j], adjusted[j]) for j in of_row.tolist()]
            penalties = PenaltyRows.from_values(
                slots=[c.request.token_slot if a else -1 for c, _, a in rows],
                presence=[p.presence_penalty for _, p, _ in rows],
                frequency=[p.frequency_penalty for _, p, _ in rows],
                repetition=[p.repetition_penalty for _, p, _ in rows], num_rows=R)
        return StepInputs(model=ModelInputs(batch=batch, token_src=token_src),
                          sampler=SamplerInputs(sample_slot=sample_slot, sampling=sampling,
                                                draft=drafts, q_row=q_row, penalties=penalties),
                          mode=SamplingMode.for_params(params),
                          contiguous=self.uses_contiguous(step, T),
                          verify=any(c.draft for c in step.chunks),
                          draft=draft_inputs, draft_mode=draft_mode, penalties=any(adjusted))

    def num_entries(self, R: int) -> int:
        """Draft entries of a step with R logits rows: at most one per sequence."""
        return min(R, self.buckets.seqs[0])

    def _draft_inputs(self, step: ScheduledStep, R: int) -> tuple[DraftInputs, SamplingMode]:
        """One draft entry per sampled chunk: its rows, q-buffer rows and sampling, with the step
        of the token after the chunk's first sampled one (the draft program adds the accepted
        count)."""
        sampled, first = [], []
        row = 0
        for c in step.chunks:
            if c.sample:
                sampled.append(c)
                first.append(row)
            row += c.num_logits
        n = len(sampled)
        first_row = np.zeros(R, np.int32)
        num_rows = np.zeros(R, np.int32)
        q_slot = np.full(R, -1, np.int32)
        first_row[:n] = first
        num_rows[:n] = [c.num_logits for c in sampled]
        q_slot[:n] = [c.request.token_slot * self.draft_k for c in sampled]
        params = [c.request.params for c in sampled]
        sampling = SamplingTensors.from_params(
            params, steps=[c.request.num_generated for c in sampled],
            seeds=[c.request.seed for c in sampled], num_rows=R)
        return (DraftInputs(first_row=first_row, num_rows=num_rows, q_slot=q_slot, sampling=sampling),
                SamplingMode.for_params(params))

    def dummy(self, T: int, MP: int, R: int | None = None, mode: SamplingMode = SamplingMode.GREEDY,
              contiguous: bool = False, verify: bool = False,
              draft_mode: SamplingMode | None = None, penalties: bool = False) -> StepInputs:
        """All-padding inputs of one bucket shape (they write no KV slot and no buffer row);
        ``penalties``: the penalty sampler, after an empty penalty fill."""
        S = self.buckets.seqs[0]
        R = S if R is None else R
        batch = StepBatch(tokens=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
                          slot_mapping=np.full(T, -1, np.int32), seq_ids=np.zeros(T, np.int32),
                          page_tables=np.zeros((S, MP), np.int32),
                          query_start=np.zeros(S + 1, np.int32), kv_lens=np.zeros(S, np.int32),
                          logits_indices=np.zeros(R, np.int32),
                          lookback=np.full(T, ALL_VISIBLE, np.int32) if self.tree else None,
                          logits_start=np.zeros(S + 1, np.int32))
        sampling = SamplingTensors.from_params([], steps=[], seeds=[], num_rows=R)
        none = np.full(R, -1, np.int32)
        draft = None
        if draft_mode is not None:
            E = self.num_entries(R)
            draft = DraftInputs(first_row=np.zeros(E, np.int32), num_rows=np.zeros(E, np.int32),
                                q_slot=none[:E], sampling=SamplingTensors.from_params(
                                    [], steps=[], seeds=[], num_rows=E))
        return StepInputs(model=ModelInputs(batch=batch, token_src=np.full(T, -1, np.int32)),
                          sampler=SamplerInputs(sample_slot=none, sampling=sampling, draft=none,
                                                q_row=none, penalties=PenaltyRows.from_values(
                                                    [], [], [], [], num_rows=R)),
                          mode=mode, contiguous=contiguous, verify=verify, draft=draft,
                          draft_mode=draft_mode or SamplingMode.GREEDY, penalties=penalties,
                          fills=tuple(build_fills([], S)) if penalties else ())

    def shapes(self) -> list[tuple[int, int, int, bool]]:
        """Every (T, MP, R, contiguous) model-program shape a run may use."""
        out = []
        for T in self.buckets.tokens:
            for R in self.buckets.rows_for(T):
                for MP in self.buckets.pages:
                    out.append((T, MP, R, False))
                    if self.contiguous_bucket(T) and R == self.buckets.seqs[0]:
                        out.append((T, MP, R, True))
        return out
