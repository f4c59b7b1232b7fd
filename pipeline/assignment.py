"""Box overlap and optimal one-to-one matching, in numpy only.

The tracker matches predicted track boxes to detections by minimum total cost
(1 - IoU). scipy is not a dependency of vapipe, so the Hungarian method
(shortest augmenting paths, as in scipy's ``linear_sum_assignment``) lives here;
the matrices are small (tracks x detections of one frame).
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["box_iou", "linear_assignment", "match"]

logger = logging.getLogger(__name__)

_FORBIDDEN = 1e6
"""Cost given to pairs above the threshold: large enough that the solver uses one only when it must."""


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a (n,4)`` with every box in ``b (m,4)``, xyxy.

    Returns:
        ``(n, m)`` float64 matrix; 0 where boxes do not overlap or have no area.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.clip(a[:, 2] - a[:, 0], 0.0, None) * np.clip(a[:, 3] - a[:, 1], 0.0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    iou: np.ndarray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou


def linear_assignment(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment of rows to columns (Hungarian method, O(n^2 m)).

    Every row is assigned when rows <= columns, else every column. Ties are broken
    by index order, so the result is deterministic, which restore-equivalence needs.

    Returns:
        ``(row, column)`` pairs sorted by row.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-d matrix, got shape {cost.shape}")
    if cost.size == 0:
        return []
    transposed = cost.shape[0] > cost.shape[1]
    a = cost.T if transposed else cost
    n, m = a.shape
    # Potentials u (rows) and v (columns); column_row[j] is the row (1-based) owning column j, 0 = free.
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    column_row = np.zeros(m + 1, dtype=np.int64)
    way = np.zeros(m + 1, dtype=np.int64)
    padded = np.zeros((n + 1, m + 1))
    padded[1:, 1:] = a
    for row in range(1, n + 1):
        column_row[0] = row
        j0 = 0
        min_slack = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = column_row[j0]
            free = ~used
            free[0] = False
            slack = padded[i0] - u[i0] - v
            better = free & (slack < min_slack)
            min_slack[better] = slack[better]
            way[better] = j0
            candidates = np.where(free, min_slack, np.inf)
            j1 = int(np.argmin(candidates))
            delta = candidates[j1]
            u[column_row[used]] += delta
            v[used] -= delta
            min_slack[free] -= delta
            j0 = j1
            if column_row[j0] == 0:
                break
        while j0:
            j1 = int(way[j0])
            column_row[j0] = column_row[j1]
            j0 = j1
    pairs = [(int(column_row[j]) - 1, j - 1) for j in range(1, m + 1) if column_row[j] != 0]
    if transposed:
        pairs = [(c, r) for r, c in pairs]
    return sorted(pairs)


def match(cost: np.ndarray, max_cost: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Optimal matching that never pairs a row and column whose cost is above ``max_cost``.

    Pairs above the threshold are made prohibitively expensive before solving, so
    the solver first maximises the number of allowed pairs, then minimises their cost.

    Returns:
        ``(matches, unmatched_rows, unmatched_columns)``, each sorted.
    """
    cost = np.asarray(cost, dtype=np.float64)
    rows, cols = cost.shape
    if rows == 0 or cols == 0:
        return [], list(range(rows)), list(range(cols))
    allowed = cost <= max_cost
    if (allowed.sum(axis=1) <= 1).all() and (allowed.sum(axis=0) <= 1).all():
        # No two allowed pairs compete (the usual case: boxes overlap one track each): take them all.
        matches = [(int(r), int(c)) for r, c in zip(*np.nonzero(allowed), strict=True)]
    else:
        guarded = np.where(allowed, cost, _FORBIDDEN)
        matches = [(r, c) for r, c in linear_assignment(guarded) if allowed[r, c]]
    matched_rows = {r for r, _ in matches}
    matched_cols = {c for _, c in matches}
    return (
        matches,
        [r for r in range(rows) if r not in matched_rows],
        [c for c in range(cols) if c not in matched_cols],
    )
