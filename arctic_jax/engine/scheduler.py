"""Host-side continuous-batching scheduler (plain Python, no device work).

Each call to ``schedule`` builds one step: running requests first (decodes and
unfinished prefills, in admission order), then waiting requests admitted FIFO
while pages, sequence slots and the token budget allow. Prefills are chunked
to fit the budget and mixed with decodes in the same step.

The engine overlaps steps: step n+1 is scheduled before step n's sampled
tokens reach the host. A request's newest token may therefore be *pending*
(known only on the device); a decode of it reads the token from the device
token buffer row ``request.token_slot``.

Speculative decoding: drafts are scheduled tokens. A request whose next chunk
reaches its last token and has no pending token may carry the draft tokens in
``request.spec_tokens``: the chunk becomes [..., last, d1..dk] at consecutive
positions, pages are reserved for all of them, and logits come back for the
last token and every draft (1 + k rows). ``update`` accepts drafts while each
equals the target's own token (greedy verification), appends the accepted
drafts plus the target's next token, and rolls ``num_computed`` back by the
rejected drafts; their KV slots are simply overwritten later. Only verified
tokens are ever registered in the prefix cache. While a verify step is in
flight its request has nothing to schedule (``num_computed`` is ahead of the
known tokens), so it is skipped until the result is read.

Draft trees (``request.spec_parents``): the drafts follow the last token in depth-first
order (``speculative.verify.preorder``) and are verified by walking the tree
(``tree_accept``). Only the KV of an accepted run along the first-child chain sits in
its final slots; accepted tokens after a branch are kept as output and recomputed by
the next chunk (``num_computed`` rolls back to the end of the chain).
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from arctic_jax.engine.page_allocator import OutOfPagesError, PageAllocator
from arctic_jax.engine.request import FinishReason, Request, RequestStatus
from arctic_jax.speculative.verify import chain_prefix, greedy_accept, tree_accept, tree_depth


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    page_size: int = 16
    num_pages: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size",
                     "num_pages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so that every running sequence can decode")

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one request, computed in this step."""

    request: Request
    start: int
    num_tokens: int
    host_tokens: tuple[int, ...]   # token ids; the last is a placeholder when from_slot
    from_slot: bool                # the last token is read from the device token buffer
    sample: bool                   # this chunk reaches the end: sample the next token
    draft: tuple[int, ...] = ()    # draft tokens appended after the last token (verify them)
    draft_parents: tuple[int, ...] | None = None   # a draft tree's parents (-1: the last token)
    draft_from_model: bool = False  # the drafts came from the draft model (its q verifies them)

    @property
    def num_logits(self) -> int:
        """Logits rows this chunk asks for: 0, 1 (sample), or 1 + k (verify k drafts)."""
        return 1 + len(self.draft) if self.sample else 0


@dataclasses.dataclass(frozen=True)
class ScheduledStep:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_logits(self) -> int:
        return sum(c.num_logits for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class Verified:
    """The outcome of one verified chunk: drafts sent, drafts accepted, tokens kept (after a
    stop inside the accepted run, fewer than accepted + 1)."""

    request: Request
    drafted: int
    accepted: int
    emitted: int
    depth: int     # draft positions offered: len(draft) for a path, the depth of a tree


@dataclasses.dataclass(frozen=True)
class StepUpdate:
    """What ``Scheduler.update`` did: requests that received tokens, and each verified chunk."""

    touched: list[Request]
    verified: list[Verified]


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: Iterable[int] = ()):
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.allocator = PageAllocator(config.num_pages, config.page_size,
                                       enable_prefix_caching=config.enable_prefix_caching)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.token_cap: int | None = None   # a tighter step budget while programs compile
        self.capped = False                 # the last step was bounded by token_cap

    # ------------------------------------------------------------------ intake
    def validate(self, prompt_len: int) -> None:
        """Raise ValueError if a prompt of this length can never be served."""
        cfg = self.config
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if prompt_len >= cfg.max_model_len:
            raise ValueError(
                f"the prompt has {prompt_len} tokens, but the model's context length is "
                f"{cfg.max_model_len} (prompt plus at least one generated token must fit)")
        if -(-(prompt_len + 1) // cfg.page_size) > self.allocator.num_pages:
            raise ValueError(f"the prompt needs more KV pages than the cache has "
                             f"({self.allocator.num_pages} pages of {cfg.page_size} tokens)")

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return None
        self.finish(request, FinishReason.ABORT)
        return request

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> ScheduledStep:
        """The next step. Its tokens stay within ``max_num_batched_tokens`` and ``token_cap``
        (set while the larger steps' programs still compile); ``capped`` tells whether the
        cap, not the configured budget, bounded this step."""
        budget = self.config.max_num_batched_tokens
        capped = self.token_cap is not None and self.token_cap < budget
        if capped:
            budget = self.token_cap
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        scheduled_ids: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(self._tokens_to_compute(request), budget)
            if n <= 0:
                request.spec_tokens = []
                request.spec_from_model = False
                i += 1
                continue
            # drafts leave one token of budget to each running request after this one, and take
            # only pages that are free (they never preempt another request)
            from_model = request.spec_from_model
            draft, parents = self._draft_for(request, n, budget - (len(self.running) - i - 1))
            if draft:
                spare = ((len(request.pages) + self.allocator.num_free()) * self.config.page_size
                         - request.num_computed - n)
                draft = draft[:max(spare, 0)]
                parents = None if parents is None else parents[:len(draft)]
            end = request.num_computed + n + len(draft)
            if not self._reserve_pages(request, end, preempted, scheduled_ids):
                continue  # request itself was preempted; running[i] is now the next one
            chunks.append(self._make_chunk(request, n, draft, parents, from_model))
            scheduled_ids.add(request.request_id)
            budget -= n + len(draft)
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.pending:
                break  # its last token is still on the device; admit it next step
            if not self._admit(request, budget):
                break
            self.waiting.popleft()
            n = min(self._tokens_to_compute(request), budget)
            chunks.append(self._make_chunk(request, n))
            scheduled_ids.add(request.request_id)
            budget -= n
        self.capped = capped and budget == 0
        return ScheduledStep(chunks=tuple(chunks), preempted=tuple(preempted))

    def _draft_for(self, request: Request, n: int,
                   budget: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """The proposed drafts this chunk can carry and their tree parents (None: a path);
        consumed: a request proposes anew each step. Drafts need a chunk that reaches the
        last token, with no token pending, and are capped by the budget, ``max_tokens`` and
        the model length (every verified run emits accepted + 1 tokens); a tree keeps its
        first drafts, which is again a tree."""
        draft, request.spec_tokens = request.spec_tokens, []
        parents, request.spec_parents = request.spec_parents, None
        request.spec_from_model = False
        if not draft or request.pending or request.num_computed + n != request.num_tokens:
            return (), None
        room = max(min(budget - n, request.params.max_tokens - request.num_generated - 1,
                       self.config.max_model_len - request.num_tokens - 1), 0)
        return tuple(draft[:room]), None if parents is None else tuple(parents[:room])

    def _tokens_to_compute(self, request: Request) -> int:
        if request.num_generated >= request.params.max_tokens:
            return 0
        if request.num_tokens >= self.config.max_model_len:
            return 0
        return request.num_tokens - request.num_computed

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def _reserve_pages(self, request: Request, num_tokens: int, preempted: list[str],
                       protected: set[str]) -> bool:
        """Give ``request`` pages for ``num_tokens``; preempt newer requests if needed."""
        need = self._pages_for(num_tokens) - len(request.pages)
        while need > 0:
            try:
                request.pages.extend(self.allocator.allocate(need))
                return True
            except OutOfPagesError:
                victim = self._pick_victim(protected)
                if victim is None or victim is request:
                    self._preempt(request)
                    preempted.append(request.request_id)
                    return False
                self._preempt(victim)
                preempted.append(victim.request_id)
        return True

    def _pick_victim(self, protected: set[str]) -> Request | None:
        for request in reversed(self.running):
            if request.request_id not in protected:
                return request
        return None

    def _admit(self, request: Request, budget: int) -> bool:
        cfg = self.config
        pages, cached = [], 0
        if cfg.enable_prefix_caching:
            pages, cached = self.allocator.match_prefix(request.all_ids, count=False)
        n = min(request.num_tokens - cached, budget)
        need = self._pages_for(cached + n) - len(pages)
        try:
            new_pages = self.allocator.allocate(need) if need > 0 else []
        except OutOfPagesError:
            if pages:
                self.allocator.free(pages)
            return False
        if cfg.enable_prefix_caching:
            self.allocator.count_query(request.num_tokens, cached)
        request.pages = list(pages) + new_pages
        request.num_computed = cached
        request.num_registered_pages = len(pages)
        if request.num_preemptions == 0:
            request.num_cached_prompt = min(cached, len(request.prompt_ids))
        request.token_slot = self._free_slots.pop()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return True

    def _make_chunk(self, request: Request, n: int, draft: tuple[int, ...] = (),
                    parents: tuple[int, ...] | None = None,
                    from_model: bool = False) -> ScheduledChunk:
        start = request.num_computed
        end = start + n
        known = request.num_known
        from_slot = end > known  # the last token is still pending on the device
        host = tuple(request.known_tokens(start, min(end, known))) + ((0,) if from_slot else ())
        sample = end == request.num_tokens
        if draft and not sample:
            raise ValueError("drafts need a chunk that reaches the request's last token")
        request.num_computed = end + len(draft)
        if sample:
            request.pending += 1
        return ScheduledChunk(request=request, start=start, num_tokens=n + len(draft),
                              host_tokens=host + draft, from_slot=from_slot, sample=sample,
                              draft=draft, draft_parents=parents if draft else None,
                              draft_from_model=from_model and bool(draft))

    def _preempt(self, request: Request) -> None:
        """Free a running request's pages; it is recomputed from scratch later."""
        self.running.remove(request)
        self.allocator.free(request.pages)
        request.pages = []
        request.num_computed = 0
        request.num_registered_pages = 0
        request.spec_tokens = []
        request.spec_parents = None
        request.spec_from_model = False
        request.model_draft = []
        self._release_slot(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def preempt_all(self) -> list[str]:
        """Preempt every running request (after the KV cache was lost); they wait, oldest first,
        to be recomputed. Returns their ids."""
        ids = []
        for request in reversed(list(self.running)):   # newest first: each goes to the queue's front
            ids.append(request.request_id)
            self._preempt(request)
        return ids[::-1]

    def _release_slot(self, request: Request) -> None:
        if request.token_slot >= 0:
            self._free_slots.append(request.token_slot)
            request.token_slot = -1

    # ----------------------------------------------------------------- update
    def update(self, step: ScheduledStep, tokens: Sequence[int],
               logprobs: Sequence[float] | None = None,
               top_logprobs: Sequence[Sequence[tuple[int, float]]] | None = None,
               accepted: Sequence[bool] | None = None) -> StepUpdate:
        """Apply one step's sampled tokens: ``chunk.num_logits`` rows per chunk, in order.

        A plain chunk appends its one token. A verify chunk appends its accepted drafts and
        the target's next token, and rolls ``num_computed`` back by the rejected drafts.
        ``accepted`` (per row, from the device's rejection sampling): row i accepted draft
        d_{i+1}, and each row's token is the draft if accepted, else the token to emit
        instead; without it drafts are accepted while equal to the row's token (greedy).
        A draft tree is walked along the rows' tokens (``tree_accept``; its rows carry no
        accepted flags). Tokens after a stop (EOS, stop token, ``max_tokens``, model length) are dropped.
        """
        touched, verified = [], []
        row = 0
        tokens = np.asarray(tokens, dtype=np.int64).tolist()   # Python ints, from arrays or lists
        if logprobs is not None:
            logprobs = np.asarray(logprobs, dtype=np.float64).tolist()
        for chunk in step.chunks:
            request = chunk.request
            if not chunk.sample:
                self._register_pages(request)
                continue
            rows = range(row, row + chunk.num_logits)
            row += chunk.num_logits
            if request.finished:
                continue
            request.pending -= 1  # a request preempted meanwhile keeps the tokens, recomputes later
            targets = tokens[rows.start:rows.stop]
            kept_rows, in_place = self._verify(chunk, rows, targets, accepted)
            n_accepted = len(kept_rows) - 1
            if chunk.draft and request.status is RequestStatus.RUNNING:
                request.num_computed -= len(chunk.draft) - in_place
            emitted = 0
            for r in kept_rows:
                token = tokens[r]
                request.output_ids.append(token)
                emitted += 1
                if logprobs is not None:
                    request.output_logprobs.append(logprobs[r])
                if top_logprobs is not None and request.params.logprobs:
                    request.top_logprobs.append(list(top_logprobs[r]))
                reason = self._stop_reason(request, token)
                if reason is not None:
                    self.finish(request, reason)
                    break
            touched.append(request)
            if chunk.draft:
                depth = (len(chunk.draft) if chunk.draft_parents is None
                         else tree_depth(chunk.draft_parents))
                verified.append(Verified(request, len(chunk.draft), n_accepted, emitted, depth))
            if not request.finished:
                self._register_pages(request)
        return StepUpdate(touched=touched, verified=verified)

    @staticmethod
    def _verify(chunk: ScheduledChunk, rows: range, targets: list[int],
                accepted: Sequence[bool] | None) -> tuple[list[int], int]:
        """The rows whose tokens a chunk emits (accepted drafts, then the target's next token)
        and how many accepted drafts keep their KV where it was written."""
        if not chunk.draft:
            return [rows[0]], 0
        if chunk.draft_parents is not None:
            path = tree_accept(chunk.draft, chunk.draft_parents, targets)
            return [rows[0]] + [rows[1 + i] for i in path], chain_prefix(path)
        if accepted is None:
            n = greedy_accept(chunk.draft, targets)
        else:
            n = next((i for i, r in enumerate(rows[:-1]) if not accepted[r]), len(chunk.draft))
        return list(rows[:n + 1]), n

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if len(request.output_ids) >= params.max_tokens:
            return FinishReason.LENGTH
        if len(request.prompt_ids) + len(request.output_ids) >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _register_pages(self, request: Request) -> None:
        if not self.config.enable_prefix_caching or request.status is not RequestStatus.RUNNING:
            return
        full = min(request.num_computed, request.num_known) // self.config.page_size
        if full > request.num_registered_pages:
            ps = self.config.page_size
            self.allocator.register_full_pages(request.pages[:full],
                                               request.known_tokens(0, full * ps),
                                               start_page=request.num_registered_pages)
            request.num_registered_pages = full

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request now and return its pages and slot."""
        if request.finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        if request.pages:
            self.allocator.free(request.pages)
            request.pages = []
        self._release_slot(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)
