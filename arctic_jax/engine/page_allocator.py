"""Host-side allocator of KV-cache pages, with reference counts and prefix caching.

Pages ``[0, reserved_pages)`` are never handed out (for example a page kept aside as the padding
target of page tables). Every other page is in exactly one state:

* free: refcount 0, no cached content, in the free list (FIFO deque);
* in use: refcount > 0, held by one or more sequences;
* evictable: refcount 0, but its content is the cached copy of a prefix page;
  kept in LRU order (by time freed) and reused only when the free list is empty.

Prefix caching keys a full page by a chain hash over the tokens it holds and
all tokens before it: ``h_i = blake2b(h_{i-1} || int32-LE bytes of page i's
tokens)``, with ``h_{-1}`` empty. A hash maps to one canonical page; a later
page with the same content stays a private (uncached) duplicate.
"""
from __future__ import annotations

import collections
import hashlib
import operator
from collections.abc import Sequence

import numpy as np

_DIGEST_SIZE = 32
_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class OutOfPagesError(RuntimeError):
    """Not enough allocatable pages; nothing was allocated."""


def _token_bytes(tokens: Sequence[int]) -> bytes:
    """Tokens as int32 little-endian bytes; non-integer or out-of-range ids raise."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < _INT32_MIN or hi > _INT32_MAX:
        raise ValueError(f"token ids must fit int32, got range [{lo}, {hi}]")
    return arr.astype("<i4").tobytes()


def page_hashes(tokens: Sequence[int], page_size: int, num_pages: int | None = None,
                parent: bytes = b"") -> list[bytes]:
    """Chain hashes of the first ``num_pages`` full pages of ``tokens`` (default: all full pages).

    ``parent`` is the hash of the page before ``tokens[0]`` (empty at sequence start).
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    data = _token_bytes(tokens)
    full = len(data) // (4 * page_size)
    n = full if num_pages is None else num_pages
    if not 0 <= n <= full:
        raise ValueError(f"num_pages={num_pages} outside [0, {full}] full pages of {len(tokens)} tokens")
    return list(_chain_hashes(data, page_size, n, parent))


def _chain_hashes(data: bytes, page_size: int, num_pages: int, parent: bytes = b""):
    """Yields the chain hash of each of the first ``num_pages`` pages of token bytes ``data``."""
    stride = 4 * page_size
    h = parent
    for i in range(num_pages):
        h = hashlib.blake2b(h + data[i * stride:(i + 1) * stride], digest_size=_DIGEST_SIZE).digest()
        yield h


class PageAllocator:
    """Reference-counted pool of ``num_pages`` KV pages of ``page_size`` tokens each.

    Every operation is O(1) per page touched plus hashing of the tokens involved;
    only ``check_invariants`` (a debug aid) is O(num_pages).
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 reserved_pages: int = 0):
        num_pages, page_size, reserved_pages = (operator.index(num_pages), operator.index(page_size),
                                                operator.index(reserved_pages))
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if reserved_pages < 0:
            raise ValueError(f"reserved_pages must be >= 0, got {reserved_pages}")
        if num_pages <= reserved_pages:
            raise ValueError(f"num_pages={num_pages} leaves no allocatable page after "
                             f"reserved_pages={reserved_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.reserved_pages = reserved_pages
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._refcount = [0] * num_pages
        self._num_used = 0
        self._free: collections.deque[int] = collections.deque(range(reserved_pages, num_pages))
        # Canonical cached pages with refcount 0, oldest-freed first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._cached: dict[bytes, int] = {}      # hash -> canonical page
        self._page_hash: dict[int, bytes] = {}   # page -> hash of its content (canonical or duplicate)
        self._query_tokens = 0
        self._hit_tokens = 0
        self._evictions = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_allocatable(self) -> int:
        """Pages that can ever be handed out (all but the reserved ones)."""
        return self.num_pages - self.reserved_pages

    def num_free(self) -> int:
        """Pages that ``allocate`` can hand out now: free list plus evictable cached pages."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        """Fraction of allocatable pages in use (refcount > 0)."""
        return self._num_used / self.num_allocatable

    def refcount(self, page: int) -> int:
        """Current reference count of ``page``."""
        return self._refcount[self._check_page(page)]

    def is_cached(self, page: int) -> bool:
        """Whether ``page`` is the canonical cached copy of some prefix page."""
        h = self._page_hash.get(self._check_page(page))
        return h is not None and self._cached.get(h) == page

    def stats(self) -> dict:
        """Counters: prefix-cache queries and hits in tokens, cached/evictable/free/used page counts."""
        q, hit = self._query_tokens, self._hit_tokens
        return {
            "num_pages": self.num_pages,
            "reserved_pages": self.reserved_pages,
            "num_allocatable": self.num_allocatable,
            "num_used_pages": self._num_used,
            "num_free_pages": self.num_free(),
            "num_cached_pages": len(self._cached),
            "num_evictable_pages": len(self._evictable),
            "num_evictions": self._evictions,
            "usage": self.usage(),
            "prefix_caching_enabled": self.enable_prefix_caching,
            "query_tokens": q,
            "hit_tokens": hit,
            "hit_rate": hit / q if q else 0.0,
        }

    # -------------------------------------------------------------- alloc/free

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh pages with refcount 1; evicts LRU cached pages only when the free list is empty."""
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        available = self.num_free()
        if n > available:
            raise OutOfPagesError(f"requested {n} pages, only {available} of "
                                  f"{self.num_allocatable} allocatable pages are free")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._cached[self._page_hash.pop(page)]
                self._evictions += 1
            self._refcount[page] = 1
            out.append(page)
        self._num_used += n
        return out

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; raises (changing nothing) if any would go below 0.

        A page reaching refcount 0 becomes evictable if it is a canonical cached page,
        else returns to the free list. Within one call pages are released last to
        first, so a sequence's tail pages (least shared, and whose loss orphans no
        cached descendants) are evicted before its head pages.
        """
        pages = [self._check_page(p) for p in pages]
        drops = collections.Counter(pages)
        for p, k in drops.items():
            if self._refcount[p] < k:
                raise ValueError(f"freeing page {p} {k} time(s) but its refcount is "
                                 f"{self._refcount[p]} (double free)")
        for p in reversed(pages):
            self._refcount[p] -= 1
            if self._refcount[p]:
                continue
            self._num_used -= 1
            h = self._page_hash.get(p)
            if h is not None and self._cached.get(h) == p:
                self._evictable[p] = None
            else:
                self._page_hash.pop(p, None)
                self._free.append(p)

    # ----------------------------------------------------------- prefix cache

    def match_prefix(self, tokens: Sequence[int], count: bool = True) -> tuple[list[int], int]:
        """Longest chain of cached full pages holding a prefix of ``tokens``.

        Takes one reference to each returned page (reviving evictable ones); the
        caller frees them like allocated pages. At least one token is always left
        to compute. Returns (pages, number of tokens they hold). With ``count=False``
        the hit-rate statistics are left to a later ``count_query``.
        """
        matched = self._cached_prefix(tokens)
        if count:
            self._query_tokens += len(tokens)
        for page in matched:
            if self._refcount[page] == 0:
                del self._evictable[page]
                self._num_used += 1
            self._refcount[page] += 1
        hit = len(matched) * self.page_size
        if count:
            self._hit_tokens += hit
        return matched, hit

    def cached_prefix_tokens(self, tokens: Sequence[int]) -> int:
        """Tokens of ``tokens`` that ``match_prefix`` would find cached now.

        Read-only (no references, no statistics): a router on another thread may ask
        it as a hint, and the answer can be stale by the time it is used.
        """
        return len(self._cached_prefix(tokens)) * self.page_size

    def _cached_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Cached pages of the leading full pages of ``tokens``, leaving one token to compute."""
        if len(tokens) == 0:
            raise ValueError("match_prefix needs at least one token")
        data = _token_bytes(tokens)  # validates even with caching off
        if not self.enable_prefix_caching:
            return []
        matched = []
        for h in _chain_hashes(data, self.page_size, (len(tokens) - 1) // self.page_size):
            page = self._cached.get(h)
            if page is None:
                break
            matched.append(page)
        return matched

    def count_query(self, num_tokens: int, num_hit: int) -> None:
        """Record one prefix-cache lookup in the hit-rate statistics."""
        self._query_tokens += num_tokens
        self._hit_tokens += num_hit

    def register_full_pages(self, pages: Sequence[int], tokens: Sequence[int], start_page: int = 0) -> None:
        """Record the full pages ``[start_page, len(tokens) // page_size)`` of a sequence as cached.

        ``pages`` is the sequence's page table and ``tokens`` the tokens whose KV is
        already written into it. A hash already cached on another page keeps that
        mapping. If page ``start_page - 1`` was registered before, its hash seeds
        the chain, so registering page by page during decode costs O(new tokens).
        Raises (changing nothing) if a page is not in use or already holds other content.
        """
        start_page = operator.index(start_page)
        num_full = len(tokens) // self.page_size
        if not 0 <= start_page <= num_full:
            raise ValueError(f"start_page={start_page} outside [0, {num_full}] full pages "
                             f"of {len(tokens)} tokens")
        if len(pages) < num_full:
            raise ValueError(f"{len(tokens)} tokens fill {num_full} pages but only {len(pages)} pages given")
        todo = [self._check_page(p) for p in pages[start_page:num_full]]
        for p in todo:
            if self._refcount[p] == 0:
                raise ValueError(f"registering page {p}, which is not allocated")
        if not self.enable_prefix_caching or not todo:
            return
        parent = b""
        if start_page > 0:
            prev = self._check_page(pages[start_page - 1])
            if self._refcount[prev] == 0:
                raise ValueError(f"page {prev} before start_page is not allocated")
            parent = self._page_hash.get(prev)
        if parent is None:  # unknown parent: hash the chain from the start
            hashes = page_hashes(tokens, self.page_size, num_full)[start_page:]
        else:
            hashes = page_hashes(tokens[start_page * self.page_size:num_full * self.page_size],
                                 self.page_size, parent=parent)
        seen: dict[int, bytes] = {}
        for p, h in zip(todo, hashes, strict=True):
            old = seen.get(p, self._page_hash.get(p))
            if old is not None and old != h:
                raise ValueError(f"page {p} already holds different content than registered now "
                                 f"(page reused in one table, or tokens differ from the computed KV)")
            seen[p] = h
        for p, h in zip(todo, hashes, strict=True):
            self._page_hash[p] = h
            self._cached.setdefault(h, p)

    def forget_cached_pages(self) -> None:
        """Drop every page's cached content (after the KV cache was lost): evictable pages
        return to the free list and no prefix matches until pages are registered again.
        Pages in use stay in use (as private pages)."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._page_hash.clear()

    # ------------------------------------------------------------------ checks

    def _check_page(self, page: int) -> int:
        page = operator.index(page)
        if not self.reserved_pages <= page < self.num_pages:
            raise ValueError(f"page {page} outside allocatable range "
                             f"[{self.reserved_pages}, {self.num_pages})")
        return page

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (O(num_pages); for tests and debug mode)."""
        rc = self._refcount
        assert len(rc) == self.num_pages
        assert all(c >= 0 for c in rc), "negative refcount"
        assert all(rc[p] == 0 for p in range(self.reserved_pages)), "reserved page in use"
        free = list(self._free)
        free_set = set(free)
        assert len(free_set) == len(free), "page twice in the free list"
        evict = set(self._evictable)
        assert not free_set & evict, "page both free and evictable"
        for p in free_set | evict:
            assert self.reserved_pages <= p < self.num_pages, f"reserved/out-of-range page {p} listed free"
            assert rc[p] == 0, f"page {p} is free/evictable with refcount {rc[p]}"
        used = sum(1 for c in rc if c > 0)
        assert used == self._num_used, f"used counter {self._num_used} != {used}"
        assert used + len(free_set) + len(evict) == self.num_allocatable, "page leaked or double-counted"
        for h, p in self._cached.items():
            assert self._page_hash.get(p) == h, f"cached hash of page {p} disagrees with its content hash"
        for p in self._page_hash:
            assert self.reserved_pages <= p < self.num_pages
            assert p not in free_set, f"free page {p} still has a content hash"
            if rc[p] == 0:
                assert p in evict, f"unused page {p} with content hash is not evictable"
        for p in evict:
            assert self._cached.get(self._page_hash.get(p)) == p, f"evictable page {p} is not cached"
        if not self.enable_prefix_caching:
            assert not self._cached and not self._page_hash
        assert 0 <= self._hit_tokens <= self._query_tokens
