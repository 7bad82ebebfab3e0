"""Neighbour lists computed where the positions live (vesin-torch on CPU and CUDA; no AiiDA).

The graph of the backbone and the real-space pairs of the Ewald and PME sums both come from here. With
positions on a GPU the list is built there (vesin-torch's CUDA kernels), so a model evaluation does not
copy positions to the host and pairs back. Where vesin-torch is not installed, or its kernels refuse a
cell on the device, vesin's NumPy version on the host gives the same list.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import vesin

try:
    import vesin_torch
except ImportError:  # pragma: no cover - vesin-torch is a dependency; kept optional for old installs
    vesin_torch = None

LOGGER = logging.getLogger(__name__)

#: Devices on which vesin-torch refused a cell once: later calls go to the host directly.
_HOST_FALLBACK: set[str] = set()


def neighbour_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: tuple[bool, bool, bool] | list[bool],
    cutoff: float,
    full_list: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs within ``cutoff`` (Å): first and second index ``[P]`` and integer lattice shifts ``[P, 3]``.

    The pair vector is ``positions[j] − positions[i] + shifts @ cell``. Every output is on
    ``positions.device``; indices are ``long``, shifts are ``long`` too. Nothing is differentiated
    through the list: distances are recomputed from the positions by the caller.
    """
    device = positions.device
    flags = [bool(flag) for flag in pbc]
    if any(flags) and abs(float(torch.linalg.det(cell.detach().double()))) < 1e-9:
        raise ValueError("a periodic structure needs a cell of non-zero volume")
    if vesin_torch is not None and str(device) not in _HOST_FALLBACK:
        points = positions.detach().to(torch.float64)
        box = cell.detach().to(device=device, dtype=torch.float64)
        try:
            i, j, shifts = vesin_torch.NeighborList(cutoff=float(cutoff), full_list=full_list).compute(
                points, box, torch.tensor(flags, device=device), quantities="ijS"
            )
            return i.long(), j.long(), shifts.long()
        except RuntimeError as error:
            if device.type == "cpu":
                raise
            LOGGER.warning("vesin-torch refused the neighbour list on %s (%s); using the host", device, error)
            _HOST_FALLBACK.add(str(device))
    i, j, shifts = vesin.NeighborList(cutoff=float(cutoff), full_list=full_list).compute(
        positions.detach().cpu().double().numpy(),
        cell.detach().cpu().double().numpy(),
        flags,
        quantities="ijS",
    )
    return tuple(torch.as_tensor(np.asarray(a, dtype=np.int64), device=device) for a in (i, j, shifts))
