"""Our sorting/selection networks equal the reference packages' networks, comparator by comparator."""
import contextlib
import io
import itertools

import numpy as np
import pytest

from losses.difftopk.networks import bitonic_network, odd_even_network, splitter_selection_network

diffsort_networks = pytest.importorskip("diffsort.networks")
with contextlib.redirect_stdout(io.StringIO()):
    difftopk_networks = pytest.importorskip("difftopk.networks")


def _reference_layers(dense_layers) -> list[set[tuple[int, int]]]:
    """(min wire, max wire) pairs per layer from the reference's split/combine matrices."""
    out = []
    for split_a, split_b, combine_min, combine_max, *_ in dense_layers:
        pairs = set()
        for c in range(split_a.shape[0]):
            a, b = int(np.argmax(split_a[c])), int(np.argmax(split_b[c]))
            if a == b:  # the reference's pass-through wire (weight 1/2 twice): the identity
                continue
            pairs.add((int(np.argmax(combine_min[:, c])), int(np.argmax(combine_max[:, c]))))
        if pairs:
            out.append(pairs)
    return out


def _ours(layers) -> list[set[tuple[int, int]]]:
    return [set(zip(dmin.tolist(), dmax.tolist())) for _a, _b, dmin, dmax in layers]


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 16, 20])
def test_odd_even_matches_diffsort(n):
    assert _ours(odd_even_network(n)) == _reference_layers(diffsort_networks.odd_even_network(n))


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 16, 20, 33])
def test_bitonic_matches_diffsort(n):
    assert _ours(bitonic_network(n)) == _reference_layers(diffsort_networks.bitonic_network(n))


@pytest.mark.parametrize("n,k", [(8, 1), (10, 3), (16, 5), (20, 5), (37, 4), (64, 5)])
def test_splitter_selection_matches_difftopk(n, k):
    with contextlib.redirect_stdout(io.StringIO()):
        ref = difftopk_networks.sparse_splitter_selection_network(n, k)
    assert _ours(splitter_selection_network(n, k)) == _reference_layers(ref)


def _apply_hard(layers, values):
    v = list(values)
    for _a, _b, dmin, dmax in layers:
        for lo, hi in zip(dmin.tolist(), dmax.tolist()):
            v[lo], v[hi] = min(v[lo], v[hi]), max(v[lo], v[hi])
    return v


@pytest.mark.parametrize("n", [4, 5, 7])
def test_networks_sort_every_permutation(n):
    """Hard comparators: odd-even and bitonic sort, splitter selection puts the top k on top, ascending."""
    for perm in itertools.permutations(range(n)):
        assert _apply_hard(odd_even_network(n), perm) == list(range(n))
        assert _apply_hard(bitonic_network(n), perm) == list(range(n))
        for k in (1, 2, 3):
            assert _apply_hard(splitter_selection_network(n, k), perm)[n - k:] == list(range(n - k, n))
