"""schemathesis against a live ``arctic-jax serve`` of the embedded SmolLM2, with the server's
own /openapi.json as the contract (issue 17).

schemathesis' engine runs in process as ``st run --checks all`` does (its coverage and fuzzing
phases, a fixed seed, one request at a time): every check on every response, among them
``not_a_server_error``, status code, content type, header and body schema conformance (each
server-sent event of ``stream: true`` too), ``negative_data_rejection``,
``positive_data_acceptance``, ``missing_required_header``, ``ignored_auth`` (the server runs
with ``--api-key``: every /v1 route is probed without and with a wrong key) and a response-time
limit. Any failure or engine error fails the test with schemathesis' report of it.

Two profiles, so that fuzzing never asks for long outputs and still checks the real contract:
- valid requests (positive mode) come from the served document with ``max_tokens`` required and
  at most ``FUZZ_MAX_TOKENS`` (chat's ``max_completion_tokens`` too) and ``n`` at most
  ``FUZZ_MAX_N``: a narrowing, every such body is valid under the served document too;
- invalid requests (negative mode) come from the served document itself, so what the server
  must refuse is exactly what it declares. The few it accepts (a valid body sent with another
  Content-Type, which the server reads as JSON) get ``max_tokens`` = ``FUZZ_MAX_TOKENS``
  where they name no length (a ``before_call`` hook on every request; schemathesis
  revalidates a case a hook changed).

Two rejections of a schema-valid request are documented behaviour (the 400 response's
description): a prompt longer than the model's context (``context_length_exceeded``) and a text
prompt with no tokens (``empty_prompt``: SmolLM2's vocabulary has no token for the byte 0x04, so
the text U+0004 has none). Both depend on the prompt's tokens, so no JSON schema states them. Those
rejections are dropped (``filter_failure``), counted, and reported.

The cases run, failures, and those drops are written as JSON to ``$ARCTIC_JAX_FUZZ_SUMMARY``
when it is set (the reliability table of benchmarks/RESULTS.md).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.engine import events, from_schema
from schemathesis.openapi.checks import RejectedPositiveData

from arctic_jax.serving.openapi import decimal_below_pattern
from helpers import running_server, tiny_server_args

MODEL = "smollm2-fuzz"
API_KEY = "sk-fuzz-5c1e"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SEED = 20240917
FUZZ_MAX_TOKENS = 4
FUZZ_MAX_N = 2
MAX_EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 100}   # fuzzing, per operation
MAX_RESPONSE_TIME_S = 30.0   # a few tokens of a 135M model on a loaded 2-core machine
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")
TOKEN_DEPENDENT = ("context_length_exceeded", "empty_prompt")   # 400 codes no schema can state
GENERATION_REQUESTS = ("CompletionRequest", "ChatCompletionRequest")
GENERATION_ROUTES = ("POST /v1/completions", "POST /v1/chat/completions")
OPERATIONS = {*GENERATION_ROUTES, "GET /v1/models", "GET /health", "GET /metrics"}
SUMMARY: dict[str, Any] = {}


@dataclasses.dataclass
class FuzzRun:
    """What one schemathesis run did: cases sent (checks' probes included, as ``st run``
    counts them) and statuses answered, by operation; failures and engine errors as text."""

    cases: Counter = dataclasses.field(default_factory=Counter)
    statuses: dict[str, Counter] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    token_dependent: Counter = dataclasses.field(default_factory=Counter)
    seconds: float = 0.0

    def record(self, recorder) -> None:
        label = recorder.label
        self.cases[label] += len(recorder.cases)
        statuses = self.statuses.setdefault(label, Counter())
        for interaction in recorder.interactions.values():
            if interaction.response is not None:
                statuses[interaction.response.status_code] += 1
        for checks in recorder.checks.values():
            for check in checks:
                if check.failure_info is not None:
                    failure = check.failure_info.failure
                    self.failures.append(f"{label} [{check.name}] {failure.title}\n{failure.message}"
                                         f"\n{check.failure_info.code_sample}")

    def summary(self) -> dict[str, Any]:
        return {"cases": sum(self.cases.values()), "failures": len(self.failures),
                "errors": len(self.errors), "token_dependent_rejections": dict(self.token_dependent),
                "seconds": round(self.seconds, 1), "cases_by_operation": dict(self.cases),
                "statuses_by_operation": {k: {str(s): n for s, n in sorted(v.items())}
                                          for k, v in self.statuses.items()}}


@pytest.fixture(scope="module")
def server():
    yield from running_server(tiny_server_args(MODEL, "--api-key", API_KEY))


@pytest.fixture(scope="module")
def served_document(server) -> dict[str, Any]:
    r = httpx.get(server.url + "/openapi.json", timeout=30)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary():
    """Write what the runs did to $ARCTIC_JAX_FUZZ_SUMMARY (when set) after the module."""
    yield
    path = os.environ.get("ARCTIC_JAX_FUZZ_SUMMARY")
    if path and SUMMARY:
        runs = SUMMARY.values()
        out = {"schemathesis": schemathesis.__version__, "seed": SEED,
               "cases": sum(r["cases"] for r in runs), "failures": sum(r["failures"] for r in runs),
               "errors": sum(r["errors"] for r in runs), **SUMMARY}
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def fuzzing_profile(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with the generation requests' ``max_tokens`` required and both lengths at most
    ``FUZZ_MAX_TOKENS``, and ``n`` at most ``FUZZ_MAX_N`` (a narrowing: every body valid here
    is valid under ``doc``)."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    for name in GENERATION_REQUESTS:
        props = schemas[name]["properties"]
        for field in (*LENGTH_FIELDS, "n"):
            if field not in props:
                continue
            integer = next(b for b in props[field]["anyOf"] if b.get("type") == "integer")
            limit = FUZZ_MAX_N if field == "n" else FUZZ_MAX_TOKENS
            integer["maximum"] = min(integer["maximum"], limit)
            if field == "max_tokens":
                props[field] = integer   # required, and not null
        schemas[name]["required"] = [*schemas[name].get("required", []), "max_tokens"]
    return doc


def bounded_length(context, case, kwargs) -> None:
    """``before_call``: a body that names no output length (or null) asks for
    ``FUZZ_MAX_TOKENS``."""
    body = case.body
    if isinstance(body, dict) and all(body.get(field) is None for field in LENGTH_FIELDS):
        body["max_tokens"] = FUZZ_MAX_TOKENS


def fuzz(doc: dict[str, Any], url: str, mode: GenerationMode) -> FuzzRun:
    """Run schemathesis' engine (all checks) on ``doc``'s operations at ``url``."""
    run = FuzzRun()
    schema = schemathesis.openapi.from_dict(doc, config=schemathesis.Config())   # no config file
    schema.config.update(base_url=url, headers=AUTH, request_timeout=120, workers=1)
    schema.config.checks.update(included_check_names=["all"], max_response_time=MAX_RESPONSE_TIME_S)
    schema.config.generation.update(modes=[mode], max_examples=MAX_EXAMPLES[mode],
                                    database="none")   # no replays of earlier runs' failures
    schema.config.seed = SEED
    schema.config.output.sanitization.update(enabled=False)   # report max_tokens, stop_token_ids

    @schema.hook
    def filter_failure(context, failure, case, response) -> bool:
        """Keep every failure but a schema-valid prompt refused for its tokens."""
        if not (isinstance(failure, RejectedPositiveData) and response.status_code == 400):
            return True
        code = response.json()["error"]["code"]
        if code not in TOKEN_DEPENDENT:
            return True
        run.token_dependent[code] += 1
        return False

    start = time.monotonic()
    schemathesis.hook("before_call")(bounded_length)
    try:
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                run.record(event.recorder)
            elif isinstance(event, events.NonFatalError):
                run.errors.append(f"{event.label}: {event.info.format()}")
            elif isinstance(event, events.FatalError):
                run.errors.append(f"fatal: {event.exception!r}")
            elif isinstance(event, events.Interrupted):
                run.errors.append("interrupted")
            elif isinstance(event, events.EngineFinished):
                run.failures += [f"{f.operation}: {f.title}\n{f.message}" for f in event.failures]
    finally:
        schemathesis.hooks.unregister(bounded_length)
    run.seconds = time.monotonic() - start
    SUMMARY[mode.value] = run.summary()
    return run


def assert_clean(run: FuzzRun) -> None:
    print(json.dumps(run.summary(), indent=1))
    if run.errors or run.failures:
        pytest.fail(f"{len(run.failures)} failures, {len(run.errors)} errors:\n\n"
                    + "\n\n".join(run.errors + run.failures), pytrace=False)
    assert set(run.cases) == OPERATIONS, sorted(run.cases)


def test_valid_requests_get_documented_answers(server, served_document):
    run = fuzz(fuzzing_profile(served_document), server.url, GenerationMode.POSITIVE)
    assert_clean(run)
    for route in GENERATION_ROUTES:   # the fuzzer reached the model, not only the validator
        assert run.statuses[route][200] >= 10, (route, run.statuses[route])


def test_invalid_requests_get_documented_errors(server, served_document):
    run = fuzz(served_document, server.url, GenerationMode.NEGATIVE)
    assert_clean(run)
    for route in GENERATION_ROUTES:
        assert run.statuses[route][400] >= 10, (route, run.statuses[route])
        assert run.statuses[route][401] >= 1, (route, run.statuses[route])


@pytest.mark.parametrize("limit", [*range(1, 24), 99, 100, 101, 1000, 1001, 32000, 49152, 128256])
def test_token_id_keys_pattern_matches_exactly_the_ids_below_the_limit(limit):
    pattern = re.compile(decimal_below_pattern(limit))
    for k in range(2 * limit + 20):
        assert bool(pattern.fullmatch(str(k))) == (k < limit), (limit, k, pattern.pattern)
        assert bool(pattern.fullmatch(f"00{k}")) == (k < limit), (limit, k, pattern.pattern)
    for text in ("", "-1", "+1", " 1", "1 ", "1a", "0x1", "١"):
        assert not pattern.fullmatch(text), text
