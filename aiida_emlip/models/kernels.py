"""Custom torch-pme potentials used by :mod:`aiida_emlip.models.electrostatics`.

torch-pme's :class:`~torchpme.Calculator` with ``smearing=None`` sums ``potential.from_dist`` over the
pairs it is given (no k-space part). The Gaussian-charge interaction is not among torch-pme's
potentials, so the direct (open-boundary) path uses :class:`GaussianCoulombPotential`, and the
periodic sums use :class:`GaussianSplitCoulombPotential` (its real-space part ends at the charges'
own width) and its half-k-sphere variant :class:`HalfSpaceCoulombPotential` for Ewald.
"""

from __future__ import annotations

import math

import torch
from torchpme.potentials import CoulombPotential, Potential


class GaussianCoulombPotential(Potential):
    """Pair kernel ``prefactor · erf(r / (√2 s)) / r`` (``prefactor / r`` when ``width == 0``).

    Two Gaussian charges of widths σ₁, σ₂ interact through this kernel with ``s² = σ₁² + σ₂²``;
    for equal widths σ that is ``erf(r / 2σ) / r``. ``width`` is ``s``, not a charge width. The
    torch-pme ``smearing`` (range separation) stays ``None``: this potential is for direct sums only.
    """

    def __init__(self, width: float, prefactor: float = 1.0):
        super().__init__(smearing=None, prefactor=prefactor)
        self.width = float(width)

    def from_dist(self, dist: torch.Tensor, pair_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Kernel value at the pair distances ``dist``."""
        if self.width > 0.0:
            x = dist / (math.sqrt(2.0) * self.width)
            # erf(x)/x is smooth at 0; write it so that r -> 0 stays finite.
            safe = torch.where(x > 1e-6, x, torch.ones_like(x))
            ratio = torch.where(
                x > 1e-6, torch.erf(safe) / safe, torch.full_like(x, 2.0 / math.sqrt(math.pi))
            )
            result = ratio / (math.sqrt(2.0) * self.width)
        else:
            result = 1.0 / dist.clamp(min=1e-15)
        if pair_mask is not None:
            result = result * pair_mask
        return self.prefactor.to(dist.dtype) * result


class GaussianSplitCoulombPotential(CoulombPotential):
    """torch-pme's range-separated Coulomb potential for Gaussian charges, split at ``smearing``.

    The pair kernel of Gaussian charges, ``erf(r/√2 w)/r`` with ``w = width``, is split into
    torch-pme's long-range part ``erf(r/√2 s)/r`` (``s = smearing ≥ w``, summed in k-space) and the
    short-range rest ``[erfc(r/√2 s) − erfc(r/√2 w)]/r``, summed over real-space pairs. With
    ``width = 0`` this is torch-pme's point-charge split; with ``width = smearing`` the real-space part
    vanishes. A wider ``smearing`` than the charges' own width makes the k-space sum cheaper (its
    cutoff or mesh step scales with ``s``) at the price of a short real-space pair sum.
    """

    def __init__(self, smearing: float, width: float = 0.0, prefactor: float = 1.0):
        super().__init__(smearing=smearing, prefactor=prefactor)
        if not 0.0 <= width <= smearing:
            raise ValueError(f"width must lie in [0, smearing], got {width} and {smearing}")
        self.width = float(width)

    def sr_from_dist(self, dist: torch.Tensor, pair_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``prefactor · [erfc(r/√2 s) − erfc(r/√2 w)] / r`` (no cancellation of two erf ≈ 1)."""
        result = torch.erfc(dist / (math.sqrt(2.0) * self.smearing))
        if self.width > 0.0:
            result = result - torch.erfc(dist / (math.sqrt(2.0) * self.width))
        result = result / dist
        if pair_mask is not None:
            result = result * pair_mask
        return self.prefactor * result


class HalfSpaceCoulombPotential(GaussianSplitCoulombPotential):
    """torch-pme's range-separated Coulomb potential for a k-sum over one of each ``±k`` pair.

    The Ewald k-space summand is even in k, so a sum over half of the k-sphere with a doubled
    kernel ``2 · 4π e^{−s²k²/2}/k²`` equals the full sum at half the cost. Only the Fourier kernel is
    doubled; the self and background terms torch-pme subtracts stay those of the full sum.
    """

    def lr_from_k_sq(self, k_sq: torch.Tensor) -> torch.Tensor:
        """Twice torch-pme's long-range Fourier kernel."""
        return 2.0 * super().lr_from_k_sq(k_sq)
