"""Sampler tests: greedy, seeded reproducibility, empirical distributions
against a numpy oracle, logprobs, and SamplingParams validation."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.sampling import (
    GREEDY_TEMPERATURE,
    MAX_SEED,
    SampleResult,
    SamplingMode,
    SamplingParams,
    SamplingTensors,
    _cutoff_values,
    sample,
)

SAMPLE = jax.jit(sample, static_argnames=("num_top_logprobs", "mode"))

N_DRAWS = 20_000   # rows of one distribution draw (one compile for all of them)
V_SMALL = 8        # vocabulary of the distribution tests

# Chi-square critical values at significance 1e-4, by degrees of freedom.
CHI2_CRIT = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745, 6: 27.856, 7: 29.878}


# ---------------------------------------------------------------- helpers

def _tensors(params, steps, seeds, rows=None):
    return SamplingTensors.from_params(params, steps, seeds, rows or len(params))


def _np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _oracle(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Renormalised distribution after temperature, top-k, top-p, min-p (in that order)."""
    p = _np_softmax(np.asarray(logits, np.float64) / temperature)
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    q = np.array([p[i] if i in keep else 0.0 for i in range(len(p))])
    q /= q.sum()
    if top_p < 1.0:
        kept, cum = set(), 0.0
        for i in order:
            if i not in keep:
                continue
            kept.add(i)
            cum += q[i]
            if cum >= top_p:
                break
        q = np.array([q[i] if i in kept else 0.0 for i in range(len(q))])
        q /= q.sum()
    if min_p > 0.0:
        q = np.where(q >= min_p * q.max(), q, 0.0)
        q /= q.sum()
    return q


def _draw(logits_row, params, seed=0):
    """N_DRAWS tokens from one logits row: all rows share ``params``, steps differ,
    and the seed changes every 1000 rows."""
    logits = jnp.asarray(np.tile(np.asarray(logits_row, np.float32), (N_DRAWS, 1)))
    steps = [i % 1000 for i in range(N_DRAWS)]
    seeds = [seed + i // 1000 for i in range(N_DRAWS)]
    t = _tensors([params] * N_DRAWS, steps, seeds)
    out = SAMPLE(logits, t)
    return np.bincount(np.asarray(out.tokens), minlength=len(logits_row))


def _chi2(counts, q):
    support = q > 0
    expected = counts.sum() * q[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def _assert_matches(counts, q):
    """Counts fit q (chi-square) and no token outside q's support was drawn."""
    assert counts[q == 0].sum() == 0, f"masked tokens drawn: {counts} for q={q}"
    stat, dof = _chi2(counts, q)
    if dof == 0:
        assert counts[q > 0].sum() == counts.sum()
        return
    assert stat < CHI2_CRIT[dof], f"chi2={stat:.1f} dof={dof} counts={counts} q={q}"
    tv = 0.5 * np.abs(counts / counts.sum() - q).sum()
    assert tv < 0.02, f"total variation {tv:.4f}"


@pytest.fixture
def small_logits():
    return np.random.default_rng(11).normal(size=V_SMALL) * 1.2


# ---------------------------------------------------------------- greedy

def test_temperature_zero_is_argmax_whatever_the_filters():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 1000)).astype(np.float32) * 3
    params = [SamplingParams(temperature=0.0, top_k=int(rng.integers(-1, 50)),
                             top_p=float(rng.uniform(0.1, 1.0)), min_p=float(rng.uniform(0, 0.5)))
              for _ in range(16)]
    out = SAMPLE(jnp.asarray(logits), _tensors(params, list(range(16)), list(range(16))))
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))


def test_top_k_one_equals_greedy_in_a_mixed_batch():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 1000)).astype(np.float32) * 0.3   # flat: sampling would differ
    params = [SamplingParams(temperature=1.3, top_k=1) if i % 2 else
              SamplingParams(temperature=0.0) for i in range(16)]
    t = _tensors(params, [int(s) for s in rng.integers(0, 500, 16)],
                 [int(s) for s in rng.integers(0, MAX_SEED, 16)])
    out = SAMPLE(jnp.asarray(logits), t)
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))
    # the same rows without top_k really sample (so the assertion above is meaningful)
    free = [SamplingParams(temperature=1.3) for _ in range(16)]
    out2 = SAMPLE(jnp.asarray(logits), _tensors(free, list(t.step), [int(s) for s in t.seed]))
    assert (np.asarray(out2.tokens) != logits.argmax(-1)).sum() >= 12


def test_mode_for_params_is_the_cheapest_covering_one():
    G, R, F = SamplingMode.GREEDY, SamplingMode.RANDOM, SamplingMode.FILTERED
    greedy = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)   # filters ignored when greedy
    assert SamplingMode.for_params([]) is G
    assert SamplingMode.for_params([greedy, greedy]) is G
    assert SamplingMode.for_params([greedy, SamplingParams(temperature=0.5, min_p=0.1)]) is R
    assert SamplingMode.for_params([SamplingParams(temperature=0.5),
                                    SamplingParams(temperature=1.0, top_p=0.9)]) is F
    assert SamplingMode.for_params([SamplingParams(temperature=1.0, top_k=40), greedy]) is F


@pytest.mark.parametrize("kind", ["greedy", "random"])
def test_every_covering_mode_gives_the_same_tokens(kind):
    """The cheap modes must agree exactly with the full sampler on the rows they cover."""
    rng = np.random.default_rng(11 if kind == "greedy" else 12)
    logits = jnp.asarray(rng.normal(size=(24, 500)).astype(np.float32) * 2)
    if kind == "greedy":
        params = [SamplingParams(temperature=0.0, top_k=int(rng.integers(0, 9))) for _ in range(24)]
    else:
        params = [SamplingParams(temperature=float(rng.uniform(0.3, 1.5)),
                                 min_p=float(rng.choice([0.0, 0.05])))
                  if i % 3 else SamplingParams(temperature=0.0) for i in range(24)]
    t = _tensors(params, [int(s) for s in rng.integers(0, 900, 24)],
                 [int(s) for s in rng.integers(0, MAX_SEED, 24)])
    mode = SamplingMode.for_params(params)
    assert mode is SamplingMode(kind)
    cheap = SAMPLE(logits, t, num_top_logprobs=3, mode=mode)
    full = SAMPLE(logits, t, num_top_logprobs=3, mode=SamplingMode.FILTERED)
    for a, b in zip(jax.tree_util.tree_leaves(cheap), jax.tree_util.tree_leaves(full), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if kind == "random":  # the rows really sampled (not all argmax), so the check has teeth
        assert (np.asarray(full.tokens) != np.asarray(logits).argmax(-1)).sum() >= 4


# ---------------------------------------------------------------- reproducibility

def test_seeded_row_is_independent_of_batch_position_and_neighbours():
    rng = np.random.default_rng(2)
    v = 1000
    target_logits = rng.normal(size=(4, v)).astype(np.float32) * 0.2   # near-uniform
    targets = [SamplingParams(seed=123), SamplingParams(seed=7, top_k=200),
               SamplingParams(seed=MAX_SEED, temperature=0.8, min_p=0.3),
               SamplingParams(seed=0, top_p=0.9)]
    target_steps = [5, 0, 17, 3]

    def run(rows, placement, others):
        """Tokens of the targets placed at ``placement`` {target: row} among ``others``."""
        logits = rng.normal(size=(rows, v)).astype(np.float32)
        params, steps, seeds = [], [], []
        at = {row: j for j, row in placement.items()}
        other = iter(others)
        for r in range(rows):
            if r in at:
                j = at[r]
                logits[r] = target_logits[j]
                params.append(targets[j])
                steps.append(target_steps[j])
                seeds.append(targets[j].seed)
            else:
                params.append(next(other))
                steps.append(int(rng.integers(0, 100)))
                seeds.append(int(rng.integers(0, MAX_SEED)))
        tokens = np.asarray(SAMPLE(jnp.asarray(logits), _tensors(params, steps, seeds)).tokens)
        return {j: int(tokens[row]) for j, row in placement.items()}

    plain = [SamplingParams()] * 16
    mixed = [SamplingParams(temperature=0.0), SamplingParams(top_k=3), SamplingParams(top_p=0.5),
             SamplingParams(temperature=2.0, min_p=0.1)] * 4
    no_sort = run(8, {0: 0, 2: 1}, plain)                  # no row needs the sort
    a = run(8, {0: 0, 1: 1, 2: 2, 3: 3}, plain)
    b = run(8, {0: 6, 1: 4, 2: 7, 3: 5}, mixed)            # rows moved, other neighbours
    c = run(16, {0: 11, 1: 2, 2: 9, 3: 15}, mixed)         # another batch size
    again = run(8, {0: 0, 1: 1, 2: 2, 3: 3}, plain)
    assert a == b == c == again
    assert no_sort == {0: a[0], 2: a[2]}
    # a different step changes the draws (near-uniform over 1000 tokens)
    target_steps[:] = [s + 1 for s in target_steps]
    moved = run(8, {0: 0, 1: 1, 2: 2, 3: 3}, plain)
    assert sum(moved[j] != a[j] for j in a) >= 3


def test_different_seeds_give_different_streams():
    rng = np.random.default_rng(3)
    v, n = 1000, 64
    row = rng.normal(size=v).astype(np.float32) * 0.5
    logits = jnp.asarray(np.tile(row, (2 * n, 1)))
    params = [SamplingParams()] * (2 * n)
    steps = list(range(n)) * 2
    seeds = [1] * n + [2] * n
    tokens = np.asarray(SAMPLE(logits, _tensors(params, steps, seeds)).tokens)
    s1, s2 = tokens[:n], tokens[n:]
    # P(same token) = sum p^2 ~ 1.3e-3 here, so a few matches at most
    assert (s1 == s2).sum() <= 4
    assert len(set(s1.tolist())) > n // 2 and len(set(s2.tolist())) > n // 2


# ---------------------------------------------------------------- distributions

def test_temperature_one_matches_softmax(small_logits):
    counts = _draw(small_logits, SamplingParams(temperature=1.0), seed=100)
    _assert_matches(counts, _oracle(small_logits))
    # the check is sharp enough to reject a slightly different temperature
    stat, dof = _chi2(counts, _oracle(small_logits, temperature=0.9))
    assert stat > CHI2_CRIT[dof]


def test_temperature_half_matches_scaled_softmax(small_logits):
    counts = _draw(small_logits, SamplingParams(temperature=0.5), seed=200)
    _assert_matches(counts, _oracle(small_logits, temperature=0.5))


@pytest.mark.parametrize("top_k", [1, 3, 5, V_SMALL, V_SMALL + 10])
def test_top_k_distribution(small_logits, top_k):
    counts = _draw(small_logits, SamplingParams(top_k=top_k), seed=300 + top_k)
    q = _oracle(small_logits, top_k=top_k)
    assert (q > 0).sum() == min(top_k, V_SMALL)
    _assert_matches(counts, q)


def _sorted_cum(q):
    return np.cumsum(np.sort(q)[::-1])


@pytest.mark.parametrize("keep", [1, 2, 4])
def test_top_p_distribution(small_logits, keep):
    cum = _sorted_cum(_oracle(small_logits))
    lo = cum[keep - 2] if keep >= 2 else 0.0
    top_p = float((lo + cum[keep - 1]) / 2)          # keeps exactly `keep` tokens
    q = _oracle(small_logits, top_p=top_p)
    assert (q > 0).sum() == keep
    _assert_matches(_draw(small_logits, SamplingParams(top_p=top_p), seed=400 + keep), q)


def test_top_p_applies_to_the_top_k_renormalised_distribution(small_logits):
    # top_p chosen so that top-p on the renormalised top-4 keeps 3 tokens, while
    # top-p on the raw softmax would keep all 4
    p = _oracle(small_logits)
    cum_raw = _sorted_cum(p)
    cum_k = _sorted_cum(_oracle(small_logits, top_k=4))
    top_p = float((cum_k[2] + max(cum_k[1], cum_raw[2])) / 2)
    assert cum_k[1] < top_p <= cum_k[2] and cum_raw[2] < top_p
    q = _oracle(small_logits, top_k=4, top_p=top_p)
    assert (q > 0).sum() == 3
    _assert_matches(_draw(small_logits, SamplingParams(top_k=4, top_p=top_p), seed=500), q)


@pytest.mark.parametrize("keep", [1, 3, 6])
def test_min_p_distribution(small_logits, keep):
    ratios = np.sort(_oracle(small_logits))[::-1] / _oracle(small_logits).max()
    min_p = float((ratios[keep - 1] + ratios[keep]) / 2)   # keeps exactly `keep` tokens
    q = _oracle(small_logits, min_p=min_p)
    assert (q > 0).sum() == keep
    _assert_matches(_draw(small_logits, SamplingParams(min_p=min_p), seed=600 + keep), q)


def test_all_filters_with_temperature(small_logits):
    temp = 0.7
    base = _oracle(small_logits, temperature=temp)
    cum_k = _sorted_cum(_oracle(small_logits, temperature=temp, top_k=6))
    top_p = float((cum_k[3] + cum_k[4]) / 2)                # top-p keeps 5 of the 6
    ratios = np.sort(base)[::-1] / base.max()
    min_p = float((ratios[3] + ratios[4]) / 2)             # min-p keeps 4 of the 5
    q = _oracle(small_logits, temperature=temp, top_k=6, top_p=top_p, min_p=min_p)
    assert (q > 0).sum() == 4
    params = SamplingParams(temperature=temp, top_k=6, top_p=top_p, min_p=min_p)
    _assert_matches(_draw(small_logits, params, seed=700), q)


def test_filters_never_emit_masked_tokens_at_large_vocab():
    rng = np.random.default_rng(4)
    r, v = 64, 4096
    logits = rng.normal(size=(r, v)).astype(np.float32) * 2
    params = [SamplingParams(top_k=int(rng.integers(1, 20)), seed=i) if i % 3 == 0 else
              SamplingParams(top_p=float(rng.uniform(0.05, 0.5)), seed=i) if i % 3 == 1 else
              SamplingParams(min_p=float(rng.uniform(0.05, 0.5)), seed=i) for i in range(r)]
    tokens = np.asarray(SAMPLE(jnp.asarray(logits),
                               _tensors(params, list(range(r)), list(range(r)))).tokens)
    for i, p in enumerate(params):
        q = _oracle(logits[i], top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
        assert q[tokens[i]] > 0, f"row {i}: token {tokens[i]} is masked under {p}"


# ---------------------------------------------------------------- logprobs

def test_logprobs_match_numpy():
    rng = np.random.default_rng(5)
    r, v, n = 8, 512, 5
    logits = rng.normal(size=(r, v)).astype(np.float32) * 2
    params = [SamplingParams(temperature=[0.0, 0.5, 1.0, 1.5][i % 4], top_k=[0, 10][i % 2],
                             logprobs=n) for i in range(r)]
    t = _tensors(params, list(range(r)), [int(s) for s in rng.integers(0, 1000, r)])
    out = SAMPLE(jnp.asarray(logits), t, num_top_logprobs=n)
    ref = _np_log_softmax(logits)
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.logprob), ref[np.arange(r), tokens],
                               rtol=0, atol=1e-5)
    top = np.argsort(-logits, axis=-1)[:, :n]
    np.testing.assert_array_equal(np.asarray(out.top_ids), top)
    np.testing.assert_allclose(np.asarray(out.top_logprobs),
                               np.take_along_axis(ref, top, axis=-1), rtol=0, atol=1e-5)
    plain = SAMPLE(jnp.asarray(logits), t)
    assert plain.top_ids is None and plain.top_logprobs is None
    np.testing.assert_array_equal(np.asarray(plain.tokens), tokens)
    np.testing.assert_allclose(np.asarray(plain.logprob), ref[np.arange(r), tokens],
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------- structure / errors

def _primitives(jaxpr, out=None):
    """Every primitive name of a jaxpr, recursively."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for v in eqn.params.values():
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                sub = x.jaxpr if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns") else x
                if hasattr(sub, "eqns"):
                    _primitives(sub, out)
    return out


@pytest.mark.parametrize("mode", list(SamplingMode))
def test_only_the_filtered_mode_searches_and_only_sampling_modes_draw(mode):
    """The top-k / top-p cut-off is this backend's method (``cutoff_method``: an unrolled
    bisection on a CPU, a sort of [R, V] elsewhere), only in the filtered mode, and no mode loops
    or branches on the device (that would make the host wait on a GPU)."""
    from arctic_jax.sampling import cutoff_method

    logits = jnp.asarray(np.random.default_rng(6).normal(size=(4, 64)), jnp.float32)
    t = _tensors([SamplingParams(top_k=3)] * 4, [0] * 4, [0] * 4)
    prims = _primitives(jax.make_jaxpr(lambda x, tt: sample(x, tt, mode=mode))(logits, t).jaxpr)
    filtered = mode is SamplingMode.FILTERED
    bisects = cutoff_method(jax.default_backend()) == "bisect"
    assert ("shift_right_arithmetic" in prims) == (filtered and bisects)   # the halvings
    assert ("sort" in prims) == (filtered and not bisects)
    assert ("random_bits" in prims or "threefry2x32" in prims) == (mode is not SamplingMode.GREEDY)
    assert not {"cond", "while", "scan"} & set(prims)


def _sorted_prefix_cutoff(scaled: np.ndarray, top_k: int, top_p: float) -> float:
    """The definition, in float64 numpy: sort descending; keep the first k and every token tied
    with the k-th; renormalise; keep the prefix whose exclusive cumulative probability is below
    top_p (all of it at top_p >= 1); return the last kept value."""
    srt = np.sort(scaled.astype(np.float64))[::-1]
    k = len(srt) if top_k <= 0 or top_k > len(srt) else top_k
    k = int(np.sum(srt >= srt[k - 1]))
    probs = np.exp(srt[:k] - srt[0])
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    n = k if top_p >= 1.0 else max(int(np.sum(before < top_p)), 1)
    return float(srt[n - 1])


@pytest.mark.parametrize("method", ["bisect", "sort"])
def test_cutoff_equals_the_sorted_prefix_rule_on_random_rows(method):
    """Random rows (widths 2 to 4999, scales 0.05..8, with and without ties) and random top-k /
    top-p against the sort-based definition; a cut-off off by one token would fail it."""
    rng = np.random.default_rng(11)
    cutoff = jax.jit(functools.partial(_cutoff_values, method=method))
    for trial in range(40):
        rows, width = 6, (2, 37, 1000, 4999)[trial % 4 if trial % 8 < 4 else 3 - trial % 4]
        scaled = rng.standard_normal((rows, width)) * rng.uniform(0.05, 8.0)
        if trial % 4 == 0:
            scaled = np.round(scaled, 1)                       # many exact ties
        scaled = scaled.astype(np.float32)
        top_k = rng.choice([0, -1, 1, 2, 7, 100, width, width + 5], rows).astype(np.int32)
        top_p = rng.choice([1.0, 0.95, 0.8, 0.5, 0.1, 1e-4], rows).astype(np.float32)
        got = np.asarray(cutoff(jnp.asarray(scaled), jnp.asarray(top_k), jnp.asarray(top_p)))
        other = "sort" if method == "bisect" else "bisect"
        np.testing.assert_array_equal(got, np.asarray(_cutoff_values(
            jnp.asarray(scaled), jnp.asarray(top_k), jnp.asarray(top_p), other)), err_msg=str(trial))
        for r in range(rows):
            want = _sorted_prefix_cutoff(scaled[r], int(top_k[r]), float(top_p[r]))
            assert float(got[r]) == want, (trial, r, top_k[r], top_p[r])


@pytest.mark.parametrize("method", ["bisect", "sort"])
def test_tokens_tied_with_the_kth_stay_in_the_top_p_mass(method):
    """[3, 2, 2, 2] with top-k 2: the three 2s tie with the 2nd, so all stay in and top-p 0.6 is
    measured over all four (p(3) = 0.48 < 0.6: the cut-off is 2, all four kept); a positional
    top-k would renormalise over [3, 2] alone (p(3) = 0.73 >= 0.6: only 3 kept)."""
    scaled = jnp.asarray([[3.0, 2.0, 2.0, 2.0]], jnp.float32)
    cut = _cutoff_values(scaled, jnp.array([2]), jnp.array([0.6], jnp.float32), method)
    assert float(cut[0]) == 2.0
    with pytest.raises(ValueError, match="'sort' or 'bisect', got 'bisection'"):
        _cutoff_values(scaled, jnp.array([2]), jnp.array([0.6], jnp.float32), "bisection")


@pytest.mark.parametrize("method", ["bisect", "sort"])
def test_top_p_one_keeps_the_tail_even_when_the_cumsum_rounds_to_one(method):
    # p(top) rounds to 1.0 in f32, so only the explicit top_p >= 1 rule keeps the tail
    rng = np.random.default_rng(7)
    scaled = np.concatenate([[40.0], rng.normal(size=4095)]).astype(np.float32)[None]
    cut = _cutoff_values(jnp.asarray(scaled), jnp.array([0]), jnp.array([1.0], jnp.float32), method)
    assert float(cut[0]) == scaled.min()
    cut = _cutoff_values(jnp.asarray(scaled), jnp.array([0]), jnp.array([0.99], jnp.float32), method)
    assert float(cut[0]) == 40.0


def test_the_cutoff_bisects_on_a_cpu_and_sorts_on_an_accelerator():
    from arctic_jax.sampling import cutoff_method

    assert cutoff_method("cpu") == "bisect"
    assert cutoff_method("gpu") == cutoff_method("cuda") == cutoff_method("tpu") == "sort"


def test_sample_rejects_bad_shapes():
    t = _tensors([SamplingParams()] * 4, [0] * 4, [0] * 4)
    with pytest.raises(ValueError, match="logits rows"):
        sample(jnp.ones((3, 10)), t)
    with pytest.raises(ValueError, match="num_top_logprobs"):
        sample(jnp.ones((4, 10)), t, num_top_logprobs=11)


def test_from_params_pads_with_greedy_rows_and_normalises():
    params = [SamplingParams(temperature=0.7, top_k=-1, top_p=0.9, min_p=0.1),
              SamplingParams(temperature=0.0, top_k=5, top_p=0.5)]
    t = SamplingTensors.from_params(params, [3, 9], [MAX_SEED, 4], 4)
    assert t.num_rows == 4
    assert t.temperature.dtype == np.float32 and t.top_k.dtype == np.int32
    assert t.seed.dtype == np.uint32 and t.step.dtype == np.int32
    np.testing.assert_allclose(t.temperature, [0.7, 0, 0, 0])
    np.testing.assert_array_equal(t.top_k, [0, 0, 0, 0])
    np.testing.assert_allclose(t.top_p, [0.9, 1, 1, 1])
    np.testing.assert_allclose(t.min_p, [0.1, 0, 0, 0])
    np.testing.assert_array_equal(t.seed, [MAX_SEED, 4, 0, 0])
    np.testing.assert_array_equal(t.step, [3, 9, 0, 0])


@pytest.mark.parametrize("args, match", [
    (([SamplingParams()], [0, 1], [0], 2), "steps"),
    (([SamplingParams()] * 3, [0] * 3, [0] * 3, 2), "num_rows"),
    (([SamplingParams()], [-1], [0], 1), r"steps\[0\]"),
    (([SamplingParams()], [0], [MAX_SEED + 1], 1), r"seeds\[0\]"),
    (([SamplingParams()], [0], [None], 1), r"seeds\[0\]"),
])
def test_from_params_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        SamplingTensors.from_params(*args)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 1.5),
    ("min_p", -0.1), ("min_p", 1.1),
    ("seed", -1), ("seed", 1.0), ("seed", MAX_SEED + 1), ("seed", "7"),
    ("stop", 5), ("stop", ["ok", ""]), ("stop", ["ok", 3]),
    ("stop_token_ids", [1, -1]), ("stop_token_ids", 7),
    ("ignore_eos", 1),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
])
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg, msg


def test_params_normalisation_and_greedy():
    p = SamplingParams(stop="###", stop_token_ids=[3, np.int64(4)], temperature=1, seed=np.int32(9))
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert type(p.temperature) is float and type(p.seed) is int
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(temperature=0).is_greedy()
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).is_greedy()
    assert not SamplingParams(temperature=0.1).is_greedy()
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20
    assert isinstance(SAMPLE(jnp.ones((1, 4)), _tensors([p], [0], [1])), SampleResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 2.0  # type: ignore[misc]
    assert type(SamplingParams(top_p=1).top_p) is float


def test_cutoff_benchmark_checks_and_prints_its_table(capsys):
    from benchmarks.sampling_cutoff import main
    assert main(["--rows", "1,3", "--vocab", "300", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert table.count("| 300 |") == 2 and "speed-up" in table
