"""``ServerState``: what every route of the app shares (the engine once ready, the served model
name, the model's task), and the readiness and task checks the routes start with."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from arctic_jax.cli_args import (
    DEFAULT_MAX_EMBEDDING_INPUTS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
)
from arctic_jax.engine.embedding_front import AsyncEmbeddingEngine
from arctic_jax.engine.embedding_tokenizer import EmbeddingTokenizer
from arctic_jax.engine.front import EngineFront
from arctic_jax.serving.errors import APIError
from arctic_jax.serving.logprobs import TokenTexts
from arctic_jax.serving.shutdown import ShutdownGate

# The routes that serve each ``ModelSpec.task``.
TASK_ROUTES = {"generate": "/v1/completions and /v1/chat/completions",
               "embed": "/v1/embeddings"}
_TASK_NAMES = {"generate": "a text-generation model", "embed": "an embedding model"}


@dataclasses.dataclass
class ServerState:
    """What the routes need. ``engine`` stays None (503) until the model is loaded and warm.

    ``task`` is the served model's: "generate" (``engine`` an ``EngineFront``, ``tokenizer``
    its HF tokenizer) or "embed" (``engine`` an ``AsyncEmbeddingEngine``,
    ``embedding_tokenizer`` its ``EmbeddingTokenizer``). ``max_embedding_inputs``: the most
    inputs one /v1/embeddings request may hold.

    Model names: ``served_model_name`` is the name responses carry (None until ready: the
    loaded model's name); given a list (``--served-model-name A B``) it keeps the first and
    ``other_model_names`` the rest. /v1/models lists ``model_names``; requests may name any
    of them or of ``model_aliases`` (``default`` for the embedded default model), which
    /v1/models does not list. ``compilation_cache``: the start-up's
    ``CompilationCacheStats``.

    ``max_request_bytes``: larger request bodies get 413 (``request_limits.py``).
    ``shutdown_gate`` / ``shutdown_timeout``: the graceful shutdown's state and how long
    requests in flight may run on after SIGTERM or SIGINT (``shutdown.py``). ``replica``:
    this server's index when it is one of ``--replicas-per-gpu`` (``server_replicas.py``);
    every response then carries it in ``X-Arctic-Replica``.
    """

    served_model_name: str | Sequence[str] | None = None
    api_key: str | None = None
    engine: EngineFront | AsyncEmbeddingEngine | None = None
    tokenizer: Any = None
    startup_error: str | None = None
    token_texts: TokenTexts | None = None
    task: str = "generate"
    embedding_tokenizer: EmbeddingTokenizer | None = None
    max_embedding_inputs: int = DEFAULT_MAX_EMBEDDING_INPUTS
    other_model_names: tuple[str, ...] = ()
    model_aliases: tuple[str, ...] = ()
    compilation_cache: Any = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    shutdown_gate: ShutdownGate = dataclasses.field(default_factory=ShutdownGate)
    replica: str | None = None   # this process's index among --replicas-per-gpu servers

    def __post_init__(self) -> None:
        names = self.served_model_name
        if names is None:
            return
        names = [names] if isinstance(names, str) else list(names)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"served model names must be non-empty strings, got {names!r}")
        self.served_model_name = names[0]
        self.other_model_names = tuple(dict.fromkeys(names[1:] + list(self.other_model_names)))

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names /v1/models lists, the one responses carry first."""
        if self.served_model_name is None:
            return ()
        return (self.served_model_name,
                *(n for n in self.other_model_names if n != self.served_model_name))

    def _set_names(self, model_name: str, aliases: Sequence[str]) -> None:
        if self.served_model_name is None:
            self.served_model_name = model_name
        self.model_aliases = tuple(a for a in dict.fromkeys(aliases) if a not in self.model_names)

    def check_model(self, name: Any) -> None:
        """APIError 400 ``model_not_found`` unless ``name`` is one this server answers to."""
        if name in self.model_names or name in self.model_aliases:
            return
        served = ", ".join(f"'{n}'" for n in self.model_names)
        also = (f" (also accepted: {', '.join(repr(a) for a in self.model_aliases)})"
                if self.model_aliases else "")
        raise APIError(400, f"the model '{name}' does not exist; this server serves {served}{also}",
                       param="model", code="model_not_found")

    def set_ready(self, engine: EngineFront, tokenizer: Any,
                  model_name: str, aliases: Sequence[str] = ()) -> None:
        """Serve a text-generation model (``model_name``: its loaded name; ``aliases``:
        more names requests may use)."""
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.task = "generate"
        self._set_names(model_name, aliases)
        self.engine = engine  # last: readiness is "engine is not None"

    def set_embedding_ready(self, engine: AsyncEmbeddingEngine, tokenizer: EmbeddingTokenizer,
                            model_name: str, aliases: Sequence[str] = ()) -> None:
        """Serve an embedding model (as ``set_ready``)."""
        self.embedding_tokenizer = tokenizer
        self.task = "embed"
        self._set_names(model_name, aliases)
        self.engine = engine  # last: readiness is "engine is not None"

    def ready_engine(self) -> Any:
        """The engine; APIError 503 while the model loads (or failed to), 500 once it failed."""
        eng = self.engine
        if eng is None:
            why = self.startup_error or "the model is still loading"
            raise APIError(503, f"the server is not ready: {why}", type="server_error",
                           code="not_ready")
        if not eng.alive:
            raise APIError(500, f"engine failure: {eng.error}", type="server_error",
                           code="engine_failure")
        return eng

    def require(self, task: str, route: str) -> Any:
        """``ready_engine`` for a route of ``task``; APIError 400 when the model has another
        task (an embedding model asked for completions, or the reverse)."""
        eng = self.ready_engine()
        if self.task != task:
            raise APIError(400, f"the model '{self.served_model_name}' is "
                                f"{_TASK_NAMES[self.task]}: this server answers "
                                f"{TASK_ROUTES[self.task]}, not {route}", param="model",
                           code="unsupported_task")
        return eng

    def shutdown(self) -> None:
        """Stop the engine and the embedding tokenizer's threads (if any)."""
        if self.engine is not None:
            self.engine.shutdown()
        if self.embedding_tokenizer is not None:
            self.embedding_tokenizer.close()
