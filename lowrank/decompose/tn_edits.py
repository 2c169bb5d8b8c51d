"""Edits of a tensor network's structure: lower a bond, split a core, merge internal cores.

The cores are those of :class:`~lowrank.decompose.factorizations.TensorNetwork`:
``M`` cores of ``M`` dimensions, dimension ``k`` of core ``k`` its own index
(size one for an internal core), dimension ``j`` the bond to core ``j``, the
internal cores last. Merging is exact; lowering a bond and splitting a core
truncate an SVD, so a structure search refits and checks the error after them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch


def lower_bond(cores: Sequence[torch.Tensor], i: int, j: int, rank: int) -> list[torch.Tensor]:
    """The cores with the bond between cores ``i`` and ``j`` cut to ``rank``.

    The two cores are replaced by the best rank-``rank`` factorization of
    their product over the bond (a truncated SVD, computed through QR of
    each core so that the product is never formed), with the singular
    values split evenly between them. The rest of the network is ignored, so
    a refit should follow.
    """
    left = cores[i].movedim(j, -1)
    right = cores[j].movedim(i, -1)
    bond = left.shape[-1]
    q_left, r_left = torch.linalg.qr(left.reshape(-1, bond))
    q_right, r_right = torch.linalg.qr(right.reshape(-1, bond))
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    new_left = (q_left @ (u[:, :rank] * root)).reshape(*left.shape[:-1], rank).movedim(-1, j)
    new_right = (q_right @ (vh[:rank].T * root)).reshape(*right.shape[:-1], rank).movedim(-1, i)
    lowered = list(cores)
    lowered[i], lowered[j] = new_left, new_right
    return lowered


def core_spectrum(core: torch.Tensor, k: int) -> torch.Tensor:
    """Singular values of core ``k``'s matricisation: its own index against its bonds."""
    return torch.linalg.svdvals(core.movedim(k, 0).reshape(core.shape[k], -1))


def split_core(cores: Sequence[torch.Tensor], k: int, rank: int) -> list[torch.Tensor]:
    """The cores with core ``k`` split into a leaf and a new internal core, joined by a bond of ``rank``.

    The leaf keeps core ``k``'s own index and the orthonormal leading
    ``rank`` left singular vectors of its matricisation (own index against
    bonds); the new internal core, appended last, holds the singular values
    times the right singular vectors and every bond core ``k`` had, so each
    former neighbour of core ``k`` is joined to the internal core instead.
    Exact when ``rank`` is at least the matricisation's rank.
    """
    ndim = len(cores)
    core = cores[k]
    size = core.shape[k]
    u, s, vh = torch.linalg.svd(core.movedim(k, 0).reshape(size, -1), full_matrices=False)
    rank = min(rank, s.numel())
    leaf_shape = [1] * (ndim + 1)
    leaf_shape[k], leaf_shape[ndim] = size, rank
    bond_shape = [core.shape[j] for j in range(ndim) if j != k]
    internal = (s[:rank, None] * vh[:rank]).reshape(rank, *bond_shape).movedim(0, k).unsqueeze(-1)
    split = [c.unsqueeze(-1).transpose(k, ndim) for c in cores]  # bonds to core k move to the new core
    split[k] = u[:, :rank].reshape(leaf_shape)
    split.append(internal)
    return split


def merged_size(cores: Sequence[torch.Tensor], group: Sequence[int]) -> int:
    """Parameters of the one core that contracting the internal cores ``group`` gives: its outer bonds' product."""
    inside = set(group)
    outer = [math.prod(cores[a].shape[j] for a in group) for j in range(len(cores)) if j not in inside]
    return math.prod(outer)


def merge_cores(cores: Sequence[torch.Tensor], a: int, b: int) -> list[torch.Tensor]:
    """The cores with internal cores ``a < b`` contracted into one core at ``a`` (exact); core ``b`` is removed.

    A core joined to both keeps one bond to the merged core, of the product
    of its two bond sizes.
    """
    if not a < b:
        raise ValueError(f"merge_cores needs a < b, got {a} and {b}")
    ndim = len(cores)
    product = torch.tensordot(cores[a], cores[b], dims=([b], [a]))  # a's dims but b, then b's dims but a
    kept = [p for p in range(ndim) if p != b]
    order, sizes = [], []
    for p in kept:
        from_a = p if p < b else p - 1
        source = b if p == a else p  # core b's own index joins core a's
        from_b = (ndim - 1) + (source if source < a else source - 1)
        order += [from_a, from_b]
        sizes.append(product.shape[from_a] * product.shape[from_b])
    merged = []
    for j, core in enumerate(cores):
        if j == a:
            merged.append(product.permute(order).reshape(sizes))
        elif j != b:
            merged.append(core.movedim(b, a + 1).flatten(a, a + 1))
    return merged


def internal_groups(cores: Sequence[torch.Tensor], n_modes: int) -> list[tuple[int, ...]]:
    """The groups of internal cores that can be contracted into one: joined pairs and connected components.

    Cores ``n_modes`` onwards are internal. Each group is sorted; a
    component of two is listed once, as a pair.
    """
    internal = range(n_modes, len(cores))
    joined = {a: {b for b in internal if b != a and cores[a].shape[b] > 1} for a in internal}
    groups = [pair for pair in itertools.combinations(internal, 2) if pair[1] in joined[pair[0]]]
    seen: set[int] = set()
    for start in internal:
        if start in seen:
            continue
        component, frontier = {start}, [start]
        while frontier:
            for b in joined[frontier.pop()] - component:
                component.add(b)
                frontier.append(b)
        seen |= component
        if len(component) > 2:
            groups.append(tuple(sorted(component)))
    return groups


def merge_while_saving(cores: Sequence[torch.Tensor], n_modes: int) -> list[torch.Tensor]:
    """The cores with internal groups contracted into one core while that saves parameters, largest saving first."""
    merged = list(cores)
    while True:
        groups = internal_groups(merged, n_modes)
        saving = {g: sum(merged[a].numel() for a in g) - merged_size(merged, g) for g in groups}
        best = max(groups, key=lambda g: saving[g], default=None)  # the first listed among equal savings
        if best is None or saving[best] <= 0:
            return merged
        merged = merge_group(merged, best)


def merge_group(cores: Sequence[torch.Tensor], group: Sequence[int]) -> list[torch.Tensor]:
    """The cores with the internal cores of a connected ``group`` contracted into one, at its lowest position."""
    merged = list(cores)
    remaining = sorted(group)
    while len(remaining) > 1:
        first = remaining[0]
        other = next(b for b in remaining[1:] if merged[first].shape[b] > 1)
        merged = merge_cores(merged, first, other)
        remaining = [b if b < other else b - 1 for b in remaining if b != other]
    return merged
