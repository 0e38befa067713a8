"""Texts -> token ids for an embedding model: the checkpoint's fast (Rust) tokenizer in batch,
a named query prompt prepended, and a worker-thread pool that keeps tokenization off a
server's event loop.

Special tokens are added as the model's tokenizer adds them ([CLS] ... [SEP] for BERT).
No truncation happens unless asked (``keep``): then each text keeps its *last* tokens and
its special tokens, as vLLM's ``truncate_prompt_tokens`` does for text (left truncation); a
prompt is never cut (only the text after it).
Each thread uses its own copy of the Rust tokenizer, with the truncation and padding that a
``tokenizer.json`` may configure switched off.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import threading
from collections.abc import Sequence
from typing import Any

from tokenizers import Encoding

from arctic_jax.models.pooling import PoolingConfig


class EmbeddingTokenizer:
    """Batched tokenization of texts for one embedding model.

    ``tokenizer``: the model's HF tokenizer (a fast one: ``backend_tokenizer`` is used);
    ``pooling``: its prompts (``prompts``, ``default_prompt_name``); ``num_threads``: the
    worker threads of ``encode_async``.
    """

    def __init__(self, tokenizer: Any, pooling: PoolingConfig, *, num_threads: int = 4):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; "
                             f"embedding models need one (a tokenizer.json)")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.num_threads = num_threads
        self._backend = backend
        self._copy_lock = threading.Lock()
        self._local = threading.local()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        specials = self._rust().post_process(self._rust().encode("", add_special_tokens=False),
                                             None, True).ids
        self.num_special_tokens = len(specials)
        # the special token the model's template puts first ([CLS]): kept when token ids are cut
        self.leading_special_ids = frozenset(specials[:1])

    def _rust(self) -> Any:
        """This thread's copy of the Rust tokenizer (no truncation, no padding)."""
        rust = getattr(self._local, "rust", None)
        if rust is None:
            with self._copy_lock:
                rust = copy.deepcopy(self._backend)
            rust.no_truncation()
            rust.no_padding()
            self._local.rust = rust
        return rust

    def prompt(self, prompt_name: str | None) -> str:
        """The prefix of ``prompt_name`` (None: the model's default prompt, if any, else "")."""
        name = prompt_name if prompt_name is not None else self.pooling.default_prompt_name
        if name is None:
            return ""
        try:
            return self.pooling.prompts[name]
        except KeyError:
            known = ", ".join(self.pooling.prompts) or "none"
            raise ValueError(f"unknown prompt_name {name!r}; this model's prompts: {known}") from None

    def text_room(self, keep: int, prompt_name: str | None = None) -> int:
        """Text tokens left when an input is cut to ``keep`` tokens after the special tokens and
        the prompt; ValueError when none is left (or for an unknown prompt)."""
        prefix = self.prompt(prompt_name)
        prompt_len = len(self._rust().encode(prefix, add_special_tokens=False).ids) if prefix else 0
        room = keep - self.num_special_tokens - prompt_len
        if room < 1:
            raise ValueError(f"truncating to {keep} tokens leaves no room for text besides the "
                             f"{self.num_special_tokens} special tokens"
                             + (f" and the {prompt_len}-token prompt" if prompt_len else ""))
        return room

    def encode(self, texts: Sequence[str], *, prompt_name: str | None = None,
               keep: int | None = None, first_index: int = 0) -> list[list[int]]:
        """Token ids of each text (prompt prepended), special tokens included.

        ``keep``: keep only each sequence's last ``keep`` tokens, its special tokens among them
        (more than ``num_special_tokens``). ValueError for an empty list, a non-string or an
        empty text (named by its index + ``first_index``), or an unknown prompt.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("no inputs: the list of texts is empty")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"input {i + first_index} must be a string, got "
                                 f"{type(text).__name__}")
            if not text:
                raise ValueError(f"input {i + first_index} is an empty string")
        prefix = self.prompt(prompt_name)
        rust = self._rust()
        if keep is None:
            texts = [prefix + t for t in texts] if prefix else texts
            return [e.ids for e in rust.encode_batch(list(texts), add_special_tokens=True)]
        # Truncation cuts the text, never the prompt: the prompt's tokens stay whole in front.
        prompt = rust.encode(prefix, add_special_tokens=False) if prefix else None
        body = self.text_room(keep, prompt_name)
        out = []
        for e in rust.encode_batch(list(texts), add_special_tokens=False):
            if len(e.ids) > body:
                e.truncate(body, direction="left")
            if prompt is not None:
                e = Encoding.merge([prompt, e], growing_offsets=True)
            out.append(rust.post_process(e, None, True).ids)
        return out

    async def encode_async(self, texts: Sequence[str], *, prompt_name: str | None = None,
                           keep: int | None = None) -> list[list[int]]:
        """``encode`` in a worker thread (the event loop stays free)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads,
                                                               thread_name_prefix="arctic-tokenize")
        fn = functools.partial(self.encode, texts, prompt_name=prompt_name, keep=keep)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
