"""The metrics of benchmarks/kv_cache_accuracy.py against a per-row loop on random distributions."""
from __future__ import annotations

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from kv_cache_accuracy import compare


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_compare_matches_a_per_row_loop():
    rng = np.random.default_rng()
    n, v = 37, 50
    ref = _log_softmax(rng.normal(0, 2, (n, v)))
    got = _log_softmax(np.log(np.exp(ref)) + rng.normal(0, 1.0, (n, v)))
    targets = rng.integers(0, v, n)
    r = compare(ref, got, targets)
    kls, agree, nll = [], 0, 0.0
    for i in range(n):
        p, q = np.exp(ref[i]), np.exp(got[i])
        kls.append(sum(p[j] * math.log(p[j] / q[j]) for j in range(v)))
        agree += int(np.argmax(p) == np.argmax(q))
        nll -= math.log(q[targets[i]])
    assert math.isclose(r["kl_mean"], np.mean(kls), rel_tol=1e-9)
    assert math.isclose(r["kl_max"], max(kls), rel_tol=1e-9)
    assert r["top1"] == agree / n and 0 < agree < n
    assert math.isclose(r["ppl"], math.exp(nll / n), rel_tol=1e-9)
    same = compare(ref, ref, targets)
    assert same["top1"] == 1.0 and abs(same["kl_mean"]) < 1e-12
