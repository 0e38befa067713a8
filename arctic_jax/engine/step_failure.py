"""What ``LLMEngine.step`` raises when one model step fails and the engine goes on.

A step fails when its model execution (input building, the jitted programs, reading the
result back) or its host post-processing (applying the tokens, detokenizing) raises. The
engine then aborts the requests of that step (their KV pages freed through the normal abort
path), settles the other step in flight, and raises ``StepFailed``; every other request keeps
running. ``RequestFailed`` is what each aborted request's client receives.
"""
from __future__ import annotations

from collections.abc import Sequence

from arctic_jax.engine.request import RequestOutput


class RequestFailed(RuntimeError):
    """The model step running this request failed; the request was aborted (the engine runs on,
    so a retry may succeed)."""


class StepFailed(RuntimeError):
    """One model step failed; its requests were aborted and the engine is ready for the next step.

    ``request_ids``: the aborted requests (every request of the failed step, including one that
    had finished in it: its final output was not returned). ``cause``: the exception the step
    raised. ``outputs``: outputs the same ``step()`` call produced for other requests (deliver
    them like ``step()``'s return value). ``device_state_lost``: the step had consumed the KV
    cache or another buffer carried between steps (donated to a call that failed, or left
    holding a failed computation), so the engine re-allocated them and preempted every running
    request, which recomputes its tokens from the host copy.
    """

    def __init__(self, request_ids: Sequence[str], cause: BaseException,
                 outputs: Sequence[RequestOutput] = (), device_state_lost: bool = False):
        self.request_ids = tuple(request_ids)
        self.cause = cause
        self.outputs = list(outputs)
        self.device_state_lost = device_state_lost
        lost = "; KV cache re-allocated, running requests recomputed" if device_state_lost else ""
        super().__init__(f"a model step failed ({self.cause_text}); its {len(self.request_ids)} "
                         f"request(s) were aborted{lost}")

    @property
    def cause_text(self) -> str:
        return f"{type(self.cause).__name__}: {self.cause}"

    def request_error(self) -> RequestFailed:
        """The error each aborted request's client receives (names the failure, not the other
        requests)."""
        return RequestFailed(f"the model step running this request failed ({self.cause_text}); "
                             "the request was aborted, the server keeps serving")
