"""The compiled suffix tree (``arctic_jax_native``, built from ``native/``) against the Python
``SuffixTree``: identical drafts (all five fields), inspection results and bad-input errors."""
from __future__ import annotations

import json
import math
import os
import random

import pytest

from arctic_jax.speculative.native_tree import native_suffix_tree_class
from arctic_jax.speculative.suffix_tree import Draft, SuffixTree

NativeTree = native_suffix_tree_class()
if NativeTree is None:
    pytest.skip("arctic_jax_native is not installed (build it with `pip install ./native`)",
                allow_module_level=True)

TRACE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks", "data", "humaneval_trace.json")
SETTINGS = [  # (k, factor, offset, min_prob)
    (8, 1.0, 0.0, 0.1), (3, 1.0, 0.0, 0.0), (16, 2.0, 1.0, 0.05), (5, 0.5, -0.5, 0.3),
    (0, 1.0, 0.0, 0.1), (12, 1.0, 3.0, 1.0), (6, 0.7, 0.2, -1.0), (10, 1.5, 0.0, 1.5),
]


def assert_same_draft(py: Draft, nat: tuple, where: str) -> None:
    assert isinstance(nat, tuple) and len(nat) == 5, where
    tokens, parents, probs, score, match_len = nat
    assert tokens == py.token_ids, where
    assert parents == py.parents, where
    assert match_len == py.match_len, where
    assert len(probs) == len(py.probs), where
    assert all(abs(a - b) <= 1e-12 for a, b in zip(probs, py.probs, strict=True)), where
    assert abs(score - py.score) <= 1e-12, where
    assert Draft(*nat) == Draft(tuple(tokens), tuple(parents), tuple(probs), score, match_len)


def assert_same_state(py: SuffixTree, nat, ids, rng: random.Random, alphabet: int) -> None:
    assert len(nat) == len(py)
    assert nat.num_tokens == py.num_tokens
    for sid in ids:
        assert (sid in nat) == (sid in py)
        assert nat.seq_len(sid) == py.seq_len(sid)
        for n in (0, 1, 3, py.max_depth, 10 ** 6, -2):
            assert nat.seq_tail(sid, n) == py.seq_tail(sid, n)
        if sid in py:
            assert nat.sequence(sid) == py.sequence(sid)
    for _ in range(6):
        path = [rng.randrange(alphabet) for _ in range(rng.randrange(0, py.max_depth + 2))]
        assert nat.count(path) == py.count(path)
        assert nat.children(path) == py.children(path)
        assert nat.best_child(path) == py.best_child(path)


def contexts(rng: random.Random, py: SuffixTree, ids, alphabet: int, depth: int) -> list[list[int]]:
    """Random contexts plus stored tails (long matches) with a random token or two appended."""
    out = [[rng.randrange(alphabet) for _ in range(rng.randrange(0, depth + 4))] for _ in range(2)]
    live = [s for s in ids if py.seq_len(s)]
    for sid in rng.sample(live, min(2, len(live))):
        seq = py.sequence(sid)
        cut = rng.randrange(1, len(seq) + 1)
        out.append(seq[max(0, cut - depth - 3):cut] + [rng.randrange(alphabet)] * rng.randrange(2))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_with_eviction(seed):
    rng = random.Random(seed)
    for _ in range(4):
        depth = rng.choice([1, 2, 3, 4, 6, 9])
        alphabet = rng.choice([2, 3, 4, 6])
        py, nat = SuffixTree(depth), NativeTree(depth)
        ids = list(range(-2, 5))
        for step in range(40):
            sid = rng.choice(ids)
            r = rng.random()
            if r < 0.15 and sid in py:
                py.remove(sid)
                nat.remove(sid)
            else:
                toks = [rng.randrange(alphabet) for _ in range(rng.choice([0, 1, 1, 2, 5, 13]))]
                py.extend(sid, toks)
                nat.extend(sid, tuple(toks) if r < 0.5 else iter(toks))
            if step % 4 == 3:
                assert_same_state(py, nat, ids, rng, alphabet)
            for ctx in contexts(rng, py, ids, alphabet, depth):
                for k, factor, offset, min_prob in rng.sample(SETTINGS, 3):
                    for tree in (False, True):
                        args = (ctx, k, factor, offset, min_prob, tree)
                        assert_same_draft(py.speculate(*args), nat.speculate(*args),
                                          f"seed {seed} depth {depth} step {step} {args}")


def test_many_children_and_removal_reuse():
    """A node with hundreds of children (the hash-table path), removed and regrown."""
    rng = random.Random(7)
    py, nat = SuffixTree(5), NativeTree(5)
    for sid in range(60):
        toks = [rng.randrange(400) for _ in range(30)] + [7, 8, 9]
        py.extend(sid, toks)
        nat.extend(sid, toks)
    for sid in range(0, 60, 2):
        py.remove(sid)
        nat.remove(sid)
    for sid in range(60, 90):
        toks = [rng.choice([7, 8, 9, rng.randrange(400)]) for _ in range(25)]
        py.extend(sid, toks)
        nat.extend(sid, toks)
    assert_same_state(py, nat, list(range(90)), rng, 400)
    for ctx in ([7], [8], [7, 8], [9, 7], [1, 7, 8], [3, 3]):
        for k, factor, offset, min_prob in SETTINGS:
            for tree in (False, True):
                args = ([5] + ctx, k, factor, offset, min_prob, tree)
                assert_same_draft(py.speculate(*args), nat.speculate(*args), str(args))
    for sid in range(1, 90, 2):
        py.remove(sid)
        nat.remove(sid)
    for sid in range(60, 90, 2):
        py.remove(sid)
        nat.remove(sid)
    assert len(nat) == 0 and nat.num_tokens == 0 and nat.num_nodes == 1   # nothing left behind
    assert nat.speculate([7, 8], 4) == ((), (), (), 0.0, 0)


def test_humaneval_trace_slice():
    """Replay a slice of the real trace the way SuffixProposer uses the trees (a per-request tree
    over prompt + output and a global tree of responses with FIFO eviction) and compare every draft."""
    with open(TRACE) as f:
        data = json.load(f)
    prompts, outputs = data["prompts"][:6], data["outputs"][:6]
    depth, k = 24, 16
    py_g, nat_g = SuffixTree(depth), NativeTree(depth)
    compared = 0
    for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        py_l, nat_l = SuffixTree(depth), NativeTree(depth)
        py_l.extend(0, prompt)
        nat_l.extend(0, prompt)
        if i >= 4:   # keep at most 4 cached responses
            py_g.remove(i - 4)
            nat_g.remove(i - 4)
        pos = 0
        while pos < len(output):
            step = output[pos:pos + 1 + (pos % 3)]
            pos += len(step)
            for tree, seq in ((py_l, 0), (nat_l, 0), (py_g, i), (nat_g, i)):
                tree.extend(seq, step)
            ctx = py_l.seq_tail(0, depth)
            assert nat_l.seq_tail(0, depth) == ctx
            for min_prob, tree_mode in ((0.1, False), (0.1, True), (0.02, True)):
                args = (ctx, k, 1.0, 0.0, min_prob, tree_mode)
                assert_same_draft(py_l.speculate(*args), nat_l.speculate(*args), f"local {i} {pos} {args}")
                assert_same_draft(py_g.speculate(*args), nat_g.speculate(*args), f"global {i} {pos} {args}")
                compared += 2
    assert compared > 1000


def test_python_sum_rule_for_score():
    """score is sum(probs) as this interpreter adds floats: an exact tie between a 3-token and a
    1-token draft must resolve the same way (the longer match wins ties)."""
    py, nat = SuffixTree(4), NativeTree(4)
    for sid, toks in enumerate([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [9, 2, 3, 4]]):
        py.extend(sid, toks)
        nat.extend(sid, toks)
    for ctx in ([0, 1, 2], [9, 2], [1, 2, 3], [2, 3]):
        for k in range(5):
            for tree in (False, True):
                args = (ctx, k, 1.0, 2.0, 0.0, tree)
                d = py.speculate(*args)
                assert math.isclose(d.score, sum(d.probs))
                assert_same_draft(d, nat.speculate(*args), str(args))


def test_numpy_ints_and_keyword_defaults():
    np = pytest.importorskip("numpy")
    py, nat = SuffixTree(3), NativeTree(3)
    toks = np.array([4, 5, 4, 5, 6], dtype=np.int64)
    py.extend(np.int64(3), toks)
    nat.extend(np.int64(3), toks)
    assert nat.seq_len(3) == 5 and nat.sequence(3) == [4, 5, 4, 5, 6]
    assert_same_draft(py.speculate([4, 5, 4], 3), nat.speculate(np.array([4, 5, 4]), 3), "numpy")
    assert_same_draft(py.speculate([5, 4], 3, use_tree_spec=True, min_token_prob=0.0),
                      nat.speculate([5, 4], 3, use_tree_spec=True, min_token_prob=0.0), "kwargs")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3", None])
def test_bad_max_depth(bad):
    with pytest.raises(ValueError, match="max_depth"):
        NativeTree(bad)
    with pytest.raises(ValueError, match="max_depth"):
        SuffixTree(bad)


def test_bad_input_fails_loudly():
    nat = NativeTree(4)
    nat.extend(1, [1, 2, 3])
    for toks in (["a"], [1.5], [True], [2 ** 31], [-(2 ** 31) - 1], [None]):
        with pytest.raises(ValueError, match="token ids"):
            nat.extend(1, toks)
    with pytest.raises(TypeError):
        nat.extend(1, 5)   # not a sequence
    for sid in ("x", 1.0, None, True, 2 ** 70):
        with pytest.raises(ValueError, match="int64 sequence ids"):
            nat.extend(sid, [1])
    with pytest.raises(ValueError, match="unknown sequence id"):
        nat.remove(2)
    with pytest.raises(ValueError, match="unknown sequence id"):
        nat.remove("x")
    assert nat.sequence(1) == [1, 2, 3] and nat.num_tokens == 3   # failed calls changed nothing
    bad_spec = [((-1,), "max_spec_tokens"), ((True,), "max_spec_tokens"), ((2.0,), "max_spec_tokens"),
                ((4, math.nan), "max_spec_factor"), ((4, 1.0, math.inf), "max_spec_offset"),
                ((4, 1.0, 0.0, "0.1"), "min_token_prob"), ((4, True), "max_spec_factor")]
    py = SuffixTree(4)
    py.extend(1, [1, 2, 3])
    for args, name in bad_spec:
        with pytest.raises(ValueError, match=name):
            nat.speculate([1, 2], *args)
        with pytest.raises(ValueError, match=name):
            py.speculate([1, 2], *args)
    with pytest.raises(ValueError, match="token ids"):
        nat.speculate([1, "a"], 3)
    with pytest.raises(KeyError):
        nat.sequence(9)
    assert nat.seq_len(9) == 0 and nat.seq_tail(9, 3) == [] and 9 not in nat and "x" not in nat
    assert nat.seq_len("x") == 0


# ---- the proposer's calls: sync and speculate_pair ------------------------------------------------
def _proposer_parts():
    from arctic_jax.speculative.native_tree import native_draft_tree_class, native_speculate_pair
    from arctic_jax.speculative.suffix_proposer import _python_speculate_pair, _PythonTree
    return native_draft_tree_class(NativeTree), native_speculate_pair(), _PythonTree, _python_speculate_pair


@pytest.mark.parametrize("seed", range(4))
def test_sync_matches_python_tree(seed):
    """sync appends the missing tail when the stored sequence agrees on its last `check` tokens,
    else returns -1 and changes nothing; the same answers and states as the Python twin."""
    _, _, PyTree, _ = _proposer_parts()
    rng = random.Random(100 + seed)
    depth, alphabet = rng.choice([(3, 3), (5, 4), (8, 2)])
    py, nat = PyTree(depth), NativeTree(depth)
    targets = {sid: [] for sid in range(3)}
    for sid in targets:
        py.extend(sid, [])
        nat.extend(sid, [])
    results = []
    for step in range(200):
        sid = rng.randrange(4)   # 3 is never stored: -1
        want = targets.setdefault(sid, []) if sid < 3 else [rng.randrange(alphabet)]
        r = rng.random()
        if sid < 3 and r < 0.5:
            want.extend(rng.randrange(alphabet) for _ in range(rng.randrange(4)))
        elif sid < 3 and r < 0.6 and want:
            want[rng.randrange(len(want))] = rng.randrange(alphabet)   # an edit, maybe outside `check`
        elif sid < 3 and r < 0.7:
            del want[rng.randrange(len(want) + 1):]   # shorter than stored: -1 unless nothing cut
        cut = rng.randrange(len(want) + 1)
        head, tail = want[:cut], want[cut:]
        check = rng.choice([0, 1, depth, 100])
        before = nat.sequence(sid) if sid in nat else None
        a = py.sync(sid, head, tail, check)
        b = nat.sync(sid, tuple(head), tail, check)
        assert a == b, (seed, step)
        results.append(a)
        if a < 0:
            assert (nat.sequence(sid) if sid in nat else None) == before
        else:   # the checked window agreed, the rest was appended
            lo = max(0, len(before) - check)
            assert nat.sequence(sid) == before + want[len(before):] and before[lo:] == want[lo:len(before)]
        if sid < 3:
            assert nat.sequence(sid) == py.sequence(sid)
    assert {-1, 0} <= set(results) and max(results) > 0   # every branch was taken
    assert nat.num_tokens == py.num_tokens


@pytest.mark.parametrize("seed", range(4))
def test_speculate_pair_matches_python_pair(seed):
    """speculate_pair (context read from the local sequence, hints from the global sequence's active
    suffixes, the global draft only when it scores higher) gives the Python pair's Draft exactly."""
    NatDraftTree, pair, PyTree, py_pair = _proposer_parts()
    rng = random.Random(200 + seed)
    depth, alphabet = rng.choice([(4, 3), (6, 4), (9, 3)])
    py_g, nat_g = PyTree(depth), NatDraftTree(depth)
    for sid in range(6):   # finished responses, some evicted
        toks = [rng.randrange(alphabet) for _ in range(rng.randrange(12))]
        py_g.extend(sid, toks)
        nat_g.extend(sid, toks)
    for sid in rng.sample(range(6), 2):
        py_g.remove(sid)
        nat_g.remove(sid)
    for req in range(6):
        prompt = [rng.randrange(alphabet + 2) for _ in range(rng.randrange(1, 10))]
        py_l, nat_l = PyTree(depth), NatDraftTree(depth)
        py_l.extend(0, prompt)
        nat_l.extend(0, prompt)
        key = 10 + req
        py_g.extend(key, [])
        nat_g.extend(key, [])
        for _ in range(12):
            new = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 4))]
            for t in (py_l, nat_l):
                t.extend(0, new)
            for t in (py_g, nat_g):
                t.extend(key, new)
            for k, factor, offset, min_prob in rng.sample(SETTINGS, 3):
                for tree in (False, True):
                    for hint, globs in ((key, (py_g, nat_g)), (None, (py_g, nat_g)), (None, (None, None))):
                        args = (k, factor, offset, min_prob, tree, Draft)
                        want = py_pair(py_l, 0, globs[0], hint, *args)
                        got = pair(nat_l, 0, globs[1], hint, *args)
                        assert type(got) is Draft and got == want, (seed, req, args, hint)


def test_speculate_pair_and_sync_bad_input():
    NatDraftTree, pair, _, _ = _proposer_parts()
    a, b, c = NatDraftTree(4), NatDraftTree(4), NatDraftTree(5)
    a.extend(0, [1, 2, 1, 2])
    b.extend(5, [1, 2, 3] * 3)
    b.extend(3, [1, 2])   # the request's response: ends with the context
    # local [1, 2] -> 1, 2 (probs 0.5, 0.5); global [1, 2] -> 3, 1 (probs 0.75, 0.75 * 2/3): global wins
    d = pair(a, 0, b, 3, 4, 1.0, 0.0, 0.1, False, Draft)
    assert (d.token_ids, d.parents, d.match_len) == ((3, 1), (-1, 0), 2) and d.score == pytest.approx(1.25)
    d = pair(a, 0, None, None, 4, 1.0, 0.0, 0.1, False, Draft)
    assert d == Draft((1, 2), (-1, 0), (0.5, 0.5), 1.0, 2)
    # budget 0: every draft is empty and the longest match wins
    assert pair(a, 0, None, None, 0, 1.0, 0.0, 0.1, True, Draft) == Draft((), (), (), 0.0, 3)
    assert isinstance(a.speculate([1, 2], 4), Draft)
    for args, match in (((a, 1, b, 3), "unknown local sequence id"), ((a, 0, a, 0), "another tree"),
                        ((a, 0, c, None), "same max_depth"), ((a, "x", b, 3), "int64 sequence ids")):
        with pytest.raises(ValueError, match=match):
            pair(*args, 4, 1.0, 0.0, 0.1, False, Draft)
    with pytest.raises(ValueError, match="draft_type"):
        pair(a, 0, b, 3, 4, 1.0, 0.0, 0.1, False, "Draft")
    with pytest.raises(ValueError, match="max_spec_tokens"):
        pair(a, 0, b, 3, -1, 1.0, 0.0, 0.1, False, Draft)
    with pytest.raises(ValueError, match="min_token_prob"):
        pair(a, 0, b, 3, 4, 1.0, 0.0, math.nan, False, Draft)
    with pytest.raises(TypeError):
        pair([1, 2], 0, b, 3, 4, 1.0, 0.0, 0.1, False, Draft)
    with pytest.raises(ValueError, match="token ids"):
        a.sync(0, [1, 2, 1, 2], [5, "x"], 4)
    with pytest.raises(ValueError, match="check"):
        a.sync(0, [1, 2, 1, 2], [], -1)
    assert a.sequence(0) == [1, 2, 1, 2] and a.num_tokens == 4   # failed calls changed nothing
    assert a.sync(0, [1, 2, 1, 2], [5], 4) == 1 and a.sequence(0) == [1, 2, 1, 2, 5]
    assert a.sync(0, [1, 2, 1], [9, 5], 4) == -1 and a.sync(0, [1, 2, 1], [9, 5], 1) == 0
    assert a.sync(7, [], [], 4) == -1 and 7 not in a
