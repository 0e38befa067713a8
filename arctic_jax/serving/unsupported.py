"""Request parameters the schemas declare with OpenAI's range but this server accepts today only
at a neutral value (or null): a 400 ``unsupported`` names them, and the served OpenAPI document
narrows them to what is accepted, so that the document stays the contract.

Supporting one of them means removing its rule here (and implementing it).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from arctic_jax.serving.errors import APIError


@dataclasses.dataclass(frozen=True)
class NeutralOnly:
    """``field`` is accepted only when null or equal to one of ``neutral``.

    message: the 400's message ("{value}" is replaced by the value sent); narrowed: JSON-schema
    keywords that restrict the field's non-null schema to ``neutral``; only: the request models
    (class names) that have the field, None for every one.
    """

    field: str
    neutral: tuple[Any, ...]
    message: str
    narrowed: dict[str, Any]
    only: tuple[str, ...] | None = None

    def accepts(self, value: Any) -> bool:
        return value is None or any(type(value) is type(n) and value == n for n in self.neutral)


RULES: tuple[NeutralOnly, ...] = (
    NeutralOnly("echo", (False,), "echo is not supported", {"const": False},
                only=("CompletionRequest",)),
    NeutralOnly("suffix", ("",), "suffix is not supported", {"maxLength": 0},
                only=("CompletionRequest",)),
    NeutralOnly("best_of", (1,), "best_of={value} is not supported; use n",
                {"maximum": 1}, only=("CompletionRequest",)),
)


def check_supported(body: Any) -> None:
    """APIError 400 (code ``unsupported``) for the first field of ``body`` a rule refuses."""
    for rule in RULES:
        if rule.only is not None and type(body).__name__ not in rule.only:
            continue
        value = getattr(body, rule.field, None)
        if not rule.accepts(value):
            raise APIError(400, rule.message.replace("{value}", repr(value)), param=rule.field,
                           code="unsupported")


def narrow_schema(name: str, schema: dict[str, Any]) -> None:
    """Restrict the JSON schema ``schema`` of request model ``name`` (in place) to what the
    rules accept."""
    props = schema.get("properties", {})
    for rule in RULES:
        if rule.field not in props or (rule.only is not None and name not in rule.only):
            continue
        prop = props[rule.field]
        branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
        for branch in branches:
            branch.update(rule.narrowed)
        note = f"This server accepts only {json.dumps(rule.neutral[0])} (or null) today."
        prop["description"] = f"{prop['description']}. {note}" if "description" in prop else note
