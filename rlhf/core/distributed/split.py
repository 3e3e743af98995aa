"""How a batch is split across workers or ranks, said once: contiguous, equal-as-possible row slices (contiguity
keeps a prompt's samples on one worker, in order)."""
from __future__ import annotations


def row_slices(rows: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering ``rows`` rows; the first ``rows % parts`` are one row longer."""
    size, extra = divmod(rows, parts)
    slices, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        slices.append(slice(start, end))
        start = end
    return slices


def shards(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous, equal-as-possible pieces (some may be empty)."""
    return [items[s] for s in row_slices(len(items), parts)]
