"""Rejection-sampling verification of one-hot drafts: the emitted tokens are distributed
exactly as the shaped target distribution (chi-square against a numpy oracle, with
deliberately biased variants that the same test must reject), greedy rows, seeded
reproducibility across batch compositions, and the host-side ``accept_run``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from arctic_jax.sampling import SamplingMode, SamplingParams, SamplingTensors, sample
from arctic_jax.speculative.rejection import NO_DRAFT, accept_run, verify_rows
from oracles import chi2_pvalue

VERIFY = jax.jit(verify_rows, static_argnames=("mode",))
SAMPLE = jax.jit(sample, static_argnames=("num_top_logprobs", "mode"))

V = 16          # vocabulary of the distribution tests
N = 50_000      # draws per distribution test (one compile for all of them)
ALPHA = 1e-4    # chi-square significance: exact variants must pass, biased ones fail
STEP = 7        # step index of the first verified token
KINDS = ["random", "mode", "outside"]   # how a case picks its drafts

PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7": SamplingParams(temperature=0.7),
    "topk5": SamplingParams(temperature=1.0, top_k=5),
    "topp0.8": SamplingParams(temperature=0.7, top_p=0.8),
    "minp0.1": SamplingParams(temperature=1.0, min_p=0.1),
    "all": SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05),
}


# ---------------------------------------------------------------- helpers

def _oracle(logits, params: SamplingParams) -> np.ndarray:
    """The filtered distribution (float64): temperature, then top-k, top-p, min-p."""
    x = np.asarray(logits, np.float64) / params.temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    keep[order[:params.top_k] if params.top_k > 0 else order] = True
    q = np.where(keep, p, 0.0) / p[keep].sum()
    if params.top_p < 1.0:
        kept, cum = np.zeros(len(p), bool), 0.0
        for i in order:
            if keep[i]:
                kept[i] = True
                cum += q[i]
                if cum >= params.top_p:
                    break
        q = np.where(kept, q, 0.0)
        q /= q.sum()
    if params.min_p > 0.0:
        q = np.where(q >= params.min_p * q.max(), q, 0.0)
        q /= q.sum()
    return q


def _rows(params: SamplingParams, n: int, step: int, seed0: int = 0) -> SamplingTensors:
    """``n`` rows of one request's parameters at ``step``, seeds seed0..seed0+n-1."""
    one = SamplingTensors.from_params([params], [step], [0], 1)
    return SamplingTensors(
        temperature=np.repeat(one.temperature, n), top_k=np.repeat(one.top_k, n),
        top_p=np.repeat(one.top_p, n), min_p=np.repeat(one.min_p, n),
        seed=np.arange(seed0, seed0 + n, dtype=np.uint32), step=np.full(n, step, np.int32))


def _drafts(kind: str, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":      # uniform over the vocabulary: mostly wrong, sometimes filtered out
        return rng.integers(0, V, N).astype(np.int32)
    if kind == "mode":
        return np.full(N, int(np.argmax(p)), np.int32)
    assert kind == "outside"  # the least likely token (outside every filter that is on)
    return np.full(N, int(np.argmin(p)), np.int32)


def _case(name: str, kind: str):
    """(logits row, params, oracle p, drafts, verify tokens, accepted, emitted) of one case."""
    rng = np.random.default_rng(sorted(PARAMS).index(name) * 10 + KINDS.index(kind))
    logits = (rng.standard_normal(V) * 1.5).astype(np.float32)
    params = PARAMS[name]
    p = _oracle(logits, params)
    d = _drafts(kind, p, rng)
    tokens, accepted = VERIFY(jnp.asarray(np.tile(logits, (N, 1))), _rows(params, N, STEP),
                              jnp.asarray(d))
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    return logits, params, p, d, tokens, accepted, np.where(accepted, d, tokens)


# ---------------------------------------------------------------- 1. one position

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_emitted_token_is_distributed_as_target(name, kind):
    logits, params, p, d, tokens, accepted, emitted = _case(name, kind)
    assert chi2_pvalue(emitted, p) > ALPHA
    # the acceptance rate is p(d) (binomial, 5 sigma)
    rate = p[d].mean()
    assert abs(accepted.mean() - rate) < 5 * np.sqrt(max(rate * (1 - rate), 1e-12) / N) + 1e-9
    # a filtered-out draft is never accepted; the rejection token is never the draft
    assert not accepted[p[d] == 0].any()
    assert not (tokens[~accepted] == d[~accepted])[p[d[~accepted]] < 1].any()


def test_biased_variants_fail_the_same_test():
    """The chi-square test has the power to catch wrong verifiers (including a 2% error)."""
    _, params, p, d, tokens, accepted, _ = _case("t1", "mode")
    rng = np.random.default_rng(99)
    u = rng.random(N)
    p_d = p[d]
    # accept with sqrt(p(d)) instead of p(d)
    assert chi2_pvalue(np.where(u < np.sqrt(p_d), d, tokens), p) < ALPHA
    # accept 2% more often (absolute) than p(d)
    assert chi2_pvalue(np.where(u < p_d + 0.02, d, tokens), p) < ALPHA
    # on rejection, draw from p itself instead of p with the draft removed (with a
    # uniformly random draft that error happens to cancel out, so the draft is the mode)
    logits, params, p, d, tokens, accepted, emitted = _case("all", "mode")
    plain = np.asarray(SAMPLE(jnp.asarray(np.tile(logits, (N, 1))), _rows(params, N, STEP)).tokens)
    assert chi2_pvalue(emitted, p) > ALPHA
    assert chi2_pvalue(np.where(accepted, d, plain), p) < ALPHA


# ---------------------------------------------------------------- 2. two-token chain

def _chain(params, l1, l2, seed, biased=False):
    """First two emitted tokens of N seeded requests that speculate two random drafts.

    Drafts are drawn from a skewed random distribution (against uniformly random
    drafts the ``biased`` error cancels out).

    Row A verifies d1 against p1; row B (context d1) verifies d2 against p2[d1]. When
    d1 is rejected, the next step verifies a fresh draft e against p2[first] at the
    same step index as row B. ``biased``: rejections draw from p instead of the
    residual (a wrong verifier)."""
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.full(V, 0.5))   # skewed draft source, unrelated to the target
    d1, d2, e = (rng.choice(V, N, p=q).astype(np.int32) for _ in range(3))
    ta, tb = _rows(params, N, STEP), _rows(params, N, STEP + 1)

    def run(logits, t, d):
        tok, acc = VERIFY(jnp.asarray(logits), t, jnp.asarray(d))
        tok, acc = np.asarray(tok), np.asarray(acc)
        if biased:
            tok = np.asarray(SAMPLE(jnp.asarray(logits), t).tokens)
        return tok, acc

    tok_a, acc_a = run(np.tile(l1, (N, 1)), ta, d1)
    first = np.where(acc_a, d1, tok_a)
    tok_b, acc_b = run(l2[d1], tb, d2)
    tok_c, acc_c = run(l2[first], tb, e)
    second = np.where(acc_a, np.where(acc_b, d2, tok_b), np.where(acc_c, e, tok_c))
    return first, second


def test_two_token_joint_distribution_is_exact():
    rng = np.random.default_rng(5)
    l1 = (rng.standard_normal(V) * 1.5).astype(np.float32)
    l2 = (rng.standard_normal((V, V)) * 1.5).astype(np.float32)   # row a: logits after token a
    params = SamplingParams(temperature=0.9, top_k=10, min_p=0.02)
    p1 = _oracle(l1, params)
    joint = p1[:, None] * np.stack([_oracle(l2[a], params) for a in range(V)])
    first, second = _chain(params, l1, l2, seed=11)
    assert chi2_pvalue(first * V + second, joint) > ALPHA
    first, second = _chain(params, l1, l2, seed=11, biased=True)
    assert chi2_pvalue(first * V + second, joint) < ALPHA


def _speculative_decode(params, l0, trans, q, n_tokens, k, seed):
    """First ``n_tokens`` of N seeded requests decoded by chunks of k drafts from ``q``.

    The target is a Markov chain: logits ``l0`` for the first token, ``trans[a]`` after
    token a. Each step every request verifies k + 1 rows [last, d1..dk] (row i at step
    index len(output) + i) and ``accept_run`` picks the emitted tokens."""
    rng = np.random.default_rng(seed)
    out = [[] for _ in range(N)]
    while min(len(o) for o in out) < n_tokens:
        drafts = rng.choice(V, (N, k), p=q).astype(np.int32)
        toks, accs = [], []
        for i in range(k + 1):
            prev = np.array([(o + list(dr[:i]))[-1] if o or i else -1
                             for o, dr in zip(out, drafts, strict=True)])
            logits = np.where(prev[:, None] < 0, l0[None, :], trans[np.maximum(prev, 0)])
            step = np.array([len(o) + i for o in out], np.int32)
            t = _rows(params, N, 0)
            t = SamplingTensors(temperature=t.temperature, top_k=t.top_k, top_p=t.top_p,
                                min_p=t.min_p, seed=t.seed, step=step)
            d = drafts[:, i] if i < k else np.full(N, NO_DRAFT, np.int32)
            tok, acc = VERIFY(jnp.asarray(logits), t, jnp.asarray(d))
            toks.append(np.asarray(tok))
            accs.append(np.asarray(acc))
        toks, accs = np.stack(toks, 1), np.stack(accs, 1)
        for r in range(N):
            out[r] += accept_run(list(drafts[r]), list(toks[r]), list(accs[r]))
    return np.array([o[:n_tokens] for o in out])


def test_three_tokens_through_accept_run_are_exact():
    rng = np.random.default_rng(8)
    l0 = (rng.standard_normal(V) * 1.5).astype(np.float32)
    trans = (rng.standard_normal((V, V)) * 1.5).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    q = rng.dirichlet(np.full(V, 0.5))
    p0 = _oracle(l0, params)
    pt = np.stack([_oracle(trans[a], params) for a in range(V)])
    joint = p0[:, None, None] * pt[:, :, None] * pt[None, :, :]   # p(a) p(b|a) p(c|b)
    seqs = _speculative_decode(params, l0, trans, q, n_tokens=3, k=2, seed=21)
    cells = seqs[:, 0] * V * V + seqs[:, 1] * V + seqs[:, 2]
    assert chi2_pvalue(cells, joint) > ALPHA


# ---------------------------------------------------------------- 3. greedy and reproducibility

def _mixed_rows():
    """Six rows of different requests: params, seed, step, draft (some -1)."""
    return [
        (SamplingParams(temperature=0.0), 1, 3, 4),
        (SamplingParams(temperature=0.8, top_k=6), 2, 10, 9),
        (SamplingParams(temperature=1.2, top_p=0.7), 3, 0, NO_DRAFT),
        (SamplingParams(temperature=0.5, min_p=0.1), 2**32 - 1, 2**31 - 1, 0),
        (SamplingParams(temperature=1.0), 77, 5, NO_DRAFT),
        (SamplingParams(temperature=0.0), 8, 9, NO_DRAFT),
    ]


def _run_rows(logits, rows, mode=SamplingMode.FILTERED):
    t = SamplingTensors.from_params([r[0] for r in rows], [r[2] for r in rows],
                                    [r[1] for r in rows], len(rows))
    d = jnp.asarray(np.array([r[3] for r in rows], np.int32))
    tok, acc = VERIFY(jnp.asarray(logits), t, d, mode=mode)
    return np.asarray(tok), np.asarray(acc)


def test_greedy_rows_accept_exactly_the_argmax():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((6, V)).astype(np.float32)
    top = logits.argmax(-1)
    drafts = [top[0], (top[1] + 1) % V, NO_DRAFT, top[3], (top[4] + 5) % V, top[5]]
    rows = [(SamplingParams(temperature=0.0), i, i, int(drafts[i])) for i in range(6)]
    for mode in SamplingMode:
        tok, acc = _run_rows(logits, rows, mode)
        np.testing.assert_array_equal(tok, top)
        np.testing.assert_array_equal(acc, [True, False, False, True, False, True])
    # greedy rows inside a sampled batch behave the same
    mixed = _mixed_rows()
    logits = rng.standard_normal((6, V)).astype(np.float32)
    mixed[0] = (mixed[0][0], 1, 3, int(logits[0].argmax()))
    tok, acc = _run_rows(logits, mixed)
    assert (tok[0], acc[0]) == (logits[0].argmax(), True)
    assert (tok[5], acc[5]) == (logits[5].argmax(), False)


def test_same_seed_and_step_give_the_same_result_in_any_batch():
    rng = np.random.default_rng(4)
    rows = _mixed_rows()
    logits = (rng.standard_normal((6, V)) * 2).astype(np.float32)
    tok, acc = _run_rows(logits, rows)
    # permuted, with five other rows interleaved
    extra = [(SamplingParams(temperature=0.9, top_k=3), 1000 + i, i, i % 3 - 1) for i in range(5)]
    perm = rng.permutation(11)
    all_rows = rows + extra
    all_logits = np.concatenate([logits, rng.standard_normal((5, V)).astype(np.float32)])
    tok2, acc2 = _run_rows(all_logits[perm], [all_rows[i] for i in perm])
    where = np.argsort(perm)[:6]      # position of each original row in the permuted batch
    np.testing.assert_array_equal(tok2[where], tok)
    np.testing.assert_array_equal(acc2[where], acc)
    # a row without a draft draws exactly the token the plain sampler gives it
    t = SamplingTensors.from_params([r[0] for r in rows], [r[2] for r in rows],
                                    [r[1] for r in rows], 6)
    plain = np.asarray(SAMPLE(jnp.asarray(logits), t).tokens)
    no_draft = np.array([r[3] for r in rows]) == NO_DRAFT
    np.testing.assert_array_equal(tok[no_draft], plain[no_draft])
    assert not acc[no_draft].any()
    # the RANDOM mode gives the same result on rows that use no top-k / top-p
    simple = [rows[i] for i in (0, 3, 4, 5)]
    a = _run_rows(logits[[0, 3, 4, 5]], simple, SamplingMode.RANDOM)
    b = _run_rows(logits[[0, 3, 4, 5]], simple, SamplingMode.FILTERED)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_acceptance_uniform_is_independent_of_the_residual_draw():
    """Across seeds, acceptance (u < p(d)) and the residual token are uncorrelated."""
    _, _, p, d, tokens, accepted, _ = _case("t1", "mode")
    table = np.stack([np.bincount(tokens[accepted], minlength=V),
                      np.bincount(tokens[~accepted], minlength=V)])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > ALPHA


def test_bad_shapes_fail_loudly():
    t = SamplingTensors.from_params([SamplingParams()] * 3, [0] * 3, [0] * 3, 3)
    logits = jnp.zeros((3, V), jnp.float32) + jnp.arange(V, dtype=jnp.float32)
    with pytest.raises(ValueError, match="draft of shape"):
        verify_rows(logits, t, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        verify_rows(logits, t, jnp.zeros((3,), jnp.float32))
    with pytest.raises(ValueError, match="sampling tensors"):
        verify_rows(logits[:2], t, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"\[R, V\]"):
        verify_rows(logits[0], t, jnp.zeros((3,), jnp.int32))


# ---------------------------------------------------------------- 4. accept_run

@pytest.mark.parametrize("drafts, tokens, accepted, want", [
    ([], [5], [False], [5]),                                   # plain row: its sample
    ([1, 2, 3], [9, 8, 7, 6], [False, True, True, False], [9]),  # first draft rejected
    ([1, 2, 3], [9, 8, 7, 6], [True, False, True, False], [1, 8]),
    ([1, 2, 3], [9, 8, 7, 6], [True, True, False, False], [1, 2, 7]),
    ([1, 2, 3], [9, 8, 7, 6], [True, True, True, False], [1, 2, 3, 6]),  # bonus token
    ([4], [4, 0], [True, False], [4, 0]),
])
def test_accept_run(drafts, tokens, accepted, want):
    assert accept_run(drafts, tokens, accepted) == want


def test_accept_run_rejects_bad_input():
    with pytest.raises(ValueError, match="need 3 tokens"):
        accept_run([1, 2], [1, 2], [False, False, False])
    with pytest.raises(ValueError, match="need 2 tokens"):
        accept_run([1], [1, 2], [False])
    with pytest.raises(ValueError, match="last row"):
        accept_run([1], [1, 2], [True, True])
