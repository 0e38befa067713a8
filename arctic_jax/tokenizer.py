"""Encoding prompts and conversations with a checkpoint's tokenizer and chat template
(``checkpoints.loader.load_tokenizer`` reads the tokenizer)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

Conversation = Sequence[Mapping[str, str]]


def _as_ids(encoded: Any) -> list[int]:
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return _as_ids(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer: Any, conversation: Conversation) -> list[int]:
    """Token ids of a conversation under the checkpoint's chat template, ready for a reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use generate() instead")
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content'")
    return _as_ids(tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True,
                                                 tokenize=True))
