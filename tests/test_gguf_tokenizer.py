"""checkpoints.gguf_tokenizer: a GGUF file's tokenizer without PyTorch, checked token for token
against transformers' own GGUF tokenizer (which needs torch; the test environment has it)."""
import copy
import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
import textwrap
import unicodedata

import pytest

from checkpoints import gguf_tokenizer as gt
from checkpoints.errors import CheckpointError
from checkpoints.loader import DEFAULT_GGUF, default_model_path
from checkpoints.plain_tokenizer import PlainTokenizer

N_STRINGS = 4000
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>",
            "<jupyter_code>", "<empty_output>"]


# --------------------------------------------------------------------------------------------
# A varied corpus from a seeded RNG

_WORDS = ["the", "The", "quick", "brown", "fox", "naïve", "café", "Straße", "über", "hello", "world",
          "tokenizer", "JAX", "Pallas", "SmolLM", "inference", "don't", "I'm", "we'll", "they've",
          "it's", "YOU'RE", "He'D", "CAN'T", "o'clock", "rock'n'roll", "e-mail", "x86_64", "U.S.A."]
_SNIPPETS = [
    "def {n}(x, y={d}):\n    return x * y + {d}\n",
    "for (int i = 0; i < {d}; ++i) {{ sum += a[i]; }}",
    "\tif {n} != None:\n\t\tprint(f\"{{{n}!r}}\")\n",
    "const {n} = async () => {{ await fetch('/api/v1/{n}?id={d}'); }};",
    "SELECT {n}, COUNT(*) FROM t WHERE id >= {d} GROUP BY {n};",
    "<div class=\"{n}\">{d}&nbsp;&lt;/div&gt;</div>",
    "#include <stdio.h>\nint main() {{ printf(\"%d\\n\", {d}); }}",
    "{n}: [{d}, {d}.5e-3, -0x{d}]  # comment",
    "    \n\n  {n}  =  {d}\r\n",
    "```python\n{n} = [i**2 for i in range({d})]\n```",
]
_RANGES = {  # (first, last) code points
    "latin": (0x00C0, 0x024F), "greek": (0x0391, 0x03C9), "cyrillic": (0x0410, 0x044F),
    "arabic": (0x0621, 0x064A), "hebrew": (0x05D0, 0x05EA), "devanagari": (0x0905, 0x0939),
    "cjk": (0x4E00, 0x9FFF), "hiragana": (0x3041, 0x3096), "hangul": (0xAC00, 0xD7A3),
    "emoji": (0x1F300, 0x1FAFF), "math": (0x2200, 0x22FF), "box": (0x2500, 0x257F),
}
_COMBINING = [chr(c) for c in range(0x0300, 0x0370)]
_MARKS = ["\u200d", "\u200f", "\u200e", "\ufe0f", "\u202e", "\u2066", "\u00ad", "\u200b"]
_NUMERIC = ["²", "³", "½", "¼", "Ⅻ", "٣", "۷", "१", "１２３", "①", "𝟙", "⁴²", "௰"]
_SPACES = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "\u00a0", "\u3000", "\u2028", "\u2003", "\x0b", "\f"]


def _number(rng):
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 40)))
    if kind == 1:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 9)}f}"
    if kind == 2:
        return f"{rng.randrange(10 ** 9):,}"
    if kind == 3:
        return f"{rng.random():.3e}"
    if kind == 4:
        return rng.choice(_NUMERIC) + str(rng.randrange(100))
    return "0" * rng.randrange(1, 6) + str(rng.randrange(1000))


def _script(rng, name=None):
    first, last = _RANGES[name or rng.choice(list(_RANGES))]
    return "".join(chr(rng.randint(first, last)) for _ in range(rng.randrange(1, 12)))


def _random_chars(rng):
    out = []
    for _ in range(rng.randrange(1, 40)):
        c = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF),
                        rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= c <= 0xDFFF:
            out.append(chr(c))
    return "".join(out)


def _piece(rng):
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice(_SNIPPETS).format(n=rng.choice(["foo", "x_1", "Ülker", "データ"]),
                                            d=rng.randrange(10 ** rng.randrange(1, 8)))
    if kind == 1:
        return _script(rng)
    if kind == 2:
        base = _script(rng, rng.choice(["latin", "greek", "cyrillic"]))
        return "".join(c + "".join(rng.choice(_COMBINING) for _ in range(rng.randrange(3)))
                       for c in base)
    if kind == 3:
        return rng.choice(_MARKS).join([_script(rng, "emoji"), _script(rng, "arabic"),
                                        _script(rng, "hebrew")])
    if kind == 4:
        return _number(rng)
    if kind == 5:
        return "".join(rng.choice(_SPACES) for _ in range(rng.randrange(1, 8)))
    if kind == 6:
        return rng.choice(SPECIALS) if rng.random() < 0.8 else rng.choice(SPECIALS)[:-1]
    if kind == 7:
        return _random_chars(rng)
    if kind == 8:
        return "".join(chr(rng.randint(0x20, 0x7E)) for _ in range(rng.randrange(1, 30)))
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 10)))


def make_corpus(n, seed):
    rng = random.Random(seed)
    corpus = ["", " ", "\n", "a", "Hello world! 123", "  multiple   spaces  ", "<|im_start|>user\nhi"
              "<|im_end|>\n<|im_start|>assistant\n", "1234567890" * 5, "\t\t\tindent", "x²+y²=z²"]
    while len(corpus) < n:
        joiner = rng.choice(["", " ", "\n", rng.choice(_SPACES)])
        corpus.append(joiner.join(_piece(rng) for _ in range(rng.randrange(1, 6))))
    return corpus


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in haiku."},
     {"role": "user", "content": "Describe JAX."},
     {"role": "assistant", "content": "Arrays flow through jit\nXLA fuses the kernels"},
     {"role": "user", "content": "Now in 日本語 please 🙂"}],
    [{"role": "user", "content": "  leading spaces\tand <|im_end|> inside\n\n"}],
]


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(N_STRINGS, seed=1234)


@pytest.fixture(scope="module")
def transformers_gguf(gguf_path):
    """transformers' own tokenizer of the embedded GGUF (it needs torch)."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=DEFAULT_GGUF)


@pytest.fixture(scope="module")
def reference(transformers_gguf):
    """transformers' GGUF tokenizer with SmolLM2's published pre-tokenizer.

    SmolLM2's tokenizer.json pre-tokenizes with Sequence[Digits(individual_digits=True),
    ByteLevel(add_prefix_space=False, use_regex=True)] (llama.cpp's "smollm": \\p{N}, then
    GPT-2's regex). transformers' GGUF loader has no entry for "smollm" and keeps plain ByteLevel,
    which differs where digits follow whitespace runs (test_transformers_gguf_loses_digit_split);
    everything else (vocabulary, merges, added tokens, decoder, template) is transformers'.
    """
    from tokenizers import pre_tokenizers

    ref = copy.deepcopy(transformers_gguf)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ref


@pytest.fixture(scope="module")
def ours(gguf_path):
    return gt.tokenizer_from_gguf(gguf_path)


@pytest.fixture(scope="module")
def plain(gguf_path, tmp_path_factory):
    """The embedded tokenizer as later starts read it: from its cache entry, without
    transformers (``checkpoints.plain_tokenizer``)."""
    tok = gt.load_gguf_tokenizer(gguf_path, cache_root=tmp_path_factory.mktemp("tokcache"))
    assert isinstance(tok, PlainTokenizer)
    return tok


@pytest.fixture(scope="module")
def smol_data(gguf_path):
    return gt.read_gguf_tokenizer(gguf_path)


def write_gguf(path, data, *, model="gpt2", pre=None, add_bos=None, tokens=None, types=None,
               merges=None):
    """A tokenizer-only GGUF file (no tensors) with ``data``'s vocabulary unless overridden."""
    import gguf

    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens if tokens is not None else data.tokens))
    w.add_token_types(list(types if types is not None else data.token_types))
    w.add_token_merges(list(merges if merges is not None else data.merges))
    w.add_bos_token_id(data.bos_id)
    w.add_eos_token_id(data.eos_id)
    w.add_pad_token_id(data.pad_id)
    w.add_unk_token_id(data.unk_id)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(data.chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def assert_same_tokenizer(ours, ref, corpus):
    """Encodings (with and without special tokens) and decodings (keeping and skipping special
    tokens) agree string for string; decoding our encoding gives the text back."""
    for special in (True, False):
        mine = ours(corpus, add_special_tokens=special)["input_ids"]
        theirs = ref(corpus, add_special_tokens=special)["input_ids"]
        bad = [t for t, a, b in zip(corpus, mine, theirs, strict=True) if a != b]
        assert not bad, f"{len(bad)} encodings differ (special={special}), e.g. {bad[:3]!r}"
    ids = ours(corpus, add_special_tokens=False)["input_ids"]
    for skip in (False, True):
        mine = ours.batch_decode(ids, skip_special_tokens=skip)
        assert mine == ref.batch_decode(ids, skip_special_tokens=skip)
    # Lossless wherever the vocabulary has every byte of the text (SmolLM2's lacks a few, which
    # BPE then drops, as the model's own tokenizer does).
    vocab = ours.get_vocab()
    pre = ours.backend_tokenizer.pre_tokenizer
    covered = [i for i, t in enumerate(corpus)
               if all(c in vocab for piece, _ in pre.pre_tokenize_str(t) for c in piece)]
    assert len(covered) > len(corpus) // 2
    decoded = ours.batch_decode([ids[i] for i in covered])
    assert decoded == [corpus[i] for i in covered]


# --------------------------------------------------------------------------------------------
# The embedded SmolLM2 file


def test_reads_the_embedded_tokenizer(smol_data):
    assert (smol_data.model, smol_data.pre) == ("gpt2", "smollm")
    assert len(smol_data.tokens) == 49152 and len(smol_data.merges) == 48900
    assert len(smol_data.token_types) == 49152
    assert (smol_data.bos_id, smol_data.eos_id, smol_data.unk_id, smol_data.pad_id) == (1, 2, 0, 2)
    assert smol_data.add_bos is False and "<|im_start|>" in smol_data.chat_template


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_metadata_reader_matches_gguf_reader(tmp_path, endian):
    """The fast key/value walk reads what gguf.GGUFReader reads, for every value type, skipping
    the keys not asked for."""
    import gguf
    import numpy as np

    rng = random.Random(3)
    values = {
        "t.u8": (gguf.GGUFValueType.UINT8, 200), "t.i8": (gguf.GGUFValueType.INT8, -100),
        "t.u16": (gguf.GGUFValueType.UINT16, 60000), "t.i16": (gguf.GGUFValueType.INT16, -30000),
        "t.u32": (gguf.GGUFValueType.UINT32, 4_000_000_000),
        "t.i32": (gguf.GGUFValueType.INT32, -2_000_000_000),
        "t.f32": (gguf.GGUFValueType.FLOAT32, 0.5), "t.bool": (gguf.GGUFValueType.BOOL, True),
        "t.u64": (gguf.GGUFValueType.UINT64, 2 ** 63 + 5), "t.i64": (gguf.GGUFValueType.INT64, -2 ** 40),
        "t.f64": (gguf.GGUFValueType.FLOAT64, 1 / 3), "t.str": (gguf.GGUFValueType.STRING, "día 日"),
        "t.ints": (gguf.GGUFValueType.ARRAY, [rng.randrange(-2 ** 31, 2 ** 31) for _ in range(50)]),
        "t.strs": (gguf.GGUFValueType.ARRAY, [_random_chars(rng) for _ in range(50)]),
        "t.blank": (gguf.GGUFValueType.ARRAY, ["", "a"]),
    }
    path = str(tmp_path / f"m-{endian}.gguf")
    w = gguf.GGUFWriter(path, "llama", endianess=getattr(gguf.GGUFEndian, endian))
    for key, (vtype, value) in values.items():
        sub = gguf.GGUFValueType.INT32 if key == "t.ints" else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_tensor("w", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    wanted = {k for i, k in enumerate(values) if i % 3 != 1} | {"not.there"}
    got = gt.read_metadata(path, wanted)
    assert set(got) == wanted - {"not.there"}
    for key in got:
        expected = reader.fields[key].contents()
        expected = tuple(expected) if isinstance(expected, list) else expected
        assert got[key] == (pytest.approx(expected) if "f32" in key else expected), key


def test_encode_decode_match_transformers(ours, reference, corpus):
    assert_same_tokenizer(ours, reference, corpus)


def _has_numeric(text):
    return any(unicodedata.category(c)[0] == "N" or c.isnumeric() for c in text)


def test_transformers_gguf_loses_digit_split(ours, transformers_gguf, corpus):
    """Unmodified transformers agrees on every string without numeric characters; with them it
    can differ, e.g. "a  =  75": SmolLM2 (and llama.cpp) split "  " from the digits ("ĠĠ", "7",
    "5"), transformers' GGUF tokenizer cuts " 75" first ("Ġ", "Ġ", "7", "5")."""
    plain = [t for t in corpus if not _has_numeric(t)]
    assert len(plain) > N_STRINGS // 3
    assert_same_tokenizer(ours, transformers_gguf, plain)
    mine = ours.convert_ids_to_tokens(ours("a  =  75", add_special_tokens=False)["input_ids"])
    theirs = transformers_gguf.convert_ids_to_tokens(
        transformers_gguf("a  =  75", add_special_tokens=False)["input_ids"])
    assert mine == ["a", "Ġ", "Ġ=", "ĠĠ", "7", "5"]
    assert theirs == ["a", "Ġ", "Ġ=", "Ġ", "Ġ", "7", "5"]


def test_random_ids_decode_like_transformers(ours, reference):
    rng = random.Random(7)
    vocab = len(reference)
    seqs = [[rng.randrange(vocab) if rng.random() < 0.9 else rng.randrange(20)
             for _ in range(rng.randrange(1, 30))] for _ in range(1000)]
    for skip in (False, True):
        assert (ours.batch_decode(seqs, skip_special_tokens=skip)
                == reference.batch_decode(seqs, skip_special_tokens=skip))


def test_vocabulary_and_special_tokens_match_transformers(ours, reference):
    assert ours.get_vocab() == reference.get_vocab() and len(ours) == len(reference)
    assert (ours.convert_ids_to_tokens(list(range(len(ours))))
            == reference.convert_ids_to_tokens(list(range(len(reference)))))
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id",
                 "eos_token_id", "unk_token_id", "pad_token_id", "all_special_ids"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in reference.added_tokens_decoder.items()}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_matches_transformers(ours, plain, reference, conversation):
    for prompt in (True, False):
        kw = {"add_generation_prompt": prompt}
        text = reference.apply_chat_template(conversation, tokenize=False, **kw)
        assert text.startswith("<|im_start|>")
        theirs = list(reference.apply_chat_template(conversation, tokenize=True, **kw)["input_ids"])
        for tok in (ours, plain):
            assert tok.apply_chat_template(conversation, tokenize=False, **kw) == text
            mine = tok.apply_chat_template(conversation, tokenize=True, **kw)
            assert list(mine["input_ids"]) == theirs


def test_plain_tokenizer_matches_transformers(plain, reference, corpus):
    """The cached tokenizer read without transformers encodes, decodes and names its special
    tokens as the transformers tokenizer does."""
    assert_same_tokenizer(plain, reference, corpus)
    assert plain.get_vocab() == reference.get_vocab() and len(plain) == len(reference)
    for attr in ("bos_token", "eos_token", "bos_token_id", "eos_token_id", "unk_token_id",
                 "pad_token_id"):
        assert getattr(plain, attr) == getattr(reference, attr), attr
    ids = list(range(0, len(reference), 7))
    assert plain.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    text = "Hello, world"
    assert plain.encode(text) == reference.encode(text)
    assert plain.decode(plain.encode(text), skip_special_tokens=True) == text


def test_plain_tokenizer_errors_name_the_problem(tmp_path, plain):
    with pytest.raises(CheckpointError, match="not a readable tokenizer directory"):
        PlainTokenizer(tmp_path)
    copy = tmp_path / "copy"
    plain.save_pretrained(copy)
    os.remove(copy / "chat_template.jinja")
    no_template = PlainTokenizer(copy)
    if no_template.chat_template is None:
        with pytest.raises(ValueError, match="no chat template"):
            no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    else:   # an older transformers kept the template in tokenizer_config.json
        assert no_template.chat_template == plain.chat_template


# --------------------------------------------------------------------------------------------
# Other pre-tokenizers and unsupported files (tokenizer-only GGUFs with SmolLM2's vocabulary)


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("gpt-2", None)])
def test_other_pre_tokenizers_match_transformers(tmp_path, smol_data, corpus, pre, add_bos):
    """llama.cpp's Llama-3 and GPT-2 splits, checked the same way on SmolLM2's vocabulary."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "t.gguf", smol_data, pre=pre, add_bos=add_bos)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    ours = gt.tokenizer_from_gguf(path)
    assert ours.bos_token_id == ref.bos_token_id and ours.add_bos_token == bool(add_bos)
    assert (ours("hi")["input_ids"][0] == 1) == bool(add_bos)
    assert_same_tokenizer(ours, ref, corpus[:1500])


def test_llama3_takes_whole_vocabulary_words(tmp_path, smol_data):
    """llama.cpp's Llama-3 pre-tokenizer ignores merges for a piece that is a vocabulary entry:
    "abc" is one token there, while BPE's merges (a+b first, no ab+c) give "ab", "c"."""
    tokens = ("<|endoftext|>", "<s>", "</s>", "a", "b", "c", "ab", "bc", "abc")
    data = dataclasses.replace(smol_data, tokens=tokens, token_types=(3, 3, 3) + (1,) * 6,
                               merges=("a b", "b c"))
    for pre, expected in (("llama-bpe", ["abc"]), ("gpt-2", ["ab", "c"])):
        tok = gt.tokenizer_from_gguf(write_gguf(tmp_path / f"{pre}.gguf", data, pre=pre))
        ids = tok("abc", add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == expected, pre
        assert tok("abc")["input_ids"][:1] == ([1] if pre == "llama-bpe" else ids[:1])


def test_smollm_splits_digits_one_by_one(ours):
    """llama.cpp's 'smollm' pre-tokenizer isolates every digit (\\p{N}) before the GPT-2 split."""
    ids = ours("x 2024 ٣٤", add_special_tokens=False)["input_ids"]
    pieces = ours.convert_ids_to_tokens(ids)
    assert pieces[:6] == ["x", "Ġ", "2", "0", "2", "4"]


def test_unknown_pre_tokenizer_is_named(tmp_path, smol_data):
    path = write_gguf(tmp_path / "u.gguf", smol_data, pre="unknown-xyz")
    with pytest.raises(CheckpointError, match=r"pre-tokenizer type 'unknown-xyz' is not supported"
                                              r".*'smollm'"):
        gt.tokenizer_from_gguf(path)


def test_missing_pre_tokenizer_is_refused(tmp_path, smol_data):
    path = write_gguf(tmp_path / "n.gguf", smol_data)
    with pytest.raises(CheckpointError, match=r"no pre-tokenizer.*'default'"):
        gt.tokenizer_from_gguf(path)


def test_sentencepiece_model_is_named(tmp_path, smol_data):
    path = write_gguf(tmp_path / "l.gguf", smol_data, model="llama", pre="default")
    with pytest.raises(CheckpointError, match=r"tokenizer model 'llama' is not supported.*'gpt2'"):
        gt.tokenizer_from_gguf(path)


def test_bad_files_are_refused(tmp_path, smol_data):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gt.read_gguf_tokenizer(not_gguf)
    good = write_gguf(tmp_path / "g.gguf", smol_data, pre="smollm")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(good, "rb").read()[:5000])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        gt.read_gguf_tokenizer(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        gt.read_gguf_tokenizer(tmp_path / "missing.gguf")
    dup = write_gguf(tmp_path / "d.gguf", smol_data, pre="smollm",
                     tokens=smol_data.tokens[:-1] + (smol_data.tokens[100],))
    with pytest.raises(CheckpointError, match="more than once"):
        gt.tokenizer_from_gguf(dup)
    bad_merge = write_gguf(tmp_path / "m.gguf", smol_data, pre="smollm",
                           merges=smol_data.merges[:10] + ("abc",))
    with pytest.raises(CheckpointError, match="merge 10"):
        gt.tokenizer_from_gguf(bad_merge)


def test_user_defined_tokens_stay_whole(tmp_path, smol_data):
    """A USER_DEFINED token is matched whole but is not special (kept when skipping specials)."""
    tokens = smol_data.tokens + ("<think>",)
    types = smol_data.token_types + (4,)
    path = write_gguf(tmp_path / "u.gguf", smol_data, pre="smollm", tokens=tokens, types=types)
    tok = gt.tokenizer_from_gguf(path)
    ids = tok("a<think>b", add_special_tokens=False)["input_ids"]
    assert ids[1] == len(tokens) - 1 and len(tok) == len(tokens)
    assert not tok.added_tokens_decoder[len(tokens) - 1].special
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>b"


# --------------------------------------------------------------------------------------------
# The cache directory


def test_cache_round_trip_and_no_second_parse(tmp_path, gguf_path, ours, corpus, monkeypatch):
    entry = gt.gguf_tokenizer_dir(gguf_path, tmp_path)
    assert os.path.dirname(entry) == str(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", gt.ENTRY_FILE} <= set(os.listdir(entry))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]

    def fail(*a, **k):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(gt, "read_gguf_tokenizer", fail)
    monkeypatch.setattr(gt, "tokenizer_from_gguf", fail)
    assert gt.gguf_tokenizer_dir(gguf_path, tmp_path) == entry
    cached = gt.load_gguf_tokenizer(gguf_path, cache_root=tmp_path)
    assert cached.chat_template == ours.chat_template
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (1, 2, 2)
    assert_same_tokenizer(cached, ours, corpus)


def test_cache_key_follows_the_file(tmp_path, smol_data):
    path = write_gguf(tmp_path / "k.gguf", smol_data, pre="smollm")
    key = gt.cache_key(path)
    assert gt.cache_key(path) == key
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert gt.cache_key(path) != key


def test_unusable_cache_entry_is_rebuilt(tmp_path, smol_data):
    path = write_gguf(tmp_path / "c.gguf", smol_data, pre="smollm")
    root = tmp_path / "cache"
    entry = gt.gguf_tokenizer_dir(path, root)
    with open(os.path.join(entry, "tokenizer.json"), "w") as f:
        f.write("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        tok = gt.load_gguf_tokenizer(path, cache_root=root)
    assert tok("Hello world")["input_ids"] == [19556, 905]
    json.load(open(os.path.join(entry, "tokenizer.json")))  # rewritten

    os.remove(os.path.join(entry, "tokenizer_config.json"))  # would lose the special tokens
    with pytest.warns(UserWarning, match="incomplete"):
        tok = gt.load_gguf_tokenizer(path, cache_root=root)
    assert tok.eos_token_id == 2 and tok.chat_template == smol_data.chat_template
    assert os.path.isfile(os.path.join(entry, "tokenizer_config.json"))


def test_unwritable_cache_still_gives_a_tokenizer(tmp_path, smol_data):
    path = write_gguf(tmp_path / "w.gguf", smol_data, pre="smollm")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="cannot cache"):
        tok = gt.load_gguf_tokenizer(path, cache_root=blocker / "sub")
    assert tok("Hello world")["input_ids"] == [19556, 905]


def test_load_tokenizer_needs_no_torch(tmp_path, gguf_path):
    """arctic_jax.tokenizer.load_tokenizer of the GGUF, cold (building the cache) and warm (from
    the cache), never imports torch."""
    code = textwrap.dedent(f"""
        import os, sys
        from arctic_jax.tokenizer import encode_chat
        from checkpoints.loader import load_tokenizer
        folder, name = {os.path.dirname(gguf_path)!r}, {os.path.basename(gguf_path)!r}
        for _ in range(2):
            tok = load_tokenizer(folder, name)
            assert tok("Hello world")["input_ids"] == [19556, 905]
            assert encode_chat(tok, [{{"role": "user", "content": "hi"}}])[0] == 1
        entries = os.listdir(os.path.join(os.environ["ARCTIC_JAX_CACHE"], "tokenizer"))
        assert len(entries) == 1, entries
        print("torch imported:", "torch" in sys.modules)
        print("transformers imported:", "transformers" in sys.modules)
    """)
    env = dict(os.environ, ARCTIC_JAX_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch imported: False" in out.stdout
    assert "transformers imported: True" in out.stdout   # the first load builds with it


def test_warm_load_tokenizer_imports_no_transformers(tmp_path, gguf_path):
    """Once the tokenizer is cached, a start reads it without importing transformers (about a
    second of every start)."""
    code = textwrap.dedent(f"""
        import sys
        from checkpoints.loader import load_tokenizer
        tok = load_tokenizer({os.path.dirname(gguf_path)!r}, {os.path.basename(gguf_path)!r})
        print(type(tok).__name__, "transformers" in sys.modules)
    """)
    env = dict(os.environ, ARCTIC_JAX_CACHE=str(tmp_path))
    run = functools.partial(subprocess.run, [sys.executable, "-c", code], env=env,
                            capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    cold, warm = run(), run()
    assert cold.returncode == 0 and warm.returncode == 0, (cold.stderr + warm.stderr)[-3000:]
    assert warm.stdout.split() == ["PlainTokenizer", "False"]
