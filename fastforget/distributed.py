"""Where a process stands in a data-parallel run, and draws made for the global batch.

Everything random in a step is drawn for the whole global batch from the step's generator (the
same on every rank), each rank keeping its rows: N ranks then compute what one process does with
the same global batch, and a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank_rows(draw: Callable[..., Tensor], gen: torch.Generator, batch: int, *shape: int, d: Dist, **kwargs) -> Tensor:
    """This rank's `batch` rows of draw((world * batch, *shape), generator=gen, device=d.device),
    e.g. rank_rows(torch.rand, gen, 64, 196, d=d)."""
    rows = draw((d.world * batch, *shape), generator=gen, device=d.device, **kwargs)
    return rows[d.rank * batch:(d.rank + 1) * batch]
