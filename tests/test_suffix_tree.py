"""Suffix tree and suffix-decoding proposer against a brute-force oracle (host-side, no jax)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections import Counter

import pytest

from arctic_jax.speculative.proposer import Proposer
from arctic_jax.speculative.suffix_proposer import SuffixProposer
from arctic_jax.speculative.suffix_tree import Draft, SuffixTree


# ---- oracle ------------------------------------------------------------------------------------
class Oracle:
    """Stored sequences and every quantity computed from the definitions, by enumeration."""

    def __init__(self, max_depth: int) -> None:
        self.D = max_depth
        self.seqs: dict = {}
        self._occ: Counter | None = None      # occurrences of the current sequences
        self._kids: dict = {}                 # p -> [(token, count(p + token))] grouped from _occ

    def extend(self, sid, toks) -> None:
        self.seqs.setdefault(sid, []).extend(toks)
        self._occ = None

    def remove(self, sid) -> None:
        del self.seqs[sid]
        self._occ = None

    def occurrences(self) -> Counter:
        """count(p) for every stored p with 1 <= len(p) <= D: occurrences of p in the sequences."""
        if self._occ is None:
            c = Counter()
            for s in self.seqs.values():
                for i in range(len(s)):
                    for n in range(1, min(self.D, len(s) - i) + 1):
                        c[tuple(s[i:i + n])] += 1
            kids: dict = {}
            for q, n in c.items():
                kids.setdefault(q[:-1], []).append((q[-1], n))
            self._occ, self._kids = c, kids
        return self._occ

    def count(self, occ: Counter, p: tuple) -> int:
        if not p:
            return sum(len(s) for s in self.seqs.values())
        return occ.get(p, 0) if len(p) <= self.D else 0

    def children(self, occ: Counter, p: tuple) -> list[tuple[int, int]]:
        """(t, count(p + t)) for the stored p + t, by count then token id (occ: occurrences())."""
        assert occ is self._occ
        if len(p) >= self.D:
            return []
        return sorted(self._kids.get(p, ()), key=lambda tc: (-tc[1], tc[0]))

    def speculate(self, context, max_spec, factor=1.0, offset=0.0, min_prob=0.1, tree=False):
        occ = self.occurrences()
        ctx = list(context)[-self.D:]
        best = ((), (), (), 0.0, 0)
        for m in range(1, len(ctx)):
            p = tuple(ctx[len(ctx) - m:])
            if self.count(occ, p) == 0:
                break
            budget = max(0, min(max_spec, math.floor(m * factor + offset + 1e-6)))
            fn = self._tree if tree else self._path
            toks, parents, probs = fn(occ, p, budget, min_prob)
            if sum(probs) >= best[3]:
                best = (tuple(toks), tuple(parents), tuple(probs), sum(probs), m)
        return best

    def _path(self, occ, p, budget, min_prob):
        toks, probs, prob = [], [], 1.0
        while len(toks) < budget:
            ch = self.children(occ, p)
            if not ch:
                break
            t, c = ch[0]
            prob = prob * (c / self.count(occ, p))
            if prob < min_prob:
                break
            toks.append(t)
            probs.append(prob)
            p = p + (t,)
        return toks, list(range(-1, len(toks) - 1)), probs

    def _tree(self, occ, p, budget, min_prob):
        """Best-first: repeatedly take the frontier entry of highest prob (earliest pushed on ties)."""
        toks, parents, probs, frontier, pushed = [], [], [], [], 0

        def push(q, prob, parent):
            nonlocal pushed
            for t, c in self.children(occ, q):
                pc = prob * (c / self.count(occ, q))
                if pc < min_prob:
                    break
                frontier.append((pc, pushed, q + (t,), parent))
                pushed += 1

        if budget > 0:
            push(p, 1.0, -1)
        while frontier and len(toks) < budget:
            i = max(range(len(frontier)), key=lambda j: (frontier[j][0], -frontier[j][1]))
            prob, _, q, parent = frontier.pop(i)
            toks.append(q[-1])
            parents.append(parent)
            probs.append(prob)
            if len(toks) < budget:
                push(q, prob, len(toks) - 1)
        return toks, parents, probs



@pytest.fixture(params=["python", "native"])
def proposer_backend(request, monkeypatch):
    """Runs a proposer test with each tree backend (``SuffixProposer(backend="auto")`` picks it)."""
    import arctic_jax.speculative.suffix_proposer as module
    from arctic_jax.speculative.native_tree import native_suffix_tree_class
    if request.param == "python":
        monkeypatch.setattr(module, "native_suffix_tree_class", lambda: None)
    elif native_suffix_tree_class() is None:
        pytest.skip("arctic_jax_native is not installed (pip install ./native)")
    return request.param

def as_tuple(d: Draft):
    return (d.token_ids, d.parents, d.probs, d.score, d.match_len)


def assert_same_draft(got: Draft, want) -> None:
    assert got.token_ids == want[0]
    assert got.parents == want[1]
    assert got.probs == pytest.approx(want[2], abs=0, rel=1e-12)
    assert got.score == pytest.approx(want[3], abs=0, rel=1e-12)
    assert got.match_len == want[4]
    assert all(p < i for i, p in enumerate(got.parents))


def check_structure(tree: SuffixTree, oracle: Oracle) -> None:
    occ = oracle.occurrences()
    assert tree.num_tokens == oracle.count(occ, ())
    # path-compressed: at most one node per distinct stored substring (depth <= D), root included
    assert tree.num_nodes <= 1 + len(occ)
    assert tree.num_nodes == tree._subtree_size(tree._root)
    for p, c in occ.items():
        assert tree.count(p) == c
        want = oracle.children(occ, p)
        assert tree.children(p) == want
        assert tree.best_child(p) == (want[0][0] if want else None)
    assert tree.children(()) == oracle.children(occ, ())
    for p in list(occ)[:50]:           # strings one token past a stored one, mostly absent
        for t in range(6):
            q = p + (t,)
            assert tree.count(q) == oracle.count(occ, q)
    for sid, s in oracle.seqs.items():
        assert tree.sequence(sid) == s


# ---- suffix tree vs oracle ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_tree_matches_oracle_random(seed):
    rng = random.Random(seed)
    D = rng.choice([1, 2, 3, 4, 6, 9])
    alphabet = rng.randint(2, 5)
    tree, oracle = SuffixTree(D), Oracle(D)
    next_id = 0
    for _ in range(14):
        op = rng.random()
        if op < 0.2 and oracle.seqs:
            sid = rng.choice(list(oracle.seqs))
            tree.remove(sid)
            oracle.remove(sid)
        else:
            if op < 0.55 or not oracle.seqs:
                sid, next_id = f"s{next_id}", next_id + 1
            else:
                sid = rng.choice(list(oracle.seqs))
            room = 40 - len(oracle.seqs.get(sid, []))
            toks = [rng.randrange(alphabet) for _ in range(rng.randint(0, min(room, 15)))]
            tree.extend(sid, toks)
            oracle.extend(sid, toks)
        check_structure(tree, oracle)
        for _ in range(6):
            if oracle.seqs and rng.random() < 0.6:
                s = rng.choice(list(oracle.seqs.values()))
                cut = rng.randint(0, len(s))
                ctx = s[max(0, cut - rng.randint(0, D + 3)):cut]
                ctx += [rng.randrange(alphabet)] * rng.randint(0, 1)
            else:
                ctx = [rng.randrange(alphabet) for _ in range(rng.randint(0, D + 3))]
            k = rng.randint(0, 10)
            factor = rng.choice([1.0, 0.5, 2.0, 3.0, 0.3])
            offset = rng.choice([0.0, 1.0, -1.0, 2.5, 4.0])
            min_prob = rng.choice([0.1, 0.0, 0.3, 0.5, 1.0])
            for tree_mode in (False, True):
                got = tree.speculate(ctx, k, factor, offset, min_prob, tree_mode)
                assert_same_draft(got, oracle.speculate(ctx, k, factor, offset, min_prob, tree_mode))
    for sid in list(oracle.seqs):
        tree.remove(sid)
    assert tree.num_nodes == 1 and tree.num_tokens == 0 and len(tree) == 0
    assert as_tuple(tree.speculate([0, 1, 0], 4)) == as_tuple(Draft())


def repetitive(rng: random.Random, n: int, alphabet: int, source: list[int]) -> list[int]:
    """n tokens: short random stretches mixed with copies of stretches of source (as edited code repeats)."""
    out: list[int] = []
    while len(out) < n:
        if source and rng.random() < 0.6:
            i = rng.randrange(len(source))
            out += source[i:i + rng.randint(2, 30)]
        else:
            out += [rng.randrange(alphabet) for _ in range(rng.randint(1, 6))]
    return out[:n]


@pytest.mark.parametrize("seed", range(6))
def test_tree_matches_oracle_long_repetitive_sequences(seed):
    """Long sequences grown a few tokens at a time side by side, copying stretches of each other
    (suffixes entering, walking along and leaving each other's runs), with removals; drafts from
    the tails of the stored sequences and from random contexts, path and tree mode."""
    rng = random.Random(100 + seed)
    D = (3, 8, 24)[seed % 3]
    alphabet = rng.randint(3, 8)
    tree, oracle = SuffixTree(D), Oracle(D)
    plans: dict[int, list[int]] = {}     # sequence -> tokens it still gets
    next_id = 0
    for step in range(40):
        if len(plans) < 3 or rng.random() < 0.1:
            source = rng.choice(list(oracle.seqs.values())) if oracle.seqs else []
            plans[next_id] = repetitive(rng, rng.randint(20, 90), alphabet, source)
            next_id += 1
        if len(oracle.seqs) > 4 and rng.random() < 0.15:
            sid = rng.choice(list(oracle.seqs))
            tree.remove(sid)
            oracle.remove(sid)
            plans.pop(sid, None)
        for sid in list(plans):
            n = rng.randint(0, 4)
            toks, plans[sid] = plans[sid][:n], plans[sid][n:]
            tree.extend(sid, toks)
            oracle.extend(sid, toks)
            if not plans[sid]:
                del plans[sid]
        for _ in range(6):
            if rng.random() < 0.8:
                ctx = rng.choice(list(oracle.seqs.values()))[-(D + rng.randint(-2, 2)):]
                ctx = ctx + [rng.randrange(alphabet)] * (rng.random() < 0.2)
            else:
                ctx = [rng.randrange(alphabet) for _ in range(rng.randint(0, D))]
            k = rng.randint(0, 24)
            factor, offset = rng.choice([(1.0, 0.0), (0.5, 1.0), (2.0, -1.0)])
            min_prob = rng.choice([0.1, 0.0, 0.3])
            for tree_mode in (False, True):
                assert_same_draft(tree.speculate(ctx, k, factor, offset, min_prob, tree_mode),
                                  oracle.speculate(ctx, k, factor, offset, min_prob, tree_mode))
        if step % 13 == 12:
            check_structure(tree, oracle)
    check_structure(tree, oracle)


def test_leaf_left_to_one_suffix_after_a_removal_grows_again():
    """A leaf grown by one sequence, entered by another (count 2), then left to the first again
    by removing the second, keeps growing with the first."""
    tree, oracle = SuffixTree(2), Oracle(2)
    for sid, toks in (("a", [0]), ("b", [0, 2, 2])):
        tree.extend(sid, toks)
        oracle.extend(sid, toks)
    tree.remove("b")
    oracle.remove("b")
    tree.extend("a", [2, 1])
    oracle.extend("a", [2, 1])
    assert tree.children([0]) == [(2, 1)] and tree.count([2, 1]) == 1
    check_structure(tree, oracle)
    assert_same_draft(tree.speculate([0, 2], 3), oracle.speculate([0, 2], 3))


def test_path_compression_keeps_nodes_linear_in_tokens():
    rng = random.Random(5)
    tree = SuffixTree(24)
    for i in range(4):
        tree.extend(i, [rng.randrange(1000) for _ in range(300)])
        tree.extend(i, [rng.randrange(1000) for _ in range(100)])
    assert tree.num_tokens == 1600 and tree.num_nodes <= 2 * 1600 + 1   # uncompressed: ~24 per token
    for i in range(4):
        tree.remove(i)
    assert tree.num_nodes == 1


def test_path_draft_is_best_path_of_tree_draft_when_budget_allows_one_branch():
    rng = random.Random(7)
    tree = SuffixTree(6)
    for i in range(4):
        tree.extend(i, [rng.randrange(3) for _ in range(30)])
    ctx = [rng.randrange(3) for _ in range(6)]
    path = tree.speculate(ctx, 1, min_token_prob=0.0)
    t = tree.speculate(ctx, 1, min_token_prob=0.0, use_tree_spec=True)
    assert path.token_ids == t.token_ids and path.probs == t.probs and len(path) == 1


# ---- hand cases --------------------------------------------------------------------------------
def test_empty_tree_short_context_and_no_match():
    tree = SuffixTree(4)
    assert as_tuple(tree.speculate([1, 2, 3], 5)) == as_tuple(Draft())
    tree.extend("a", [1, 2, 3, 4])
    assert as_tuple(tree.speculate([], 5)) == as_tuple(Draft())
    assert as_tuple(tree.speculate([3], 5)) == as_tuple(Draft())        # m ranges over 1..len-1
    assert as_tuple(tree.speculate([3, 9], 5)) == as_tuple(Draft())     # last token unseen
    d = tree.speculate([9, 2], 5)                                        # m=1 matches [2]; m=2 misses
    assert d.token_ids == (3,) and d.match_len == 1 and d.parents == (-1,) and d.probs == (1.0,)


def test_budget_from_factor_offset_and_max_spec():
    tree = SuffixTree(200)
    tree.extend(0, list(range(300)))
    d = tree.speculate([1, 2, 3], 10)
    assert d.token_ids == (4, 5) and d.match_len == 2 and d.score == 2.0 and d.parents == (-1, 0)
    wide = tree.speculate([1, 2, 3], 10, max_spec_factor=2.0, max_spec_offset=1.0)
    assert wide.token_ids == (4, 5, 6, 7, 8) and wide.match_len == 2
    assert tree.speculate([1, 2, 3], 3, max_spec_factor=2.0, max_spec_offset=1.0).token_ids == (4, 5, 6)
    assert tree.speculate([1, 2, 3], 10, max_spec_factor=0.5).token_ids == (4,)
    none = tree.speculate([1, 2, 3], 10, max_spec_offset=-5.0)       # budget clipped at 0
    assert none.token_ids == () and none.score == 0.0 and none.match_len == 2   # ties -> longer match
    # floor(m * factor + offset + 1e-6): 100 * 0.29 = 28.999999999999996 still gives 29
    assert 100 * 0.29 < 29
    d = tree.speculate(list(range(0, 101)), 50, max_spec_factor=0.29)
    assert d.match_len == 100 and d.token_ids == tuple(range(101, 130))


def test_depth_bound_limits_counts_and_drafts():
    tree = SuffixTree(3)
    tree.extend(0, [1, 2, 3, 4, 5])
    assert tree.count([1, 2, 3]) == 1 and tree.count([1, 2, 3, 4]) == 0 and tree.children([1, 2, 3]) == []
    # context clipped to [2, 3, 4]: m=2 matches [3, 4] (depth 2) and can draft one more token
    d = tree.speculate([0, 1, 2, 3, 4], 5)
    assert d.token_ids == (5,) and d.match_len == 2


def test_min_prob_cut_path_and_tree():
    tree = SuffixTree(8)
    for sid, s in enumerate(([5, 1, 2, 3, 9], [5, 1, 2, 4, 9], [5, 1, 2, 4, 9])):
        tree.extend(sid, s)
    d = tree.speculate([7, 1, 2], 8)
    assert d.token_ids == (4, 9) and d.match_len == 2
    assert d.probs == pytest.approx((2 / 3, 2 / 3)) and d.score == pytest.approx(4 / 3)
    cut = tree.speculate([7, 1, 2], 8, min_token_prob=0.7)
    assert cut.token_ids == () and cut.match_len == 2
    def tree_draft(k, min_prob):   # factor 4: the budget is k, not the match length
        return tree.speculate([7, 1, 2], k, max_spec_factor=4.0, min_token_prob=min_prob, use_tree_spec=True)

    t = tree_draft(8, 0.3)
    assert t.token_ids == (4, 9, 3, 9) and t.parents == (-1, 0, -1, 2)
    assert t.probs == pytest.approx((2 / 3, 2 / 3, 1 / 3, 1 / 3)) and t.best_path() == [4, 9]
    assert tree_draft(8, 0.4).token_ids == (4, 9)
    assert tree_draft(3, 0.3).token_ids == (4, 9, 3) and tree_draft(3, 0.3).parents == (-1, 0, -1)


def test_child_ties_go_to_smaller_token_and_follow_counts():
    tree = SuffixTree(4)
    tree.extend("a", [1, 3])
    tree.extend("b", [1, 2])
    assert tree.best_child([1]) == 2 and tree.children([1]) == [(2, 1), (3, 1)]
    tree.extend("c", [1, 3])
    assert tree.best_child([1]) == 3
    tree.remove("c")
    assert tree.best_child([1]) == 2
    tree.remove("b")
    assert tree.best_child([1]) == 3
    tree.remove("a")
    assert tree.best_child([1]) is None and tree.num_nodes == 1


def test_bad_input_fails_loudly():
    with pytest.raises(ValueError, match="max_depth"):
        SuffixTree(0)
    tree = SuffixTree(4)
    with pytest.raises(ValueError, match="integers"):
        tree.extend(0, [1, 2.5])
    with pytest.raises(ValueError, match="unknown sequence"):
        tree.remove(3)
    with pytest.raises(ValueError, match="max_spec_tokens"):
        tree.speculate([1, 2], -1)
    with pytest.raises(ValueError, match="max_spec_tokens"):
        tree.speculate([1, 2], None)
    with pytest.raises(ValueError, match="min_token_prob"):
        tree.speculate([1, 2], 3, min_token_prob=float("nan"))


# ---- proposer ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Req:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int] = dataclasses.field(default_factory=list)


def proposer_oracle(prompt_output: list[int], responses: list[list[int]], k: int, D: int, **kw):
    """Better of the per-request oracle and the global oracle; ties to the per-request tree."""
    local, glob = Oracle(D), Oracle(D)
    local.extend(0, prompt_output)
    for i, r in enumerate(responses):
        glob.extend(i, r)
    ctx = prompt_output[-D:]
    a = local.speculate(ctx, k, **kw)
    b = glob.speculate(ctx, k, **kw) if responses else a
    return b if b[3] > a[3] else a


@pytest.mark.usefixtures("proposer_backend")
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tree_mode", [False, True])
def test_proposer_matches_oracle_and_feeds_global_with_responses(tree_mode, seed):
    rng = random.Random(10 * seed + tree_mode)
    D, alphabet = 5, 4
    prop = SuffixProposer(max_depth=D, max_cached_requests=3, min_token_prob=0.2, use_tree_spec=tree_mode)
    assert isinstance(prop, Proposer)
    live: list[Req] = []
    cached: list[Req] = []      # requests whose responses the global tree should hold, FIFO
    for step in range(40):
        if rng.random() < 0.25 or not live:
            # prompts use tokens >= 100, so any prompt token in the global tree is detectable
            r = Req(f"r{step}", [100 + rng.randrange(3) for _ in range(rng.randint(1, 8))])
            live.append(r)
            cached.append(r)
            cached = cached[-3:]
        for r in live:
            if rng.random() < 0.8:
                new = [rng.randrange(alphabet) for _ in range(rng.randint(1, 3))]
                r.output_ids.extend(new)
                if rng.random() < 0.85:          # sometimes the engine's on_tokens is missed
                    prop.on_tokens(r, new)
        k = rng.randint(0, 6)
        drafts = prop.propose_drafts(live, k)
        paths = prop.propose(live, k)
        responses = [list(c.output_ids) for c in cached]
        for r, d, p in zip(live, drafts, paths, strict=True):
            want = proposer_oracle(r.prompt_ids + r.output_ids, responses, k, D, min_prob=0.2, tree=tree_mode)
            assert_same_draft(d, want)
            assert p == (d.best_path() if tree_mode else list(d.token_ids)) and len(p) <= k
        g = prop.global_tree
        assert sorted(map(tuple, (g.sequence(s) for s in g.seq_ids()))) == sorted(map(tuple, responses))
        assert all(t < 100 for s in g.seq_ids() for t in g.sequence(s))
        if rng.random() < 0.2:
            done = live.pop(rng.randrange(len(live)))
            prop.on_finish(done)
        assert prop.num_tracked == len(live) and prop.num_cached_responses == len(cached)


@pytest.mark.usefixtures("proposer_backend")
def test_finished_response_drafts_for_a_new_request_and_local_wins_ties():
    prop = SuffixProposer(max_depth=8)
    a = Req("a", [50, 51], [1, 2, 3, 4, 5])
    prop.on_tokens(a, [1, 2, 3, 4, 5])
    prop.on_finish(a)
    assert prop.num_tracked == 0 and prop.num_cached_responses == 1
    b = Req("b", [60, 1, 2])                  # its own tree has no continuation of [1, 2]
    d = prop.propose_drafts([b], 4)[0]
    assert d.token_ids == (3, 4) and d.match_len == 2 and d.score == 2.0   # global wins, budget 2
    # equal scores: local [1, 2] -> 4, 1 (probs 0.5, 0.5); global [1, 2] -> 3 (prob 1)
    prop = SuffixProposer(max_depth=8)
    prop.on_finish(Req("a", [50], [1, 2, 3]))    # never seen: a no-op, nothing cached
    assert prop.num_cached_responses == 0
    a = Req("a", [50], [1, 2, 3])
    prop.on_tokens(a, [3])
    prop.on_finish(a)
    c = Req("c", [1, 2, 4, 1, 2])
    ctx = c.prompt_ids
    assert prop.global_tree.speculate(ctx, 4).score == 1.0
    assert prop.propose_drafts([c], 4)[0].token_ids == (4, 1)
    c.prompt_ids = [9, 1, 2, 4, 1, 2]           # a new prompt under the same id: rebuilt, local 1.0 again
    assert prop.propose([c], 4) == [[4, 1]]
    c2 = Req("c2", [1, 2, 4, 1, 2, 5])         # local now has nothing after [.., 2, 5]; global neither
    assert prop.propose([c2], 4) == [[]]


@pytest.mark.usefixtures("proposer_backend")
def test_fifo_eviction_and_disabled_or_unlimited_global():
    prop = SuffixProposer(max_depth=4, max_cached_requests=2)
    reqs = [Req(f"q{i}", [90], [i, i + 10]) for i in range(3)]
    for r in reqs:
        prop.on_tokens(r, r.output_ids)
    g = prop.global_tree
    assert sorted(g.sequence(s) for s in g.seq_ids()) == [[1, 11], [2, 12]]
    # q0 is still running but its response was evicted; more tokens do not re-add it
    reqs[0].output_ids.append(7)
    prop.on_tokens(reqs[0], [7])
    assert len(g) == 2 and prop.local_tree("q0").sequence(0) == [90, 0, 10, 7]
    off = SuffixProposer(max_cached_requests=0)
    off.on_tokens(reqs[1], reqs[1].output_ids)
    assert off.global_tree is None and off.propose([reqs[1]], 3) == [[]]
    unlimited = SuffixProposer(max_depth=4, max_cached_requests=None)
    for i in range(30):
        unlimited.on_tokens(Req(f"u{i}", [1], [i]), [i])
    assert unlimited.num_cached_responses == 30


@pytest.mark.usefixtures("proposer_backend")
def test_resync_after_missed_tokens_preemption_and_reused_id():
    D = 6
    rng = random.Random(11)
    prompt = [rng.randrange(3) for _ in range(20)]
    out = [rng.randrange(3) for _ in range(15)]

    def fresh_drafts(r):
        drafts = SuffixProposer(max_depth=D).propose_drafts([r], 5)
        assert len(drafts[0]) > 0          # the comparison below is not vacuous
        return drafts

    prop = SuffixProposer(max_depth=D)
    r = Req("x", prompt, out[:3])
    prop.propose([r], 5)
    r.output_ids = out[:10]                           # on_tokens missed for 7 tokens
    assert prop.propose_drafts([r], 5) == fresh_drafts(r)
    prop.on_tokens(r, out[7:10])                      # reported twice (recompute after preemption)
    assert prop.local_tree("x").sequence(0) == prompt + out[:10]
    assert prop.global_tree.sequence(prop.global_tree.seq_ids()[0]) == out[:10]
    # output rewritten under the same length (a reused id): rebuilt, not extended
    r2 = Req("x", prompt, out[5:15])
    assert prop.propose_drafts([r2], 5) == fresh_drafts(r2)
    assert prop.local_tree("x").sequence(0) == prompt + out[5:15]
    g = prop.global_tree
    assert [g.sequence(s) for s in g.seq_ids()] == [out[5:15]]
    r3 = Req("x", prompt[:4], [])                     # shorter: rebuilt
    prop.on_tokens(r3, [])
    assert prop.local_tree("x").sequence(0) == prompt[:4] and prop.num_cached_responses == 1
    prop.on_finish(Req("x", prompt[:4], [2, 2]))     # rewritten again at finish: rebuilt, then finished
    prop.on_finish(r3)                                # idempotent
    assert prop.num_tracked == 0 and [g.sequence(s) for s in g.seq_ids()] == [[2, 2]]
    for i in range(3):                                # evicting the finished response is clean
        prop.on_tokens(Req(f"y{i}", [1], [i]), [i])
    assert prop.num_cached_responses == 4
    small = SuffixProposer(max_depth=D, max_cached_requests=1)
    small.on_tokens(Req("x", [1], [5]), [5])
    small.on_finish(Req("x", [1], [6, 6]))            # mismatch at finish, then evicted by a newcomer
    small.on_tokens(Req("z", [1], [7]), [7])
    sg = small.global_tree
    assert small.num_tracked == 1 and [sg.sequence(s) for s in sg.seq_ids()] == [[7]]


def test_on_tokens_after_propose_of_the_same_step_leaves_the_trees_alone(monkeypatch):
    """The engine calls ``on_tokens`` after ``propose`` synced the request at the same length:
    no second sync; a later token, a cut output or another request object syncs again."""
    import arctic_jax.speculative.suffix_proposer as module
    monkeypatch.setattr(module, "native_suffix_tree_class", lambda: None)
    calls = []
    sync = module._PythonTree.sync
    monkeypatch.setattr(module._PythonTree, "sync", lambda self, *a: calls.append(a[0]) or sync(self, *a))
    rng = random.Random(5)
    prop = SuffixProposer(max_depth=6)
    r = Req("x", [rng.randrange(3) for _ in range(12)], [rng.randrange(3) for _ in range(4)])
    prop.propose([r], 4)                          # first sight: built, no sync
    r.output_ids.append(1)
    prop.propose([r], 4)
    assert len(calls) == 2                        # the local and the global tree
    prop.on_tokens(r, [1])
    assert len(calls) == 2
    r.output_ids.append(2)
    prop.on_tokens(r, [2])                        # not proposed this step: synced
    assert len(calls) == 4 and prop.global_tree.sequence(prop.global_tree.seq_ids()[0]) == r.output_ids
    del r.output_ids[-2:]                         # cut (a stop string): synced, then rebuilt
    prop.on_tokens(r, [])
    assert prop.local_tree("x").sequence(0) == r.prompt_ids + r.output_ids
    twin = Req("x", r.prompt_ids, [9] * len(r.output_ids))   # same id and length, another object
    prop.on_tokens(twin, [])
    assert prop.local_tree("x").sequence(0) == twin.prompt_ids + twin.output_ids


@pytest.mark.usefixtures("proposer_backend")
def test_proposer_bad_input():
    with pytest.raises(ValueError, match="max_cached_requests"):
        SuffixProposer(max_cached_requests=-2)
    with pytest.raises(ValueError, match="max_depth"):
        SuffixProposer(max_depth=0)
    with pytest.raises(ValueError, match="use_tree_spec"):
        SuffixProposer(use_tree_spec=1)
    with pytest.raises(ValueError, match="k must"):
        SuffixProposer().propose([Req("a", [1, 2])], -1)


def replay_against_oracle(prop: SuffixProposer, prompts: list[list[int]], outputs: list[list[int]],
                          concurrency: int, k: int, max_cached: int, rng: random.Random, **kw) -> int:
    """Closed-loop replay as the engine drives the proposer: each step a request accepts the longest
    draft path matching its true output plus one token (on_tokens sometimes missed), and every
    draft is checked against the oracles. The global oracle holds the outputs so far of the last
    max_cached requests started. Returns the number of drafted tokens (to show it is not vacuous)."""
    pending, live, started = list(range(len(prompts))), [], []
    reqs: dict[int, Req] = {}
    drafted = 0
    while pending or live:
        while pending and len(live) < concurrency:
            i = pending.pop(0)
            reqs[i] = Req(f"q{i}", list(prompts[i]), [outputs[i][0]])
            live.append(i)
            started.append(i)
        drafts = prop.propose_drafts([reqs[i] for i in live], k)
        glob = Oracle(prop.max_depth)
        for i in started[-max_cached:]:
            glob.extend(i, reqs[i].output_ids)
        for i, d in zip(list(live), drafts, strict=True):
            r = reqs[i]
            local = Oracle(prop.max_depth)
            local.extend(0, r.prompt_ids + r.output_ids)
            ctx = (r.prompt_ids + r.output_ids)[-prop.max_depth:]
            a = local.speculate(ctx, k, **kw)
            b = glob.speculate(ctx, k, **kw)
            assert_same_draft(d, b if b[3] > a[3] else a)
            drafted += len(d)
            truth, pos = outputs[i], len(r.output_ids)
            n, cur = 0, -1        # the longest path of the draft tree matching the truth
            while pos + n < len(truth):
                nxt = [j for j in range(len(d)) if d.parents[j] == cur and d.token_ids[j] == truth[pos + n]]
                if not nxt:
                    break
                n, cur = n + 1, nxt[0]
            new = truth[pos:pos + n + 1]
            r.output_ids.extend(new)
            if rng.random() < 0.9:
                prop.on_tokens(r, new)
            if len(r.output_ids) >= len(truth):
                prop.on_finish(r)
                live.remove(i)
    assert prop.num_tracked == 0
    return drafted


@pytest.mark.usefixtures("proposer_backend")
@pytest.mark.parametrize("tree_mode", [False, True])
def test_proposer_matches_oracle_long_repetitive_requests(tree_mode):
    """Requests whose prompts and outputs copy stretches of earlier ones, with FIFO eviction."""
    rng = random.Random(21 + tree_mode)
    D, alphabet, k = 8, 5, 10
    prompts: list[list[int]] = []
    outputs: list[list[int]] = []
    for _ in range(9):
        earlier = rng.choice(outputs) if outputs else []
        prompts.append(repetitive(rng, rng.randint(5, 40), alphabet, earlier))
        outputs.append(repetitive(rng, rng.randint(20, 70), alphabet, prompts[-1] + earlier))
    prop = SuffixProposer(max_depth=D, max_cached_requests=3, min_token_prob=0.1, use_tree_spec=tree_mode)
    drafted = replay_against_oracle(prop, prompts, outputs, 3, k, 3, rng, min_prob=0.1, tree=tree_mode)
    assert drafted > 100


TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "data",
                     "humaneval_trace.json")


@pytest.mark.usefixtures("proposer_backend")
@pytest.mark.parametrize("tree_mode", [False, True])
def test_proposer_matches_oracle_on_real_trace(tree_mode):
    """A slice of benchmarks/data/humaneval_trace.json (HumanEval prompts, SmolLM2's answers)."""
    with open(TRACE) as f:
        data = json.load(f)
    prompts, outputs = data["prompts"][:5], [o[:50] for o in data["outputs"][:5]]
    prop = SuffixProposer(max_depth=16, max_cached_requests=2, use_tree_spec=tree_mode)
    drafted = replay_against_oracle(prop, prompts, outputs, 2, 12, 2, random.Random(3), tree=tree_mode)
    assert drafted > 50
