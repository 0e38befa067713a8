"""Embedding benchmark workloads: the inputs, how they are grouped into requests, and the
padding a packed batch saves against a padded one.

An input is a token-id sequence or a text. Synthetic token ids are uniform over the
vocabulary, with lengths fixed or uniform over a range. Texts are random English words whose
token count under the model's tokenizer (special tokens and any default prompt included) is
exactly the length drawn, so a text workload computes the same tokens as the token-id one and
its tokenization cost is real. A request carries ``batch_size`` consecutive inputs (the
client-side batch of an OpenAI ``input`` list).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from arctic_jax.bench.workload import LengthRange

# Common English words, some of them several word pieces long (tokenization does real work).
WORDS = tuple("""
the of and to in is was for on are with as his they be at one have this from or had by word
but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where
after back little only round man year came show every good me give our under name very through
just form sentence great think say help low line differ turn cause much mean before move right
boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story
saw far sea draw left late run while press close night real life few north open seem together
next white children begin got walk example ease paper group always music those both mark often
letter until mile river car feet care second book carry took science eat room friend began idea
fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose
leave song measure door product black short numeral class wind question happen complete ship
area half rock order fire south problem piece told knew pass since top whole king space heard
best hour better true during hundred five remember step early hold west ground interest reach
fast verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern pull cold
notice voice unit power town fine certain fly fall lead cry dark machine note wait plan figure
star box noun field rest correct able pound done beauty drive stood contain front teach week
final gave green quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide
surface deep moon island foot system busy test record boat common gold possible plane stead
dry wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes
distant fill east paint language among photosynthesis archipelago thermodynamics unbelievably
kaleidoscope metamorphosis bureaucracy onomatopoeia quintessential serendipity juxtaposition
""".split())


@dataclasses.dataclass(frozen=True)
class EmbedWorkload:
    """The inputs of one benchmark run, in order.

    ``inputs``: token-id tuples, or texts (``is_text``); ``lengths``: each input's token count
    as the model sees it (for texts: measured with the model's tokenizer, special tokens and
    default prompt included); ``batch_size``: inputs per request; ``description``: one line.
    """

    inputs: tuple[tuple[int, ...] | str, ...]
    lengths: tuple[int, ...]
    batch_size: int
    length_range: LengthRange
    description: str

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("a workload needs at least one input")
        if len(self.lengths) != len(self.inputs):
            raise ValueError(f"{len(self.lengths)} lengths for {len(self.inputs)} inputs")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def is_text(self) -> bool:
        return isinstance(self.inputs[0], str)

    @property
    def label(self) -> str:
        """A short name: the length (range) and the input kind."""
        return f"{self.length_range} tokens, {'text' if self.is_text else 'token ids'}"

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))

    def requests(self) -> list[tuple[int, int]]:
        """(first, end) input ranges of the requests: ``batch_size`` consecutive inputs each,
        the last request holding the rest."""
        n, b = self.num_inputs, self.batch_size
        return [(i, min(i + b, n)) for i in range(0, n, b)]


def token_id_inputs(num_inputs: int, lengths: LengthRange, vocab_size: int,
                    seed: int) -> list[tuple[int, ...]]:
    """``num_inputs`` token-id sequences, ids uniform in [0, vocab_size), lengths uniform over
    ``lengths``."""
    if num_inputs < 1:
        raise ValueError(f"the number of inputs must be >= 1, got {num_inputs}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    sizes = lengths.draw(rng, num_inputs)
    return [tuple(int(t) for t in rng.integers(0, vocab_size, size=int(n))) for n in sizes]


class TextMaker:
    """Random English texts of exact token counts under an embedding tokenizer.

    ``encode``: texts -> token-id lists, as the model will tokenize them (special tokens and
    any default prompt included; ``EmbeddingTokenizer.encode``). Each word's token count is
    measured alone; the words of a text are separated by spaces, so (for tokenizers that split
    on whitespace first, such as BERT's WordPiece) a text's count is the words' counts plus a
    fixed overhead. ``make`` checks every text against ``encode`` and fails if one is off.
    """

    def __init__(self, encode: Callable[[list[str]], list[list[int]]],
                 count_words: Callable[[list[str]], list[int]]):
        self.encode = encode
        counts = dict(zip(WORDS, count_words(list(WORDS)), strict=True))
        self.words = [w for w in WORDS if counts[w] >= 1]
        self.counts = np.array([counts[w] for w in self.words], np.int64)
        self.single = [w for w in self.words if counts[w] == 1]
        if len(self.single) < 10:
            raise ValueError("the tokenizer splits almost every common English word into pieces; "
                             "it cannot make texts of exact lengths")
        probe = self.single[0]
        self.overhead = len(encode([probe])[0]) - 1
        if self.overhead < 0:
            raise ValueError("the tokenizer drops words; it cannot make texts of exact lengths")

    @property
    def min_length(self) -> int:
        """The shortest text in tokens: the overhead plus one word."""
        return self.overhead + 1

    def text(self, rng: np.random.Generator, length: int) -> str:
        """A text of ``length`` tokens (as ``encode`` counts them)."""
        budget = length - self.overhead
        if budget < 1:
            raise ValueError(f"a text of {length} tokens leaves no room for a word besides the "
                             f"{self.overhead} special/prompt tokens (at least {self.min_length})")
        words: list[str] = []
        picks = rng.integers(0, len(self.words), size=budget)  # at most one word per token
        for k in picks:
            if budget == 0:
                break
            c = int(self.counts[k])
            if c > budget:
                words.append(self.single[int(rng.integers(0, len(self.single)))])
                budget -= 1
            else:
                words.append(self.words[k])
                budget -= c
        while budget > 0:  # every pick was a multi-piece word that no longer fit
            words.append(self.single[int(rng.integers(0, len(self.single)))])
            budget -= 1
        return " ".join(words)

    def make(self, lengths: Sequence[int], seed: int) -> list[str]:
        """Texts of the given token counts; ValueError if the tokenizer disagrees with one."""
        rng = np.random.default_rng(seed)
        texts = [self.text(rng, int(n)) for n in lengths]
        measured = [len(ids) for ids in self.encode(texts)]
        for i, (want, got) in enumerate(zip(lengths, measured, strict=True)):
            if want != got:
                raise ValueError(f"text input {i} tokenizes to {got} tokens, not the {want} "
                                 f"wanted: this tokenizer does not count words independently")
        return texts


def text_maker(tokenizer: Any) -> TextMaker:
    """A ``TextMaker`` for an ``EmbeddingTokenizer`` (its batch encode, default prompt
    included)."""
    hf = tokenizer.tokenizer

    def count_words(words: list[str]) -> list[int]:
        return [len(ids) for ids in hf(words, add_special_tokens=False)["input_ids"]]

    return TextMaker(tokenizer.encode, count_words)


# ------------------------------------------------------------------- padding
@dataclasses.dataclass(frozen=True)
class PaddingStats:
    """Token slots of the same device batches, padded vs packed.

    - ``real_tokens``: the inputs' tokens.
    - ``padded_slots``: sum over batches of (inputs in the batch) x (its longest input): a
      padded [B, max_len] batch per device batch.
    - ``packed_slots``: sum over batches of the token bucket the packed batch ran in (the
      slots actually computed, bucket padding included).
    """

    num_batches: int
    real_tokens: int
    padded_slots: int
    packed_slots: int

    @property
    def saved_percent(self) -> float:
        """Slots the packed batches save, in percent of the padded batches' slots."""
        return 100.0 * (self.padded_slots - self.packed_slots) / self.padded_slots


def padding_stats(lengths: Sequence[int], plan: Sequence[Any]) -> PaddingStats:
    """``PaddingStats`` of sequences of ``lengths`` batched in order as ``plan`` says
    (``BatchShape``s with ``num_seqs``, ``num_tokens``, ``token_bucket``)."""
    padded = packed = start = 0
    for shape in plan:
        batch = lengths[start:start + shape.num_seqs]
        if len(batch) != shape.num_seqs or sum(batch) != shape.num_tokens:
            raise ValueError("the plan does not match the lengths")
        padded += shape.num_seqs * max(batch)
        packed += shape.token_bucket
        start += shape.num_seqs
    if start != len(lengths):
        raise ValueError(f"the plan covers {start} of {len(lengths)} sequences")
    return PaddingStats(num_batches=len(plan), real_tokens=int(sum(lengths)),
                        padded_slots=int(padded), packed_slots=int(packed))
