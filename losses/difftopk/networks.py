"""Sorting and selection networks as lists of comparator layers.

A network is a tuple of layers; a layer is four int64 arrays ``(a, b, dest_min, dest_max)``:
comparator i reads wires ``a[i]`` and ``b[i]`` and writes the (soft) minimum to ``dest_min[i]``
and the maximum to ``dest_max[i]``, where ``{a[i], b[i]} == {dest_min[i], dest_max[i]}``. Wires
a layer does not name pass through. Outputs are *ascending*: the largest value ends on wire n-1.

The three constructions produce the same comparators, layer by layer, as the networks of the
reference packages (``diffsort`` odd-even and bitonic, ``difftopk`` splitter selection), which
``tests/unit/test_networks.py`` checks; the reference's pass-through "comparators" (a wire
mixed with itself at weight 1/2, i.e. the identity) are simply absent here.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

Layer = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Pair = tuple[int, int]  # two wires; the minimum goes to the first unless the layer says otherwise

NETWORKS = ("odd_even", "bitonic", "splitter_selection")


def _as_layer(pairs: list[Pair], descending: list[bool] | None = None) -> Layer:
    """Comparators (a, b) -> the (a, b, dest_min, dest_max) arrays; min to a unless `descending`.

    The read order (a, b) fixes the sign of v = b − a in the relaxation: keeping a < b for the
    descending comparators of the bitonic network matches the reference's rounding exactly.
    """
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    if descending is None:
        return a, b, a, b
    flip = np.array(descending, dtype=bool)
    return a, b, np.where(flip, b, a), np.where(flip, a, b)


def odd_even_network(n: int) -> list[Layer]:
    """Odd-even transposition sort: n layers, alternately comparing wires (0,1),(2,3),… and (1,2),(3,4),…"""
    layers = []
    for depth in range(n):
        pairs = [(i, i + 1) for i in range(depth % 2, n - 1, 2)]
        if pairs:
            layers.append(_as_layer(pairs))
    return layers


def bitonic_network(n: int) -> list[Layer]:
    """Bitonic sorter on the next power of two N ≥ n, with the N − n lowest wires removed.

    Stage s (s = 1..log2 N) merges blocks of 2^s wires; within it the comparator distance halves
    from 2^(s−1) to 1. Wire i (with bit `distance` clear) meets i + distance; the block sorts
    ascending when bit 2^s of i is clear, descending otherwise. A comparator that touches a removed
    wire is dropped and the remaining wires are renumbered from 0.
    """
    stages = max(0, (n - 1).bit_length())
    full = 1 << stages
    removed = full - n
    layers = []
    for stage in range(1, stages + 1):
        distance = 1 << (stage - 1)
        while distance >= 1:
            pairs: list[Pair] = []
            descending: list[bool] = []
            for i in range(full):
                if i & distance or i < removed:  # i + distance > i is kept whenever i is
                    continue
                pairs.append((i - removed, i + distance - removed))
                descending.append(bool(i & (1 << stage)))
            if pairs:
                layers.append(_as_layer(pairs, descending))
            distance //= 2
    return layers


def _splitter_cascade(lanes: list[int]) -> list[list[tuple[int, int]]]:
    """Layers of a splitter cascade over `lanes`: pairs (winner lane, loser lane).

    Each layer halves the comparator distance (from the largest power of two below len(lanes)),
    comparing lanes[j] with lanes[j + distance] inside blocks of 2·distance. Afterwards the value
    on lanes[j] is exceeded by at least 2^popcount(j) − 1 values of the cascade.
    """
    size = len(lanes)
    if size < 2:
        return []
    depth = (size - 1).bit_length()
    cascade = []
    for level in range(depth):
        distance = 1 << (depth - level - 1)
        cascade.append([(lanes[j], lanes[j + distance])
                        for block in range(0, size, 2 * distance)
                        for j in range(block, min(block + distance, size - distance))])
    return cascade


def _selection_pairs(n: int, k: int) -> list[list[tuple[int, int]]]:
    """Splitter-selection network for the top k of n (Petersen et al. 2022): layers of (winner, loser).

    Every lane carries a lower bound on how many values exceed its own (its "rank"). Repeatedly, for
    each rank r < k from k−1 down, the lanes with rank r that are not yet settled are split by a
    cascade (placed in the earliest layers where all of them are free), which raises their ranks;
    this stops when every rank below k is held by a single lane, i.e. lane 0..k−1 hold the top k.
    """
    rank = [0] * n
    free_at = [0] * n  # first layer index where each lane is idle again
    gain = [(1 << bin(j).count("1")) - 1 for j in range(n)]
    layers: list[list[tuple[int, int]]] = []
    settled_below = -1  # ranks <= this value need no further splitting
    grew = True
    while grew:
        grew = False
        for r in range(k - 1, settled_below, -1):
            group = [lane for lane in range(n) if rank[lane] == r]
            if len(group) < 2:
                continue
            cascade = _splitter_cascade(group)
            start = max(free_at[lane] for lane in group)
            layers.extend([] for _ in range(start + len(cascade) - len(layers)))
            for offset, pairs in enumerate(cascade):
                layers[start + offset].extend(pairs)
            for j, lane in enumerate(group):
                rank[lane] += gain[j]
                free_at[lane] = start + len(cascade)
            grew = True
        settled_below += 1
    return layers


def splitter_selection_network(n: int, k: int) -> list[Layer]:
    """Top-k selection network: afterwards wires n-k..n-1 hold the k largest values, ascending.

    Lane l of the construction (lane 0 = largest) is wire n-1-l here.
    """
    return [_as_layer([(n - 1 - loser, n - 1 - winner) for winner, loser in pairs])
            for pairs in _selection_pairs(n, k) if pairs]


@lru_cache(maxsize=None)
def build_network(kind: str, n: int, k: int) -> tuple[Layer, ...]:
    """The comparator layers of a network (cached; `k` matters for splitter selection only)."""
    if kind == "odd_even":
        return tuple(odd_even_network(n))
    if kind == "bitonic":
        return tuple(bitonic_network(n))
    if kind == "splitter_selection":
        return tuple(splitter_selection_network(n, k))
    raise ValueError(f"unknown sorting network {kind!r}; expected one of {NETWORKS}")


class TorchNetwork:
    """A network's index tensors ``(a, b, dest_min, dest_max)`` per layer, built lazily and cached per device."""

    def __init__(self, kind: str, n: int, k: int) -> None:
        self.kind, self.n, self.k = kind, n, k
        self.layers = build_network(kind, n, k)
        self._cache: dict[torch.device, list[tuple[torch.Tensor, ...]]] = {}
        self._flat: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def on(self, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = [tuple(torch.as_tensor(v, dtype=torch.long, device=device) for v in layer)
                                   for layer in self.layers]
        return self._cache[device]

    def flat(self, readout: int | None = None) -> tuple[np.ndarray, ...]:
        """The comparators that reach the top ``readout`` output wires (default k), all layers in order, as
        four contiguous int64 arrays ``(a, b, dest_min, dest_max)``.

        A layer's comparators touch disjoint wires, so running them one by one is running the layer; a
        comparator neither of whose outputs reaches wires n−readout..n−1 (through later comparators)
        cannot change those wires' values or label mass, so it is left out (odd-even at n = 16, K = 5:
        90 of 120 comparators; bitonic 67 of 80; splitter selection 48 of 50).
        """
        readout = self.k if readout is None else readout
        if readout not in self._flat:
            live = np.zeros(self.n, dtype=bool)
            live[self.n - readout:] = True
            kept = []
            for a, b, dmin, dmax in reversed(self.layers):
                keep = live[dmin] | live[dmax]
                live[a[keep]] = True
                live[b[keep]] = True
                kept.append(tuple(v[keep] for v in (a, b, dmin, dmax)))
            kept.reverse()
            self._flat[readout] = tuple(
                np.ascontiguousarray(np.concatenate([layer[i] for layer in kept] or [np.empty(0)]), dtype=np.int64)
                for i in range(4))
        return self._flat[readout]
