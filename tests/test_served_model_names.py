"""The model names a server answers to: ``--served-model-name`` (one or more, as vLLM), else the
loaded model's name, and ``default`` for the embedded default model (not listed by /v1/models).
The served servers' own checks are in test_server.py (the README's requests, sent as written)
and test_embedding_server.py (two names)."""
from __future__ import annotations

import os

import pytest

from arctic_jax.cli import build_parser
from arctic_jax.serving.cli_commands import default_model_aliases
from arctic_jax.serving.errors import APIError
from arctic_jax.serving.state import ServerState
from checkpoints.loader import default_model_path


def ready(state: ServerState, loaded: str = "SmolLM2-135M-Instruct.Q4_1",
          aliases: tuple[str, ...] = ()) -> ServerState:
    state.set_ready(object(), tokenizer=None, model_name=loaded, aliases=aliases)
    return state


def rejected(state: ServerState, name) -> str:
    with pytest.raises(APIError) as e:
        state.check_model(name)
    assert (e.value.status, e.value.code, e.value.param) == (400, "model_not_found", "model")
    return e.value.message


def test_the_flag_takes_one_or_more_names():
    parser = build_parser()
    assert parser.parse_args(["serve"]).served_model_name is None
    assert parser.parse_args(["serve", "--served-model-name", "a"]).served_model_name == ["a"]
    args = parser.parse_args(["serve", "--served-model-name", "a", "b/c", "--port", "1"])
    assert args.served_model_name == ["a", "b/c"] and args.port == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--served-model-name"])


def test_served_names_replace_the_loaded_name():
    state = ready(ServerState(served_model_name=["first", "second", "first"]))
    assert state.served_model_name == "first"            # what responses carry
    assert state.model_names == ("first", "second")      # what /v1/models lists
    for name in ("first", "second"):
        state.check_model(name)
    message = rejected(state, "SmolLM2-135M-Instruct.Q4_1")
    assert "does not exist" in message and "'first', 'second'" in message
    rejected(state, "default")                          # not the embedded model: no alias
    rejected(state, None)


def test_without_served_names_the_loaded_name_and_default_alias():
    state = ready(ServerState(), aliases=("default",))
    assert state.model_names == ("SmolLM2-135M-Instruct.Q4_1",)
    state.check_model("SmolLM2-135M-Instruct.Q4_1")
    state.check_model("default")
    assert "also accepted: 'default'" in rejected(state, "gpt-4o")
    # one string, as older callers pass it; an alias equal to a served name is not repeated
    state = ready(ServerState(served_model_name="default"), aliases=("default",))
    assert state.model_names == ("default",) and state.model_aliases == ()


def test_empty_names_are_refused():
    for bad in ([], [""], ["a", " "]):
        with pytest.raises(ValueError, match="served model names must be non-empty"):
            ServerState(served_model_name=bad)


def test_default_alias_only_for_the_embedded_default_model(tmp_path):
    gguf = default_model_path()
    assert default_model_aliases("default") == default_model_aliases(None) == ("default",)
    assert default_model_aliases(gguf) == ("default",)
    link = tmp_path / "smol.gguf"
    os.symlink(gguf, link)
    assert default_model_aliases(str(link)) == ("default",)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    assert default_model_aliases(str(other)) == ()
    assert default_model_aliases(str(tmp_path / "missing")) == ()
    assert default_model_aliases("all-MiniLM-L6-v2") == ()
