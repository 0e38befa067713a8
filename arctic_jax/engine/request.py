"""A generation request as the scheduler sees it, and what it streams back."""
from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Sequence

from arctic_jax.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"        # EOS, a stop token or a stop string
    LENGTH = "length"    # max_tokens or the model's context length
    ABORT = "abort"      # cancelled by the client


@dataclasses.dataclass
class Request:
    """Mutable per-request state owned by the scheduler.

    ``output_ids`` may end with tokens still being computed on the device
    (``pending`` of them); their values arrive with the next step's result.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    pending: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0          # tokens whose KV is in the cache
    num_registered_pages: int = 0  # full pages already recorded in the prefix cache
    num_cached_prompt: int = 0     # prompt tokens served from the prefix cache
    token_slot: int = -1           # row of the device token buffer while running
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    spec_tokens: list[int] = dataclasses.field(default_factory=list)  # drafts for the next step
    spec_parents: list[int] | None = None   # a draft tree's parents (-1: the last token); None: a path
    spec_from_model: bool = False  # spec_tokens came from the draft model (verified against its q)
    model_draft: list[int] = dataclasses.field(default_factory=list)  # the draft model's last proposal

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def known_tokens(self, start: int, end: int) -> list[int]:
        """Host-known token ids at positions [start, end) (pending tokens excluded)."""
        n_prompt = len(self.prompt_ids)
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        if start >= n_prompt:
            return self.output_ids[start - n_prompt:end - n_prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - n_prompt]

    def truncate_output(self, n: int) -> None:
        """Keep only the first ``n`` output tokens (and their logprobs)."""
        del self.output_ids[n:], self.output_logprobs[n:], self.top_logprobs[n:]

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens, counting those still on the device."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.pending

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A streamed update: the tokens added since the last update, and the text they complete."""

    request_id: str
    new_token_ids: Sequence[int]
    new_text: str
    new_logprobs: Sequence[float]
    new_top_logprobs: Sequence[Sequence[tuple[int, float]]]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclasses.dataclass
class CollectedOutput:
    """The streamed ``RequestOutput``s of one request, joined (for non-streaming callers)."""

    text_parts: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[Sequence[tuple[int, float]]] = dataclasses.field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text_parts.append(out.new_text)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs)
        self.top_logprobs.extend(out.new_top_logprobs)
        self.last = out

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def finish_reason(self) -> str:
        reason = self.last.finish_reason if self.last is not None else None
        return reason.value if reason is not None else ""
