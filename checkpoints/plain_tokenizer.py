"""A HF tokenizer directory read with ``tokenizers`` and ``jinja2`` alone.

Importing transformers costs about a second of every start; the tokenizer of a GGUF file, once
cached as a HF tokenizer directory (``checkpoints.gguf_tokenizer``), needs none of it.
``PlainTokenizer`` reads ``tokenizer.json`` (the whole encoding pipeline: normalizer,
pre-tokenizer, BPE model, post-processor adding BOS/EOS, decoder), the special tokens of
``tokenizer_config.json``, and the chat template (``chat_template.jinja``, or the config's
``chat_template`` string). It offers the part of ``PreTrainedTokenizerFast``'s interface the
runtime uses: calling it, ``encode``, ``decode``/``batch_decode``, ``convert_ids_to_tokens``,
``get_vocab``, the special tokens and their ids, ``apply_chat_template`` and
``save_pretrained``.

Chat templates render as transformers renders them: a sandboxed jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
keeps non-ASCII characters, and the ``raise_exception`` and ``strftime_now`` globals; the
variables are ``messages``, ``add_generation_prompt`` and the special tokens. The rendered text
is encoded without adding special tokens (the template writes them).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from checkpoints.errors import CheckpointError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
TEMPLATE_FILE = "chat_template.jinja"
FILES = ("tokenizer.json", "tokenizer_config.json", TEMPLATE_FILE)


def _token_text(value: Any) -> str | None:
    """A special token as the config writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class PlainTokenizer:
    """The tokenizer of HF tokenizer ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer

        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, "tokenizer.json")
        try:
            self.backend_tokenizer = Tokenizer.from_file(path)
            with open(os.path.join(self.directory, "tokenizer_config.json"),
                      encoding="utf-8") as f:
                config = json.load(f)
        except Exception as e:   # a missing file, bad JSON, or a tokenizer.json tokenizers rejects
            raise CheckpointError(f"{self.directory}: not a readable tokenizer directory ({e})") \
                from None
        self.special_tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        template_path = os.path.join(self.directory, TEMPLATE_FILE)
        if os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                self.chat_template: str | None = f.read()
        else:
            self.chat_template = config.get("chat_template")
        self._template = None

    # ------------------------------------------------------------------ special tokens
    def _id_of(self, name: str) -> int | None:
        text = self.special_tokens[name]
        return None if text is None else self.backend_tokenizer.token_to_id(text)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens["eos_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of("unk_token")

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True
                 ) -> dict[str, Any]:
        """{"input_ids": ids} of one text, or of each text of a list."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        batch = self.backend_tokenizer.encode_batch(list(text),
                                                    add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in batch]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode([int(i) for i in ids],
                                             skip_special_tokens=skip_special_tokens)

    def batch_decode(self, seqs: Sequence[Sequence[int]], skip_special_tokens: bool = False
                     ) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in seqs]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = False, tokenize: bool = True
                            ) -> str | dict[str, list[int]]:
        """The conversation rendered by the chat template: the text, or with ``tokenize``
        {"input_ids": ids} (no special tokens added beyond those the template writes)."""
        if not self.chat_template:
            raise ValueError(f"{self.directory}: this tokenizer has no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        text = self._template.render(messages=list(conversation),
                                     add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.special_tokens.items()
                                        if v is not None})
        return {"input_ids": self.encode(text, add_special_tokens=False)} if tokenize else text

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Copy the tokenizer's files to ``directory`` (made if missing)."""
        os.makedirs(directory, exist_ok=True)
        for name in FILES:
            src = os.path.join(self.directory, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(directory, name))


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _compile(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)
