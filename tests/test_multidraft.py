"""K-SEQ is exact and near-optimal; the sorted-prefix bound equals brute-force min-cut."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from arjax.sampling import multidraft


def random_pair(rng, vocab):
    p = rng.dirichlet(np.full(vocab, rng.uniform(0.3, 2)))
    q = rng.dirichlet(np.full(vocab, rng.uniform(0.3, 2)))
    if rng.random() < 0.3:  # exact zeros, as after top-k
        q[rng.integers(vocab)] = 0
        p[rng.integers(vocab)] = 0
    return p / p.sum(), q / q.sum()


def min_cut(p, q, n):
    """alpha* by brute force over all subsets H of the vocabulary."""
    vocab = len(p)
    return min(1 - p[list(h)].sum() + 1 - (1 - q[list(h)].sum()) ** n
               for r in range(vocab + 1) for h in itertools.combinations(range(vocab), r))


def kseq_output_law(p, q, n):
    """Exact output law and acceptance of K-SEQ with n i.i.d. drafts, by enumeration."""
    pj, qj = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
    rho = multidraft.optimal_rho(pj, qj, jnp.float32(n))
    res = np.asarray(multidraft.kseq_residual(pj, qj, jnp.float32(n), rho), np.float64)
    a = np.asarray(multidraft.kseq_accept_probs(pj, qj, jnp.arange(len(p)), rho), np.float64)
    out, accept = np.zeros(len(p)), 0.0
    for drafts in itertools.product(range(len(p)), repeat=n):
        weight = np.prod(q[list(drafts)])
        if weight == 0:
            continue
        none = 1.0
        for x in drafts:
            out[x] += weight * none * a[x]
            accept += weight * none * a[x]
            none *= 1 - a[x]
        if res.sum() > 0:
            out += weight * none * res / res.sum()
    return out, accept


def test_optimal_acceptance_equals_brute_force_min_cut():
    rng = np.random.default_rng(0)
    for _ in range(60):
        vocab, n = int(rng.integers(2, 8)), int(rng.integers(1, 5))
        p, q = random_pair(rng, vocab)
        got = float(multidraft.optimal_acceptance(jnp.asarray(p), jnp.asarray(q), n))
        assert got == pytest.approx(min_cut(p, q, n), abs=1e-5)
        if n == 1:
            assert got == pytest.approx(np.minimum(p, q).sum(), abs=1e-5)  # 1 - TV


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_kseq_is_exact_and_within_bounds(n):
    rng = np.random.default_rng(n)
    for _ in range(25):
        p, q = random_pair(rng, int(rng.integers(2, 6)))
        out, accept = kseq_output_law(p, q, n)
        np.testing.assert_allclose(out, p, atol=2e-5)
        predicted = float(multidraft.kseq_acceptance(jnp.asarray(p, jnp.float32),
                                                     jnp.asarray(q, jnp.float32), n))
        assert accept == pytest.approx(predicted, abs=2e-5)
        best = min_cut(p, q, n)
        assert (1 - 1 / np.e) * best - 1e-5 <= accept <= best + 1e-5
        if n == 1:
            assert accept == pytest.approx(np.minimum(p, q).sum(), abs=1e-5)
