"""Tree attention (speculative tree verification): each token of a token-tree chunk sees the
cached context plus its own ancestors. The reference attention and the Pallas kernels
(interpret mode here; compiled on a GPU in ``TestTreeAttentionGPU``) against a dense
masked float64 oracle built from the parents directly, not from the lookback bits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.attention import reference as ref_attention
from arctic_jax.attention.pallas import paged_attention_pallas
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch, tree_layout
from pallas_kernels import PrefillConfig

KV_HEADS, GROUP, HEAD_DIM, PAGE = 2, 3, 64, 16


def _random_tree(rng, n: int) -> list[int]:
    """Parents of a random tree of n tokens rooted at token 0 (the request's last token)."""
    return [-1] + [int(rng.integers(0, i)) for i in range(1, n)]


def _chain(n: int, first: int = -1) -> list[int]:
    return [first] + list(range(n - 1))


def _oracle_mask(parents: list[int] | None, n: int, start: int) -> np.ndarray:
    """[n, start + n] which slots each chunk token sees, from the parents."""
    mask = np.zeros((n, start + n), bool)
    mask[:, :start] = True
    for i in range(n):
        if parents is None:
            mask[i, start:start + i + 1] = True
            continue
        j = i
        while j >= 0:
            mask[i, start + j] = True
            j = parents[j]
    return mask


def _oracle(q, kc, vc, chunks, scale):
    """float64 attention of every real token over its sequence's visible slots."""
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    out, t = [], 0
    for c in chunks:
        n = len(c.tokens)
        L = c.start + n
        slots = np.asarray(c.pages)[np.arange(L) // PAGE] * PAGE + np.arange(L) % PAGE
        k = kc.reshape(KV_HEADS, -1, HEAD_DIM)[:, slots]            # [K, L, D]
        v = vc.reshape(KV_HEADS, -1, HEAD_DIM)[:, slots]
        mask = _oracle_mask(None if c.parents is None else list(c.parents), n, c.start)
        qq = q[t:t + n].reshape(n, KV_HEADS, GROUP, HEAD_DIM)
        s = np.einsum("nkgd,kld->nkgl", qq, k) * scale
        s = np.where(mask[:, None, None, :], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(np.einsum("nkgl,kld->nkgd", p, v).reshape(n, -1, HEAD_DIM))
        t += n
    return np.concatenate(out)


def _case(seed: int):
    """A step mixing token trees (with and without recomputed tokens before the last one, one
    of 33 tokens: every lookback bit), a plain prefill chunk on a prefix, and decodes."""
    rng = np.random.default_rng(seed)
    trees = [
        (_random_tree(rng, 13), 30),
        (_chain(3) + [2 + p for p in _random_tree(rng, 9)[1:]], 17),
        (_random_tree(rng, 33), 5),
        (_chain(5), 40),                      # a path written as a tree: plain causal
    ]
    specs = trees + [(None, 40), (None, 1), (None, 1)]
    lens = [len(p) if p is not None else (40 if s == 40 else 1) for p, s in specs]
    starts = [s if p is not None else (0 if n == 40 else int(rng.integers(5, 70))) for (p, s), n
              in zip(specs, lens, strict=True)]
    need = [-(-(s + n) // PAGE) for s, n in zip(starts, lens, strict=True)]
    pages = rng.permutation(sum(need) + 8)
    chunks, used = [], 0
    for (parents, _), s, n, m in zip(specs, starts, lens, need, strict=True):
        chunks.append(SequenceChunk(tokens=list(rng.integers(1, 100, n)), start=s,
                                    pages=list(pages[used:used + m]), parents=parents))
        used += m
    buckets = Buckets.for_limits(max_tokens=256, max_seqs=8, max_pages_per_seq=8)
    batch, _ = build_step_batch(chunks, PAGE, buckets, tree=True)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    num_pages = len(pages)
    shape = (KV_HEADS, num_pages, PAGE, HEAD_DIM)
    kc = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    vc = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    T = batch.tokens.shape[0]
    q = jnp.asarray(rng.standard_normal((T, KV_HEADS * GROUP, HEAD_DIM)), jnp.float32)
    return chunks, batch, q, kc, vc


def test_tree_positions_and_lookback_bits():
    rng = np.random.default_rng(0)
    for n in [1, 2, 20, 33] + [int(x) for x in rng.integers(1, 34, 20)]:
        # a forest: now and then a token hangs off the cached context (parent -1)
        parents = [-1 if rng.random() < 0.1 else p for p in _random_tree(rng, n)]
        depth, bits = tree_layout(parents)
        for i, p in enumerate(parents):
            assert depth[i] == (0 if p < 0 else depth[p] + 1)
            mask = _oracle_mask(parents, len(parents), 40)[i]
            for d in range(1, 33):
                assert bool((int(bits[i]) >> (d - 1)) & 1) == bool(mask[40 + i - d]), (parents, i, d)
    chunks, batch, *_ = _case(1)
    pos = np.asarray(batch.positions)
    first = np.asarray(batch.query_start)
    for s, c in enumerate(chunks[:4]):
        d, _ = tree_layout(c.parents)
        np.testing.assert_array_equal(pos[first[s]:first[s] + len(d)], c.start + d)
    slots = np.asarray(ref_attention.query_slots(batch))
    for s, c in enumerate(chunks):   # slots stay consecutive: KV goes where the tokens are
        np.testing.assert_array_equal(slots[first[s]:first[s] + len(c.tokens)],
                                      c.start + np.arange(len(c.tokens)))


@pytest.mark.parametrize("parents,match", [
    ([-1, 1], "parents must precede"), ([0], "parents must precede"),
    ([-1] + [0] * 34, "lookback bits cover 32")])
def test_bad_trees_fail_loudly(parents, match):
    with pytest.raises(ValueError, match=match):
        tree_layout(parents)
    with pytest.raises(ValueError, match="tree=True"):
        build_step_batch([SequenceChunk(tokens=[1, 2], start=0, pages=[0], parents=[-1, 0])], PAGE,
                         Buckets.for_limits(16, 2, 2))


class TestTreeAttention:
    interpret = True
    tol = 2e-5

    @pytest.mark.parametrize("impl", ["per_token", "per_batch"])
    def test_reference_matches_dense_oracle(self, impl):
        chunks, batch, q, kc, vc = _case(2)
        scale = 1.0 / np.sqrt(HEAD_DIM)
        out = getattr(ref_attention, impl)(q, kc, vc, batch, scale)
        n = sum(len(c.tokens) for c in chunks)
        np.testing.assert_allclose(np.asarray(out[:n]), _oracle(q, kc, vc, chunks, scale),
                                   atol=self.tol, rtol=self.tol)

    @pytest.mark.parametrize("mode,config", [("auto", None), ("prefill", PrefillConfig(16, 16)),
                                             ("decode", None)])
    def test_pallas_matches_dense_oracle(self, mode, config):
        """Blocks of 16 tokens cut the 33-token tree mid-way (the unmasked loop must stop early);
        "decode" is promoted to "mixed" (the decode kernel has no tree mask)."""
        chunks, batch, q, kc, vc = _case(3)
        scale = 1.0 / np.sqrt(HEAD_DIM)
        out = paged_attention_pallas(q, kc, vc, batch, scale, self.interpret, mode=mode,
                                     prefill_config=config)
        n = sum(len(c.tokens) for c in chunks)
        np.testing.assert_allclose(np.asarray(out[:n]), _oracle(q, kc, vc, chunks, scale),
                                   atol=self.tol, rtol=self.tol)
        assert np.all(np.asarray(out[n:]) == 0)

    def test_tree_mask_changes_the_output(self):
        """The oracle is sensitive: ignoring the tree (plain causal) gives different numbers."""
        chunks, batch, q, kc, vc = _case(4)
        scale = 1.0 / np.sqrt(HEAD_DIM)
        plain = [SequenceChunk(c.tokens, c.start, c.pages) for c in chunks]
        n = len(chunks[0].tokens)
        diff = np.abs(_oracle(q, kc, vc, chunks, scale)[:n] - _oracle(q, kc, vc, plain, scale)[:n])
        assert diff.max() > 1e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")
class TestTreeAttentionGPU(TestTreeAttention):
    interpret = False
    tol = 2e-3
