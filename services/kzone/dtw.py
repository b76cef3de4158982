"""Dynamic time warping within a Sakoe-Chiba band, the alignment behind both pitch-contour and dance scoring.

Warping pairs every frame of one sequence (the rows) with frames of the other (the columns) along a monotone path
from the first pair to the last, with steps (1, 0), (0, 1) and (1, 1), minimising the sum of the local costs of
the pairs on it. Only pairs within `band` columns of the straight line from the first pair to the last are
considered: performers drift from the reference by a few seconds at most, and the band keeps time and memory at
O(rows * band) instead of O(rows * columns).

A step penalty p, added to every horizontal and vertical step, makes the path keep to the diagonal unless warping
buys more than p.

The caller supplies the local cost one row at a time (a row of the band, vectorised), so the costs of the whole
matrix never have to exist at once. Within a row the recurrence D[j] = c[j] + min(D[j - 1] + p, up[j] + p,
diagonal[j]) runs along the row; it is computed without a Python loop as a running minimum: D[j] = C[j] + min over
k <= j of (A[k] - C[k]), where C is the running sum of c + p along the row and A[k] = c[k] + min(up[k] + p,
diagonal[k]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

Floats: TypeAlias = NDArray[np.float64]
Indices: TypeAlias = NDArray[np.intp]

# The local costs of row `i` against the columns of `columns` (a slice with step 1), as a 1-D array.
LocalCost: TypeAlias = Callable[[int, slice], Floats]


@dataclass(frozen=True)
class Warping:
    """The cheapest path: `path` holds its (row, column) pairs in order, from (0, 0) to the last row and column;
    `cost` is the sum of the local costs along it and of its step penalties."""

    cost: float
    path: Indices

    @property
    def mean_cost(self) -> float:
        """The cost per pair on the path, comparable between sequences of different lengths."""
        return self.cost / len(self.path)


def band_limits(rows: int, columns: int, band: float) -> tuple[Indices, Indices]:
    """For each row, the first column in the band and one past the last. The band is widened to the slope of the
    diagonal where that is wider, so that consecutive rows' stretches touch and a path always exists."""
    if rows < 1 or columns < 1:
        raise ValueError(f"cannot warp empty sequences ({rows} x {columns})")
    if band < 0:
        raise ValueError(f"band must not be negative, got {band}")
    slope = (columns - 1) / (rows - 1) if rows > 1 else 0.0
    width = max(band, slope)
    centre = np.arange(rows) * slope
    first = np.clip(np.floor(centre - width), 0, columns - 1).astype(np.intp)
    stop = np.clip(np.ceil(centre + width) + 1, 1, columns).astype(np.intp)
    if rows == 1:
        stop[:] = columns
    return first, stop


def warp(rows: int, columns: int, local_cost: LocalCost, band: float = math.inf, step_penalty: float = 0.0) -> Warping:
    """The cheapest warping path between a sequence of `rows` frames and one of `columns` frames, each horizontal or
    vertical step costing `step_penalty` on top of its pair's local cost."""
    first, stop = band_limits(rows, columns, band)
    width = int((stop - first).max())
    # Row i of `accumulated` holds D[i, first[i] + k] at k; unused cells stay infinite.
    accumulated = np.full((rows, width), np.inf)
    for row in range(rows):
        lo, hi = int(first[row]), int(stop[row])
        costs = np.asarray(local_cost(row, slice(lo, hi)), dtype=np.float64)
        if costs.shape != (hi - lo,):
            raise ValueError(f"local cost of row {row} has shape {costs.shape}, expected ({hi - lo},)")
        if row == 0:
            entering = np.full(hi - lo, np.inf)
            entering[0] = costs[0]
        else:
            up = _previous_row(accumulated[row - 1], int(first[row - 1]), lo, hi)
            diagonal = _previous_row(accumulated[row - 1], int(first[row - 1]), lo - 1, hi - 1)
            entering = costs + np.minimum(up + step_penalty, diagonal)
        running = np.cumsum(costs + step_penalty)
        accumulated[row, : hi - lo] = running + np.minimum.accumulate(entering - running)
    total = float(accumulated[rows - 1, columns - 1 - int(first[rows - 1])])
    return Warping(cost=total, path=_backtrack(accumulated, first, stop, step_penalty))


def _previous_row(values: Floats, values_first: int, lo: int, hi: int) -> Floats:
    """D of the previous row at columns lo..hi-1 (infinite outside its band)."""
    out = np.full(hi - lo, np.inf)
    source_lo = max(lo, values_first)
    source_hi = min(hi, values_first + values.size)
    if source_hi > source_lo:
        out[source_lo - lo : source_hi - lo] = values[source_lo - values_first : source_hi - values_first]
    return out


def _backtrack(accumulated: Floats, first: Indices, stop: Indices, step_penalty: float) -> Indices:
    def arriving_from(step: tuple[int, int, float]) -> float:
        row, column, penalty = step
        if row < 0 or column < first[row] or column >= stop[row]:
            return math.inf
        return float(accumulated[row, column - first[row]]) + penalty

    row, column = accumulated.shape[0] - 1, int(stop[-1]) - 1
    path = [(row, column)]
    while row > 0 or column > 0:
        # On a tie the diagonal wins: it keeps the path from wandering off and back.
        steps = ((row - 1, column - 1, 0.0), (row - 1, column, step_penalty), (row, column - 1, step_penalty))
        row, column, _ = min(steps, key=arriving_from)
        path.append((row, column))
    return np.asarray(path[::-1], dtype=np.intp)
