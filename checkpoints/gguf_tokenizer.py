"""A GGUF file's tokenizer as a HF fast tokenizer, without PyTorch.

llama.cpp stores a tokenizer as ``tokenizer.*`` metadata: the vocabulary, the BPE merges, a
pre-tokenizer *name* (``tokenizer.ggml.pre``; the splitting regexes live in llama.cpp's code),
the token types, the special token ids, the add-BOS/EOS flags and the chat template.
``read_gguf_tokenizer`` reads only that metadata (one pass over the key/value section with the
``gguf`` package's constants, without ``gguf.GGUFReader``'s per-element views of the whole file);
``build_tokenizer`` turns it into a ``tokenizers.Tokenizer`` (byte-level BPE; the pre-tokenizer
named by the file, as llama.cpp splits text for it, then the byte-to-unicode mapping; a ByteLevel
decoder; CONTROL tokens as special added tokens and USER_DEFINED ones as plain added tokens;
BOS/EOS added as the file's flags say) wrapped in a ``transformers.PreTrainedTokenizerFast``.

Supported: ``tokenizer.ggml.model`` "gpt2" with the pre-tokenizers of ``PRE_TOKENIZERS``; any
other model (e.g. "llama", SentencePiece) or pre-tokenizer raises a ``CheckpointError``.

Reading and building take about half a second, so ``gguf_tokenizer_dir`` saves the result once as an ordinary
HF tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``) in a cache keyed by the
file's size, modification time and first bytes and by the versions of this format, ``tokenizers``
and ``transformers``; a later start reads that directory with ``checkpoints.plain_tokenizer``
(no transformers import). Entries are written to a temporary folder and
renamed into place; one that is incomplete or unreadable is rebuilt. Nothing here imports torch.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import mmap
import os
import shutil
import struct
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from arctic_jax.cache_root import cache_dir
from checkpoints.errors import CheckpointError
from checkpoints.plain_tokenizer import PlainTokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHE_SUBDIR = "tokenizer"
ENTRY_FILE = "gguf_tokenizer.json"  # written last into an entry: the files it holds
HEADER_HASH_BYTES = 1 << 20  # how much of the file's start the cache key hashes

# llama.cpp's Llama-3 split (src/llama-vocab.cpp). GPT-2's split is the one tokenizers'
# ByteLevel pre-tokenizer applies itself (use_regex=True).
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                 r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class PreTokenizerRule:
    """How text is pre-tokenized for one ``tokenizer.ggml.pre`` value (as llama.cpp does it).

    ``digits``: every numeric character is first cut out on its own (tokenizers' ``Digits``).
    ``split``: the regex that then cuts each piece into its matches and the text between them;
    None for GPT-2's. ``ignore_merges``: a piece that is itself a vocabulary entry becomes that
    token without merging. ``add_bos``: whether BOS is added when the file has no
    ``add_bos_token``.
    """

    split: str | None = None
    digits: bool = False
    ignore_merges: bool = False
    add_bos: bool = False


_LLAMA3 = PreTokenizerRule(_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)

# "smollm" as SmolLM2's own tokenizer.json: Digits(individual_digits) then GPT-2's ByteLevel split
# (llama.cpp isolates \p{N} there, the same characters bar a few recent code points).
PRE_TOKENIZERS: Mapping[str, PreTokenizerRule] = {
    "gpt-2": PreTokenizerRule(),
    "smollm": PreTokenizerRule(digits=True),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}
SUPPORTED_MODELS = ("gpt2",)

# llama.cpp's token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

_KEYS = {
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "token_types": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
    "bos_id": "tokenizer.ggml.bos_token_id",
    "eos_id": "tokenizer.ggml.eos_token_id",
    "unk_id": "tokenizer.ggml.unknown_token_id",
    "pad_id": "tokenizer.ggml.padding_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "add_eos": "tokenizer.ggml.add_eos_token",
    "chat_template": "tokenizer.chat_template",
}


@dataclasses.dataclass(frozen=True)
class GgufTokenizerData:
    """The ``tokenizer.*`` metadata of a GGUF file (None where the file has no such key)."""

    path: str
    model: str | None
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...] | None
    merges: tuple[str, ...] | None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None


# --------------------------------------------------------------------------------------------
# Reading the metadata


class _KVReader:
    """Walks a GGUF file's key/value section; values of keys not asked for are skipped."""

    def __init__(self, buf: Any, path: str):
        import gguf
        from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

        self.buf, self.path, self.pos = buf, path, 0
        self.types = gguf.GGUFValueType
        if len(buf) < 24:
            raise CheckpointError(f"{path} is too short to be a GGUF file ({len(buf)} bytes)")
        (magic,) = struct.unpack_from("<I", buf, 0)
        if magic != gguf.GGUF_MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic bytes)")
        self.order = "<"
        (version,) = struct.unpack_from("<I", buf, 4)
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.order = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version not in READER_SUPPORTED_VERSIONS:
            raise CheckpointError(f"{path} is GGUF version {version}; supported: "
                                  f"{', '.join(map(str, READER_SUPPORTED_VERSIONS))}")
        _, self.kv_count = struct.unpack_from(self.order + "QQ", buf, 8)
        self.pos = 24
        self.scalars = _scalar_codes(gguf.GGUFValueType)

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(self.order + fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise CheckpointError(f"{self.path} is truncated inside its metadata")
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="strict")

    def _value(self, vtype: int, keep: bool) -> Any:
        if vtype == self.types.STRING:
            if keep:
                return self._string()
            (n,) = self._unpack("Q")
            self.pos += n
            return None
        if vtype == self.types.ARRAY:
            etype, count = self._unpack("IQ")
            if etype in self.scalars:
                fmt = f"{self.order}{count}{self.scalars[etype]}"
                start, self.pos = self.pos, self.pos + struct.calcsize(fmt)
                return struct.unpack_from(fmt, self.buf, start) if keep else None
            if etype == self.types.STRING:
                if keep:
                    return tuple(self._string() for _ in range(count))
                for _ in range(count):
                    (n,) = self._unpack("Q")
                    self.pos += n
                return None
            raise CheckpointError(f"{self.path}: a metadata array of value type {etype} "
                                  "is not readable")
        if vtype in self.scalars:
            return self._unpack(self.scalars[vtype])[0]
        raise CheckpointError(f"{self.path}: metadata value type {vtype} is not readable")

    def read(self, wanted: set[str]) -> dict[str, Any]:
        """``{key: value}`` for the keys of ``wanted`` that the file has."""
        found: dict[str, Any] = {}
        for _ in range(self.kv_count):
            key = self._string()
            (vtype,) = self._unpack("I")
            value = self._value(vtype, key in wanted)
            if key in wanted:
                found[key] = value
            if len(found) == len(wanted):
                break
        return found


def _scalar_codes(types: Any) -> dict[int, str]:
    """``struct`` codes of GGUF's fixed-size value types (``gguf.GGUFValueType``)."""
    return {types.UINT8: "B", types.INT8: "b", types.UINT16: "H", types.INT16: "h",
            types.UINT32: "I", types.INT32: "i", types.FLOAT32: "f", types.BOOL: "?",
            types.UINT64: "Q", types.INT64: "q", types.FLOAT64: "d"}


def read_metadata(path: str | os.PathLike, keys: set[str]) -> dict[str, Any]:
    """``{key: value}`` for those of ``keys`` that the GGUF file ``path`` has in its metadata:
    a str, int, float or bool, or a tuple of them for an array. CheckpointError for a missing,
    truncated or malformed file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _KVReader(buf, path).read(set(keys))
    except CheckpointError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read its metadata: {e!r}") from e


def read_gguf_tokenizer(path: str | os.PathLike) -> GgufTokenizerData:
    """The tokenizer metadata of the GGUF file ``path``; CheckpointError for an unreadable file
    or one without a vocabulary."""
    path = os.fspath(path)
    raw = read_metadata(path, set(_KEYS.values()))
    values = {field: raw.get(key) for field, key in _KEYS.items()}
    if not values["tokens"]:
        raise CheckpointError(f"{path} has no tokenizer vocabulary ({_KEYS['tokens']})")
    for field in ("bos_id", "eos_id", "unk_id", "pad_id"):
        if values[field] is not None:
            values[field] = int(values[field])
    for field in ("add_bos", "add_eos"):
        if values[field] is not None:
            values[field] = bool(values[field])
    if values["token_types"] is not None:
        values["token_types"] = tuple(int(t) for t in values["token_types"])
    return GgufTokenizerData(path=path, **values)


# --------------------------------------------------------------------------------------------
# Building the tokenizer


def _supported_text() -> str:
    return (f"supported: tokenizer.ggml.model {', '.join(map(repr, SUPPORTED_MODELS))} with "
            f"tokenizer.ggml.pre {', '.join(map(repr, PRE_TOKENIZERS))}")


def pre_tokenizer_rule(data: GgufTokenizerData) -> PreTokenizerRule:
    """The rule for the file's model and pre-tokenizer type; CheckpointError naming an
    unsupported one."""
    if data.model not in SUPPORTED_MODELS:
        raise CheckpointError(f"{data.path}: tokenizer model {data.model!r} is not supported "
                              f"({_supported_text()})")
    if not data.pre:
        raise CheckpointError(f"{data.path}: the file names no pre-tokenizer (tokenizer.ggml.pre), "
                              f"so llama.cpp would use its 'default' one, which is not supported "
                              f"({_supported_text()})")
    if data.pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{data.path}: pre-tokenizer type {data.pre!r} is not supported "
                              f"({_supported_text()})")
    return PRE_TOKENIZERS[data.pre]


def _special_token(data: GgufTokenizerData, token_id: int | None, what: str) -> str | None:
    if token_id is None:
        return None
    if not 0 <= token_id < len(data.tokens):
        raise CheckpointError(f"{data.path}: {what} id {token_id} is outside the vocabulary "
                              f"of {len(data.tokens)} tokens")
    return data.tokens[token_id]


def _vocab(data: GgufTokenizerData) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(data.tokens)}
    if len(vocab) != len(data.tokens):
        dupes = sorted(t for t, n in collections.Counter(data.tokens).items() if n > 1)
        raise CheckpointError(f"{data.path}: the vocabulary spells {len(dupes)} token(s) more than "
                              f"once, e.g. {dupes[:5]}")
    return vocab


def _merges(data: GgufTokenizerData) -> list[tuple[str, str]]:
    if not data.merges:
        raise CheckpointError(f"{data.path}: a BPE tokenizer needs merges (tokenizer.ggml.merges)")
    merges = []
    for i, merge in enumerate(data.merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{data.path}: merge {i} ({merge!r}) is not two tokens "
                                  f"separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def build_backend(data: GgufTokenizerData) -> Any:
    """The ``tokenizers.Tokenizer`` the metadata describes (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    rule = pre_tokenizer_rule(data)
    if data.token_types is not None and len(data.token_types) != len(data.tokens):
        raise CheckpointError(f"{data.path}: {len(data.token_types)} token types for "
                              f"{len(data.tokens)} tokens")
    try:
        bpe = models.BPE(vocab=_vocab(data), merges=_merges(data), dropout=None,
                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                         byte_fallback=False, ignore_merges=rule.ignore_merges)
    except Exception as e:  # tokenizers rejects merges of tokens that are not in the vocabulary
        raise CheckpointError(f"{data.path}: the vocabulary and merges do not form a BPE model: "
                              f"{e}") from e
    backend = Tokenizer(bpe)
    steps = [pre_tokenizers.Digits(individual_digits=True)] if rule.digits else []
    if rule.split is not None:
        steps.append(pre_tokenizers.Split(Regex(rule.split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=rule.split is None))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()

    types = data.token_types or ()
    backend.add_special_tokens([AddedToken(data.tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == _CONTROL])
    backend.add_tokens([AddedToken(data.tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == _USER_DEFINED])
    if backend.get_vocab_size(with_added_tokens=True) != len(data.tokens):
        raise CheckpointError(f"{data.path}: its added tokens changed the vocabulary size")

    bos = _special_token(data, data.bos_id, "BOS")
    eos = _special_token(data, data.eos_id, "EOS")
    add_bos, add_eos = _add_flags(data, rule)
    single, pair, specials = ["$A:0"], ["$B:1"], []
    if add_bos:
        single.insert(0, f"{bos}:0")
        pair.insert(0, f"{bos}:1")
        specials.append((bos, data.bos_id))
    if add_eos:
        single.append(f"{eos}:0")
        pair.append(f"{eos}:1")
        specials.append((eos, data.eos_id))
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(single + pair), special_tokens=specials)
    return backend


def _add_flags(data: GgufTokenizerData, rule: PreTokenizerRule) -> tuple[bool, bool]:
    add_bos = rule.add_bos if data.add_bos is None else data.add_bos
    add_eos = bool(data.add_eos)
    if add_bos and data.bos_id is None:
        raise CheckpointError(f"{data.path}: BOS is to be added but the file names no BOS token")
    if add_eos and data.eos_id is None:
        raise CheckpointError(f"{data.path}: EOS is to be added but the file names no EOS token")
    return add_bos, add_eos


def build_tokenizer(data: GgufTokenizerData) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` for the metadata: the backend of
    ``build_backend`` with the file's BOS/EOS/UNK/PAD tokens, add-BOS/EOS flags and chat
    template."""
    from transformers import PreTrainedTokenizerFast

    backend = build_backend(data)
    add_bos, add_eos = _add_flags(data, pre_tokenizer_rule(data))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_special_token(data, data.bos_id, "BOS"),
        eos_token=_special_token(data, data.eos_id, "EOS"),
        unk_token=_special_token(data, data.unk_id, "UNK"),
        pad_token=_special_token(data, data.pad_id, "PAD"),
        chat_template=data.chat_template,
        add_bos_token=add_bos, add_eos_token=add_eos,
        clean_up_tokenization_spaces=False)


def tokenizer_from_gguf(path: str | os.PathLike) -> Any:
    """Read and build, without any cache."""
    return build_tokenizer(read_gguf_tokenizer(path))


# --------------------------------------------------------------------------------------------
# The cache of built tokenizers


def save_tokenizer_dir(tokenizer: Any, directory: str) -> None:
    """Write ``tokenizer`` as a HF tokenizer directory (``tokenizer.json``,
    ``tokenizer_config.json`` with the special tokens and chat template)."""
    tokenizer.save_pretrained(directory)


def load_tokenizer_dir(directory: str) -> PlainTokenizer:
    """A directory written by ``save_tokenizer_dir``, read without importing transformers."""
    return PlainTokenizer(directory)


def default_cache_root() -> str:
    """``<cache root>/tokenizer`` (``arctic_jax.cache_root``)."""
    return cache_dir(CACHE_SUBDIR)


def cache_key(gguf_path: str | os.PathLike) -> str:
    """Hex key of the file (size, modification time, SHA-256 of its first
    ``HEADER_HASH_BYTES``) and of the versions of this format, tokenizers and transformers."""
    import tokenizers

    st = os.stat(gguf_path)
    with open(gguf_path, "rb") as f:
        head = hashlib.sha256(f.read(HEADER_HASH_BYTES)).hexdigest()
    blob = json.dumps([FORMAT_VERSION, tokenizers.__version__, importlib.metadata.version(
        "transformers"),
                       st.st_size, st.st_mtime_ns, head])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _complete(entry: str) -> bool:
    """Whether ``entry`` has its marker and every file the marker lists."""
    try:
        with open(os.path.join(entry, ENTRY_FILE)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(os.path.isfile(os.path.join(entry, name)) for name in files)


def gguf_tokenizer_dir(gguf_path: str | os.PathLike, cache_root: str | os.PathLike | None = None
                       ) -> str:
    """The cached HF tokenizer directory of ``gguf_path``, built on the first call.

    ``cache_root``: where entries live (default ``default_cache_root()``). An entry is written
    to a temporary sibling, with ``ENTRY_FILE`` (the files it holds) last, and renamed into
    place; if another process got there first, its entry is kept. An incomplete entry is
    reported with a warning and rebuilt. OSError if the cache cannot be written.
    """
    gguf_path = os.fspath(gguf_path)
    root = os.fspath(cache_root) if cache_root is not None else default_cache_root()
    entry = os.path.join(root, cache_key(gguf_path))
    if _complete(entry):
        return entry
    if os.path.exists(entry):
        warnings.warn(f"tokenizer cache entry {entry} is incomplete; rebuilding it", stacklevel=2)
        shutil.rmtree(entry, ignore_errors=True)
    tokenizer = tokenizer_from_gguf(gguf_path)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{os.path.basename(entry)}-{uuid.uuid4().hex[:8]}")
    try:
        save_tokenizer_dir(tokenizer, tmp)
        marker = {"format_version": FORMAT_VERSION, "source": os.path.abspath(gguf_path),
                  "files": sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, ENTRY_FILE), "w") as f:
            json.dump(marker, f, indent=1)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _complete(entry):
                raise  # not a lost race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenizer of %s cached in %s", gguf_path, entry)
    return entry


def load_gguf_tokenizer(gguf_path: str | os.PathLike, *,
                        cache_root: str | os.PathLike | None = None, use_cache: bool = True) -> Any:
    """The ``PreTrainedTokenizerFast`` of a GGUF file, through the cache of
    ``gguf_tokenizer_dir`` when ``use_cache``. A cache that cannot be written or read back is
    reported with a warning and the tokenizer built from the file."""
    if not use_cache:
        return tokenizer_from_gguf(gguf_path)
    try:
        entry = gguf_tokenizer_dir(gguf_path, cache_root)
    except OSError as e:
        warnings.warn(f"cannot cache the tokenizer of {gguf_path} ({e!r}); building it each time",
                      stacklevel=2)
        return tokenizer_from_gguf(gguf_path)
    try:
        return load_tokenizer_dir(entry)
    except Exception as e:  # any failure to read back means the entry is unusable
        warnings.warn(f"tokenizer cache entry {entry} is unusable ({e!r}); rebuilding it",
                      stacklevel=2)
        shutil.rmtree(entry, ignore_errors=True)
        return load_tokenizer_dir(gguf_tokenizer_dir(gguf_path, cache_root))
