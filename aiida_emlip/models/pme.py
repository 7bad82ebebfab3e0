"""torch-pme's particle-mesh Ewald on a mesh whose size is chosen by the caller.

:class:`torchpme.PMECalculator` derives the mesh from a spacing and rounds every axis up to a power of
two, so the number of mesh points jumps by 8× between steps. :class:`MeshPMECalculator` runs the
same algorithm with torch-pme's own building blocks (``MeshInterpolator``, ``KSpaceFilter``) on the
mesh set in :attr:`MeshPMECalculator.mesh` before each call, so that the mesh can be any FFT-friendly
size (products of 2, 3 and 5) picked from the requested accuracy
(:func:`aiida_emlip.models.accuracy.pme_parameters`). The output follows torch-pme's conventions:
``V_i = ½ Σ_j q_j v(r_ij)`` with the self term and the neutralising background subtracted.
"""

from __future__ import annotations

import torch
from torchpme import PMECalculator
from torchpme.potentials import Potential


class MeshPMECalculator(PMECalculator):
    """PME with an explicit mesh ``(n_a, n_b, n_c)`` along the three cell vectors."""

    def __init__(self, potential: Potential, interpolation_nodes: int):
        # torch-pme's mesh_spacing is unused: the mesh comes from ``self.mesh``
        super().__init__(potential, mesh_spacing=1.0, interpolation_nodes=interpolation_nodes)
        self.mesh: tuple[int, int, int] | None = None

    def _compute_kspace(
        self,
        charges: torch.Tensor,
        cell: torch.Tensor,
        positions: torch.Tensor,
        periodic: torch.Tensor | None = None,
        node_mask: torch.Tensor | None = None,
        kvectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.mesh is None:
            raise RuntimeError("set MeshPMECalculator.mesh before calling it")
        if node_mask is not None or kvectors is not None:
            raise NotImplementedError("batched inputs are not supported by the mesh calculator")
        ns = torch.tensor(self.mesh, dtype=torch.long, device=cell.device)
        self.mesh_interpolator.update(cell, ns)
        self.kspace_filter.update(cell, ns)
        self.mesh_interpolator.compute_weights(positions)
        density = self.mesh_interpolator.points_to_mesh(particle_weights=charges)
        volume = torch.abs(torch.linalg.det(cell))
        phi = self.mesh_interpolator.mesh_to_points(self.kspace_filter.forward(density)) / volume
        # torch-pme's conventions: no self interaction, uniform background for Σq ≠ 0, halved
        phi = phi - charges * self.potential.self_contribution()
        phi = phi - 2.0 * self.potential.background_correction() * charges.sum(0) / volume
        phi = phi + self.potential.pbc_correction(periodic, positions, cell, charges)
        return phi / 2.0
