"""``GracefulServer``: uvicorn's server, stopping as vLLM and TGI do on SIGTERM or SIGINT.

The first signal starts the ``ShutdownGate``'s drain (/health and new requests 503, requests in
flight run on for up to ``timeout`` seconds, then end with an error); once nothing runs, uvicorn
stops as usual (closes connections, runs the lifespan's shutdown) and the process exits 0 (the
signal is not raised again). A second signal aborts what is still running at once; a third
stops the server without waiting.
"""
from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import uvicorn

from arctic_jax.serving.shutdown import ShutdownGate


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gate: ShutdownGate, timeout: float):
        if timeout < 0:
            raise ValueError(f"the shutdown timeout must be >= 0 seconds, got {timeout}")
        super().__init__(config)
        self.gate = gate
        self.timeout = timeout
        self.signals = 0
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler: only sets fields (the event loop acts on them in ``on_tick``)."""
        self.signals += 1
        if self.signals >= 3:
            self.should_exit = self.force_exit = True
        else:
            self.gate.begin(self.timeout if self.signals == 1 else 0.0)

    async def on_tick(self, counter: int) -> Any:
        if self.gate.draining:
            if not self._announced:
                self._announced = True
                print(f"arctic-jax serve: shutting down: {self.gate.active} request(s) in "
                      f"flight get up to {self.timeout:g} s (--shutdown-timeout); new requests "
                      "get 503", file=sys.stderr, flush=True)
            if self.gate.may_exit() and not self.should_exit:
                self.should_exit = True
                print("arctic-jax serve: "
                      + ("aborted the requests still in flight; " if self.gate.aborted else "")
                      + "stopping", file=sys.stderr, flush=True)
        return await super().on_tick(counter)
