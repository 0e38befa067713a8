"""Tests of the host-side KV page allocator and its prefix cache."""
from __future__ import annotations

import collections
import hashlib
import random
import struct

import numpy as np
import pytest

from arctic_jax.engine.page_allocator import OutOfPagesError, PageAllocator, page_hashes


def _snapshot(a: PageAllocator):
    """Everything that defines the allocator's state (white-box, to prove 'unchanged')."""
    return (list(a._refcount), list(a._free), list(a._evictable), dict(a._cached),
            dict(a._page_hash), a._num_used, a._evictions, a.stats())


def _oracle_hashes(tokens, ps):
    """Independent re-statement of the documented chain hash."""
    out, h = [], b""
    for i in range(len(tokens) // ps):
        data = b"".join(struct.pack("<i", t) for t in tokens[i * ps:(i + 1) * ps])
        h = hashlib.blake2b(h + data, digest_size=32).digest()
        out.append(h)
    return out


def _rand_tokens(rng, n, vocab=50_000):
    return [rng.randrange(vocab) for _ in range(n)]


def _cached_chain(seed, num_pages, page_size, num_tokens, **kwargs):
    """An allocator holding one sequence of random tokens in registered pages
    (the last page partial unless num_tokens fills it); returns (allocator, tokens, pages)."""
    a = PageAllocator(num_pages, page_size, **kwargs)
    toks = _rand_tokens(random.Random(seed), num_tokens)
    pages = a.allocate(-(-num_tokens // page_size))
    a.register_full_pages(pages, toks)
    return a, toks, pages


# --------------------------------------------------------------------- hashing

def test_page_hashes_match_oracle_and_are_chained():
    rng = random.Random(0)
    toks = _rand_tokens(rng, 23)
    ps = 4
    got = page_hashes(toks, ps)
    assert got == _oracle_hashes(toks, ps)
    assert len(got) == 5 and len(set(got)) == 5
    # Same page content under a different prefix hashes differently.
    other = list(toks)
    other[0] += 1
    h2 = page_hashes(other, ps)
    assert all(a != b for a, b in zip(got, h2, strict=True))
    # Resuming from a parent hash continues the same chain.
    assert page_hashes(toks[8:20], ps, parent=got[1]) == got[2:5]
    # numpy input hashes the same as a list.
    assert page_hashes(np.asarray(toks, np.int64), ps) == got


def test_bad_tokens_fail_loudly():
    a = PageAllocator(8, 4)
    with pytest.raises(ValueError, match="integers"):
        a.match_prefix([1.5, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError, match="int32"):
        a.match_prefix([1, 2, 3, 2 ** 31, 5])
    with pytest.raises(ValueError, match="at least one token"):
        a.match_prefix([])


def test_constructor_and_argument_validation():
    with pytest.raises(ValueError):
        PageAllocator(4, 0)
    with pytest.raises(ValueError):
        PageAllocator(4, 4, reserved_pages=4)
    with pytest.raises(ValueError):
        PageAllocator(4, 4, reserved_pages=-1)
    a = PageAllocator(6, 4, reserved_pages=1)
    with pytest.raises(ValueError):
        a.allocate(-1)
    assert a.allocate(0) == []
    with pytest.raises(ValueError, match="outside"):
        a.free([6])
    pages = a.allocate(2)
    with pytest.raises(ValueError, match="start_page"):
        a.register_full_pages(pages, list(range(8)), start_page=3)
    with pytest.raises(ValueError, match="only 2 pages"):
        a.register_full_pages(pages, list(range(12)))
    a.check_invariants()


# ------------------------------------------------------------ basic allocation

def test_reserved_pages_never_returned():
    a = PageAllocator(10, 2, reserved_pages=3)
    assert a.num_free() == 7
    pages = a.allocate(7)
    assert sorted(pages) == list(range(3, 10))
    with pytest.raises(OutOfPagesError):
        a.allocate(1)
    with pytest.raises(ValueError, match="outside allocatable"):
        a.free([0])
    a.free(pages)
    a.check_invariants()
    # Reserved pages never appear through eviction either.
    toks = list(range(14))
    pages = a.allocate(7)
    a.register_full_pages(pages, toks)
    a.free(pages)
    again = a.allocate(7)
    assert sorted(again) == list(range(3, 10))
    a.check_invariants()


def test_out_of_pages_leaves_state_unchanged():
    a = PageAllocator(9, 4, reserved_pages=1)
    p1 = a.allocate(3)
    a.register_full_pages(p1, list(range(12)))
    a.free(p1)                     # 3 evictable
    p2 = a.allocate(2)             # from the free list
    before = _snapshot(a)
    assert a.num_free() == 6
    with pytest.raises(OutOfPagesError, match="requested 7"):
        a.allocate(7)
    assert _snapshot(a) == before
    a.check_invariants()
    assert len(a.allocate(6)) == 6   # exactly what was reported free
    a.free(p2)


def test_double_free_raises_and_changes_nothing():
    a = PageAllocator(6, 4)
    p = a.allocate(2)
    a.free([p[0]])
    before = _snapshot(a)
    with pytest.raises(ValueError, match="double free"):
        a.free([p[0]])
    with pytest.raises(ValueError, match="double free"):
        a.free([p[1], p[1]])          # refcount 1, freed twice in one call
    assert _snapshot(a) == before
    a.check_invariants()
    # Double free of a cached (evictable) page is caught too.
    q = a.allocate(1)
    a.register_full_pages(q, [1, 2, 3, 4])
    a.free(q)
    assert a.is_cached(q[0]) and a.refcount(q[0]) == 0
    with pytest.raises(ValueError, match="double free"):
        a.free(q)
    a.check_invariants()


def test_usage_and_stats_values():
    a = PageAllocator(11, 4, reserved_pages=1)
    assert a.usage() == 0.0
    pages = a.allocate(5)
    assert a.usage() == pytest.approx(0.5)
    toks = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]   # 2 full pages + 3 tokens
    a.register_full_pages(pages, toks)
    s = a.stats()
    assert s["num_used_pages"] == 5 and s["num_free_pages"] == 5
    assert s["num_cached_pages"] == 2 and s["num_evictable_pages"] == 0
    assert s["query_tokens"] == 0 and s["hit_rate"] == 0.0
    matched, n = a.match_prefix(toks + [99])            # 12 tokens: both full pages reusable
    assert matched == pages[:2] and n == 8
    matched2, n2 = a.match_prefix([7, 8, 9, 10, 1, 1])  # first page only
    assert matched2 == pages[:1] and n2 == 4
    s = a.stats()
    assert s["query_tokens"] == 18 and s["hit_tokens"] == 12
    assert s["hit_rate"] == pytest.approx(12 / 18)
    assert a.usage() == pytest.approx(0.5)              # shared pages count once
    assert a.refcount(pages[0]) == 3 and a.refcount(pages[1]) == 2
    a.free(pages)
    a.free(matched)
    a.free(matched2)
    s = a.stats()
    assert s["num_used_pages"] == 0 and s["usage"] == 0.0
    assert s["num_evictable_pages"] == 2 and s["num_free_pages"] == 10
    a.check_invariants()


# ----------------------------------------------------------------- prefix cache

def _admit(a: PageAllocator, toks):
    """Scheduler-like admission: match, allocate the rest, register after 'prefill'."""
    matched, n = a.match_prefix(toks)
    fresh = a.allocate(-(-len(toks) // a.page_size) - len(matched))
    pages = matched + fresh
    a.register_full_pages(pages, toks, start_page=len(matched))
    a.check_invariants()
    return pages, matched, n


def test_shared_system_prompt():
    rng = random.Random(1)
    a = PageAllocator(32, 4, reserved_pages=1)
    system = _rand_tokens(rng, 10)                      # 2 full pages + 2 tokens
    pa, ma, na = _admit(a, system + _rand_tokens(rng, 5))
    assert ma == [] and na == 0
    pb, mb, nb = _admit(a, system + _rand_tokens(rng, 7))
    assert mb == pa[:2] and nb == 8                     # the partial third page is not shared
    assert pb[2] != pa[2]
    pc, mc, nc = _admit(a, system + _rand_tokens(rng, 1))
    assert mc == pa[:2] and nc == 8
    assert a.refcount(pa[0]) == 3 and a.refcount(pa[2]) == 1


def test_partial_page_not_matched_until_full():
    a, toks, pages = _cached_chain(2, 16, 4, 10)
    longer = toks + _rand_tokens(random.Random(12), 6)
    m, n = a.match_prefix(longer)
    assert m == pages[:2] and n == 8
    a.free(m)
    # Decode fills the third page; registering incrementally makes it matchable.
    toks += longer[10:12]
    a.register_full_pages(pages, toks, start_page=2)
    m, n = a.match_prefix(longer)
    assert m == pages and n == 12
    assert a._page_hash[pages[2]] == _oracle_hashes(toks, 4)[2]
    a.free(m)
    a.check_invariants()


def test_divergent_token_stops_chain():
    a, toks, pages = _cached_chain(3, 16, 4, 17)
    for pos, expect_pages in [(0, 0), (3, 0), (4, 1), (9, 2), (15, 3)]:
        other = list(toks)
        other[pos] = (other[pos] + 1) % 50_000
        m, n = a.match_prefix(other)
        assert m == pages[:expect_pages] and n == 4 * expect_pages, pos
        a.free(m)
    # Same tokens as a later page but at a different position: no match.
    m, n = a.match_prefix(toks[4:])
    assert m == [] and n == 0
    a.check_invariants()


def test_match_never_covers_whole_input():
    a, toks, pages = _cached_chain(4, 16, 4, 12)
    for length, expect in [(12, 2), (9, 2), (8, 1), (5, 1), (4, 0), (1, 0)]:
        m, n = a.match_prefix(toks[:length])
        assert n < length
        assert m == pages[:expect] and n == 4 * expect, length
        a.free(m)
    a.check_invariants()


def test_match_revives_evictable_pages():
    a, toks, pages = _cached_chain(5, 6, 4, 9)
    a.free(pages)
    assert a.num_free() == 6 and a.usage() == 0.0
    assert not a.is_cached(pages[2]) and a.refcount(pages[2]) == 0   # partial page went back to free list
    m, n = a.match_prefix(toks)
    assert m == pages[:2] and n == 8
    assert a.num_free() == 4 and a.usage() == pytest.approx(2 / 6)
    # Revived pages cannot be evicted by allocation.
    rest = a.allocate(4)
    assert not set(rest) & set(m)
    with pytest.raises(OutOfPagesError):
        a.allocate(1)
    a.free(m)
    a.free(rest)
    a.check_invariants()


def test_duplicate_registration_keeps_first_mapping():
    rng = random.Random(6)
    a = PageAllocator(12, 4)
    toks = _rand_tokens(rng, 9)
    # Two identical prompts computed concurrently, before either registered.
    pa = a.allocate(3)
    pb = a.allocate(3)
    a.register_full_pages(pa, toks)
    a.register_full_pages(pb, toks)
    assert a.stats()["num_cached_pages"] == 2
    assert a.is_cached(pa[0]) and not a.is_cached(pb[0])
    m, n = a.match_prefix(toks)
    assert m == pa[:2] and n == 8
    a.free(m)
    a.free(pb)                                  # duplicates go straight back to the free list
    assert a.stats()["num_evictable_pages"] == 0
    a.free(pa)
    assert a.stats()["num_evictable_pages"] == 2
    a.check_invariants()


def test_register_conflicting_content_raises():
    a, toks, pages = _cached_chain(7, 8, 4, 8)
    before = _snapshot(a)
    wrong = list(toks)
    wrong[1] += 1
    with pytest.raises(ValueError, match="different content"):
        a.register_full_pages(pages, wrong)
    with pytest.raises(ValueError, match="different content"):
        a.register_full_pages([pages[0], pages[0]], toks)   # one page twice in a table
    assert _snapshot(a) == before
    a.free(pages)
    with pytest.raises(ValueError, match="not allocated"):
        a.register_full_pages(pages, toks)
    a.check_invariants()


def test_lru_eviction_order():
    a = PageAllocator(7, 2, reserved_pages=1)          # 6 allocatable
    seqs = {}
    for name, base in zip("abcd", (10, 20, 30, 40), strict=True):
        toks = [base, base + 1]
        p = a.allocate(1)
        a.register_full_pages(p, toks)
        seqs[name] = (p, toks)
    for name in "cadb":                                # free order = LRU order
        a.free(seqs[name][0])
    assert a.num_free() == 6
    first = a.allocate(2)                              # free list first: nothing evicted
    assert not {seqs[n][0][0] for n in "abcd"} & set(first)
    assert a.stats()["num_evictions"] == 0
    evicted = a.allocate(2)
    assert evicted == [seqs["c"][0][0], seqs["a"][0][0]]
    assert a.stats()["num_evictions"] == 2
    for name, hit in zip("abcd", (False, True, False, True), strict=True):
        m, n = a.match_prefix(seqs[name][1] + [0])
        assert (n == 2) == hit, name
        a.free(m)                                      # re-freeing makes b, d most recent again
    a.check_invariants()


def test_free_releases_tail_pages_first():
    a, toks, pages = _cached_chain(8, 4, 2, 8)
    a.free(pages)
    # The tail page is evicted first, so the head of the chain stays matchable longest.
    got = a.allocate(1)
    assert got == [pages[3]]
    m, n = a.match_prefix(toks)
    assert m == pages[:3] and n == 6
    a.free(m)
    a.free(got)
    a.check_invariants()


def test_prefix_caching_disabled():
    a, toks, pages = _cached_chain(9, 6, 4, 9, enable_prefix_caching=False)
    assert a.match_prefix(toks) == ([], 0)
    a.free(pages)
    s = a.stats()
    assert s["num_cached_pages"] == 0 and s["num_evictable_pages"] == 0
    assert s["query_tokens"] == 9 and s["hit_tokens"] == 0
    a.check_invariants()


# --------------------------------------------------------------- stress test

class _Model:
    """Expected allocator state, kept with exact token tuples instead of hashes."""

    def __init__(self, num_pages, ps, reserved):
        self.ps, self.reserved = ps, reserved
        self.rc = {p: 0 for p in range(reserved, num_pages)}
        self.free = set(self.rc)
        self.lru = collections.OrderedDict()     # evictable, oldest first
        self.cached = {}                          # prefix tuple -> canonical page
        self.content = {}                         # page -> prefix tuple it holds
        self.queries = self.hits = 0

    def canonical(self, p):
        c = self.content.get(p)
        return c is not None and self.cached.get(c) == p

    def release(self, pages):
        for p in reversed(pages):
            assert self.rc[p] > 0
            self.rc[p] -= 1
            if self.rc[p] == 0:
                if self.canonical(p):
                    self.lru[p] = None
                else:
                    self.content.pop(p, None)
                    self.free.add(p)

    def expected_match(self, toks):
        out = []
        for i in range((len(toks) - 1) // self.ps):
            p = self.cached.get(tuple(toks[:(i + 1) * self.ps]))
            if p is None:
                break
            out.append(p)
        return out

    def register(self, pages, toks, start):
        for i in range(start, len(toks) // self.ps):
            prefix, p = tuple(toks[:(i + 1) * self.ps]), pages[i]
            assert self.content.get(p, prefix) == prefix
            self.content[p] = prefix
            self.cached.setdefault(prefix, p)


def _compare(a: PageAllocator, m: _Model, live):
    a.check_invariants()
    held = collections.Counter(p for r in live.values() for p in r["pages"])
    for p, c in m.rc.items():
        assert a.refcount(p) == c == held[p], p
        assert a.is_cached(p) == m.canonical(p), p
    assert a.num_free() == len(m.free) + len(m.lru)
    assert list(a._evictable) == list(m.lru)
    s = a.stats()
    assert s["num_cached_pages"] == len(m.cached)
    assert s["query_tokens"] == m.queries and s["hit_tokens"] == m.hits
    used = sum(1 for c in m.rc.values() if c)
    assert a.usage() == pytest.approx(used / len(m.rc))


@pytest.mark.parametrize("seed, ps, num_pages, reserved", [
    (0, 2, 14, 1), (1, 3, 20, 0), (2, 4, 24, 2), (3, 1, 10, 1), (4, 2, 40, 1)])
def test_random_stress_against_model(seed, ps, num_pages, reserved):
    rng = random.Random(seed)
    a = PageAllocator(num_pages, ps, reserved_pages=reserved)
    m = _Model(num_pages, ps, reserved)
    vocab = 3
    systems = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 3 * ps + 1))] for _ in range(3)]
    live = {}          # rid -> {"tokens", "pages", "computed", "registered"}
    next_rid = 0
    counts = collections.Counter()

    def grab(n):
        """Allocate n pages and check them against the model (free list first, then LRU)."""
        free_before, lru_before = set(m.free), list(m.lru)
        got = a.allocate(n)
        assert len(got) == len(set(got)) == n
        assert all(m.rc[p] == 0 for p in got)          # never handed out while in use
        k = sum(1 for p in got if p in m.lru)
        if k:
            assert set(got[:n - k]) == free_before     # the free list was exhausted first
            assert got[n - k:] == lru_before[:k]       # then the least recently freed
            counts["evict"] += 1
        else:
            assert set(got) <= free_before
        for p in got:
            if p in m.lru:
                del m.lru[p]
                del m.cached[m.content.pop(p)]
            m.free.discard(p)
            m.rc[p] = 1
        return got

    for _ in range(1500):
        op = rng.random()
        if op < 0.3 or not live:                                       # admit a request
            toks = rng.choice(systems) + [rng.randrange(vocab) for _ in range(rng.randrange(1, 3 * ps + 2))]
            want = m.expected_match(toks)
            got, n = a.match_prefix(toks)
            assert got == want and n == len(want) * ps and n < len(toks)
            m.queries += len(toks)
            m.hits += n
            for p in got:
                m.lru.pop(p, None)
                m.rc[p] += 1
            counts["hit"] += bool(got)
            need = -(-len(toks) // ps) - len(got)
            before = _snapshot(a)
            if need > a.num_free():
                with pytest.raises(OutOfPagesError):
                    a.allocate(need)
                assert _snapshot(a) == before
                a.free(got)
                m.release(got)
                counts["oom"] += 1
            else:
                pages = got + grab(need)
                live[next_rid] = {"tokens": toks, "pages": pages, "computed": n, "registered": len(got)}
                next_rid += 1
        elif op < 0.55:                                                # prefill chunk or decode step
            r = live[rng.choice(list(live))]
            toks = r["tokens"]
            if r["computed"] == len(toks):                             # decode: append a token
                toks.append(rng.randrange(vocab))
                if len(toks) > len(r["pages"]) * ps:
                    if a.num_free() == 0:
                        toks.pop()
                        continue
                    r["pages"] += grab(1)
                r["computed"] += 1
            else:
                r["computed"] += rng.randrange(1, len(toks) - r["computed"] + 1)
            start = 0 if rng.random() < 0.2 else r["registered"]       # sometimes re-register all
            a.register_full_pages(r["pages"], toks[:r["computed"]], start_page=start)
            m.register(r["pages"], toks[:r["computed"]], start)
            r["registered"] = r["computed"] // ps
        elif op < 0.85:                                                # finish / abort
            r = live.pop(rng.choice(list(live)))
            a.free(r["pages"])
            m.release(r["pages"])
        else:                                                          # a bug: double free
            idle = [p for p, c in m.rc.items() if c == 0]
            if idle:
                before = _snapshot(a)
                with pytest.raises(ValueError, match="double free"):
                    a.free([rng.choice(idle)])
                assert _snapshot(a) == before
        _compare(a, m, live)

    # The stress run must actually have exercised hits, evictions and exhaustion.
    assert counts["hit"] > 20 and counts["evict"] > 5 and counts["oom"] > 0, counts
    for r in live.values():
        a.free(r["pages"])
        m.release(r["pages"])
    live.clear()
    _compare(a, m, live)
    assert a.num_free() == num_pages - reserved and a.usage() == 0.0
    everything = a.allocate(num_pages - reserved)
    assert sorted(everything) == list(range(reserved, num_pages))
    assert a.stats()["num_cached_pages"] == 0
    a.free(everything)
    a.check_invariants()


def test_incremental_registration_hashes_only_new_tokens(monkeypatch):
    import arctic_jax.engine.page_allocator as mod
    hashed = []
    real = mod.page_hashes

    def spy(tokens, page_size, num_pages=None, parent=b""):
        hashed.append(len(tokens))
        return real(tokens, page_size, num_pages, parent)

    monkeypatch.setattr(mod, "page_hashes", spy)
    ps = 4
    a, toks, pages = _cached_chain(10, 40, ps, 4 * ps)
    rng = random.Random(11)
    for _ in range(16 * ps):                     # decode, registering each page as it fills
        toks.append(rng.randrange(50_000))
        if len(toks) > len(pages) * ps:
            pages += a.allocate(1)
        if len(toks) % ps == 0:
            a.register_full_pages(pages, toks, start_page=len(toks) // ps - 1)
    assert hashed == [4 * ps] + [ps] * 16        # each call hashes only its new page
    for i, h in enumerate(_oracle_hashes(toks, ps)):
        assert a._cached[h] == pages[i]
    a.check_invariants()
