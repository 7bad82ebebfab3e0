r"""Requested accuracy → parameters of the Ewald and PME sums, from error estimates.

**What the accuracy ε means.** Errors are measured against the Coulomb scales of the structure
(:func:`coulomb_scales`): with the mean atomic spacing ``ℓ = (V/N)^{1/3}`` and per-atom multipole
strength ``m_i² = q_i² + |p_i|²/ℓ²``,

* energy:     ``|ΔE|            ≤ ε · E_s``,  ``E_s = k_e Σ_i m_i² / (2ℓ)``
* forces:     ``RMS_i |ΔF_i|     ≤ ε · F_s``,  ``F_s = k_e ⟨m²⟩ / ℓ²``
* potentials: ``RMS_i |Δ∂E/∂q_i| ≤ ε · φ_s``,  ``φ_s = k_e ⟨m²⟩^{1/2} / ℓ``
* dipole fields: ``RMS_i |Δ∂E/∂p_i| ≤ ε · φ_s / ℓ``

(``⟨m²⟩ = Σ m_i²/N``). These are the sizes of the quantities in a dense ionic system: an NaCl crystal
has ``|E| = 1.75 E_s``, so its Madelung constant comes out to ``ε`` relative. The parameters are chosen
from the structure (cell, N, σ) only, never from the charges, so they do not change while charges
are trained or solved for.

**Estimates.** Truncating a k-space sum with kernel ``4π k_e e^{−β²k²}/k²`` at ``k_c`` leaves

* a systematic self term (each charge with its own periodic images): ``ΔE/E_s = 2ℓ · (2π/V) Σ_{k>k_c}
  e^{−β²k²}/k²``, which is also the potential error;
* a random-phase pair term on the forces (Kolafa–Perram's argument):
  ``ΔF/F_s = 4π/(√N ℓ) · [Σ_{k>k_c} e^{−2β²k²}/k²]^{1/2}``.

Dipoles carry ``(k·p)`` per dipole: the charge–dipole and dipole–dipole force terms get
``(k²ℓ²/3)`` and ``(k²ℓ²/3)²`` inside that sum, the dipole self term ``ΔE/E_s = (2ℓ³/3)(2π/V)
Σ_{k>k_c} e^{−β²k²}``. The sums run over the cell's own reciprocal lattice (not an integral
approximation), so small and strongly triclinic cells are as safe as large ones. A crystal breaks
the random-phase assumption at its Bragg vectors, where ``|S(k)|²`` reaches ``(Σ|q|)²``; every shell
of equal ``|k|`` left out is therefore also bounded as if fully coherent:
``ΔE/E_s ≤ (4π/ℓ²) Σ_shell e^{−β²k²}/k²`` (charges), ``4π Σ_shell e^{−β²k²}`` (dipoles). All these
estimates must stay below ``ε / SAFETY``.

Real space (point charges, split ``erfc(αr)/r``): random-phase estimates ``Δφ/φ_s =
ℓ^{−1/2}[4π∫_{r_c}^∞ erfc²(αr) dr]^{1/2}`` (also used for the energy) and ``ΔF/F_s =
ℓ^{1/2}[4π∫_{r_c}^∞ r² (d/dr (erfc(αr)/r))² dr]^{1/2}``.

PME (torch-pme's Lagrange interpolation with ``p`` nodes, mesh step ``H`` along the longest cell
vector): measured on random charges over ``ℓ/β`` = 0.7 … 5.6, cubic and triclinic cells,
``ΔF/F_s = A_p (ℓ/β)^{γ_p} (H/β)^{p−1}`` and ``Δφ/φ_s = C_p (H/β)^p`` (constants below, each the
largest measured ×1.5). The mesh is the cheapest (cost ``N p³ + 0.7 M`` for ``M`` mesh points,
measured) FFT-friendly mesh meeting both for ``p`` = 3, 5 or 7.

Dipole mesh (:mod:`aiida_emlip.models.dipole_mesh`, B-splines of order ``p``): measured in the same
way with dipoles as strong as the charges (``|p| ~ ℓ``), ``Δ/scale = D (ℓ/β)^γ (H/β)^o`` with
``o = p − 1`` for forces and dipole fields and ``o = p`` for energy and potentials
(:data:`DIPOLE_MESH`); its Nyquist sphere ``π/H`` must also reach the dipoles' ``k_c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from aiida_emlip.schema import COULOMB_CONSTANT

#: the k-space estimates enumerate the lattice to ``β²k² = −ln ε + _K_MARGIN`` (the rest is negligible)
_K_MARGIN = 25.0
#: the random-phase k- and real-space estimates must stay below accuracy / SAFETY: their spread
#: over structures (slabs are denser than V/N says) is about ×2, and a tighter cutoff costs little
SAFETY = 2.0
#: PME force constants ``(A_p, γ_p)`` and potential constants ``C_p`` (largest measured ×1.5), for
#: odd node counts only: with 4 and 6 nodes the forces of crystalline structures in skewed cells
#: came out up to 4× above the random-charge values (measured)
PME_FORCE = {3: (0.083, 0.905), 5: (0.013, 1.08), 7: (0.0059, 1.1)}
PME_POTENTIAL = {3: 0.073, 5: 0.0115, 7: 0.0052}
#: relative cost of one mesh point against one interpolation weight (measured, CPU)
PME_MESH_COST = 0.7


def coulomb_length(n_atoms: int, volume: float) -> float:
    """Mean atomic spacing ``ℓ = (V/N)^{1/3}`` (Å)."""
    return (volume / max(n_atoms, 1)) ** (1.0 / 3.0)


@dataclass(frozen=True)
class CoulombScales:
    """Sizes against which the accuracy is measured (eV, eV/Å, V, V/Å)."""

    length: float
    energy: float
    force: float
    potential: float
    field: float


def coulomb_scales(
    charges: torch.Tensor, volume: float, dipoles: torch.Tensor | None = None
) -> CoulombScales:
    """The Coulomb scales ``E_s, F_s, φ_s, φ_s/ℓ`` of a structure (see the module docstring)."""
    n = charges.shape[0]
    ell = coulomb_length(n, volume)
    m2 = charges.detach().double() ** 2
    if dipoles is not None:
        m2 = m2 + (dipoles.detach().double() ** 2).sum(1) / ell**2
    mean = float(m2.mean())
    return CoulombScales(
        length=ell,
        energy=0.5 * COULOMB_CONSTANT * float(m2.sum()) / ell,
        force=COULOMB_CONSTANT * mean / ell**2,
        potential=COULOMB_CONSTANT * math.sqrt(mean) / ell,
        field=COULOMB_CONSTANT * math.sqrt(mean) / ell**2,
    )


# --------------------------------------------------------------------------------------------------
# k-space cutoff


def kspace_cutoff(
    cell: torch.Tensor, beta: float, n_atoms: int, accuracy: float, dipoles: bool = False
) -> float:
    """Smallest ``k_c`` (Å⁻¹) whose truncation errors meet ``accuracy``, kernel ``e^{−β²k²}/k²``.

    ``dipoles=False``: charge–charge terms; ``True``: the charge–dipole and dipole–dipole terms.
    """
    key = tuple(float(x) for x in cell.detach().cpu().double().reshape(-1).tolist())
    return _kspace_cutoff(key, float(beta), int(n_atoms), float(accuracy), bool(dipoles))


@lru_cache(maxsize=256)
def _kspace_cutoff(cell_key: tuple, beta: float, n_atoms: int, accuracy: float, dipoles: bool) -> float:
    cell = torch.tensor(cell_key, dtype=torch.float64).reshape(3, 3)
    volume = abs(float(torch.linalg.det(cell)))
    ell = coulomb_length(n_atoms, volume)
    k_max = math.sqrt(-math.log(accuracy) + _K_MARGIN) / beta
    k = _half_space_norms(cell, k_max)  # ascending; each stands for ±k
    k2 = k * k
    g1 = torch.exp(-(beta**2) * k2)
    g2 = g1 * g1
    pref_e = 2.0 * 2.0 * math.pi / volume  # 2 for ±k
    pref_f = 4.0 * math.pi / (math.sqrt(n_atoms) * ell)
    if dipoles:
        u = k2 * ell * ell / 3.0
        estimates = [
            pref_e * (2.0 * ell**3 / 3.0) * _tail(g1),
            pref_f * torch.sqrt(2.0 * _tail(g2 * u / k2)),
            pref_f * torch.sqrt(2.0 * _tail(g2 * u * u / k2)),
            _coherent_shells(k, 2.0 * 4.0 * math.pi * g1),
        ]
    else:
        estimates = [
            pref_e * 2.0 * ell * _tail(g1 / k2),
            pref_f * torch.sqrt(2.0 * _tail(g2 / k2)),
            _coherent_shells(k, 2.0 * 4.0 * math.pi * g1 / (k2 * ell * ell)),
        ]
    worst = torch.stack(estimates).amax(0)  # worst[j]: error when k[:j] are kept
    ok = torch.nonzero(worst <= accuracy / SAFETY)
    j = max(int(ok[0]) if len(ok) else len(k), 1)  # keep at least the shortest k
    return float(k[j - 1]) * (1.0 + 1e-6)


def _coherent_shells(k: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """``out[j]``: the largest sum of ``terms`` over one shell (equal ``|k|``) left out by keeping ``k[:j]``.

    A crystal's structure factor can be fully coherent on a whole shell, ``|S(k)|² = (Σ|q|)²``:
    ``terms`` are the errors of that case, per k-vector.
    """
    new_shell = torch.ones_like(k, dtype=torch.bool)
    new_shell[1:] = k[1:] > k[:-1] * (1.0 + 1e-9)
    shell = torch.cumsum(new_shell.long(), 0) - 1
    sums = torch.zeros(int(shell[-1]) + 1, dtype=terms.dtype).index_add_(0, shell, terms)
    worst_from = torch.cummax(sums.flip(0), 0).values.flip(0)  # max over shells s' ≥ s
    out = worst_from[shell]
    # a cut inside a shell leaves that shell's rest out: count it whole (conservative)
    return torch.cat([out, out.new_zeros(1)])


def _tail(values: torch.Tensor) -> torch.Tensor:
    """``out[j] = Σ_{i ≥ j} values[i]`` with a trailing zero (``out[len] = 0``)."""
    rev = torch.cumsum(values.flip(0), 0).flip(0)
    return torch.cat([rev, rev.new_zeros(1)])


def _half_space_norms(cell: torch.Tensor, k_max: float) -> torch.Tensor:
    """Sorted ``|k|`` of reciprocal lattice vectors with ``0 < |k| ≤ k_max``, one of each ``±k``."""
    recip = 2.0 * math.pi * torch.linalg.inv(cell).T
    n = [math.ceil(k_max * float(torch.linalg.norm(a)) / (2.0 * math.pi)) for a in cell]
    m = torch.cartesian_prod(*[torch.arange(-i, i + 1, dtype=torch.float64) for i in n]).reshape(-1, 3)
    half = (
        (m[:, 0] > 0) | ((m[:, 0] == 0) & (m[:, 1] > 0)) | ((m[:, 0] == 0) & (m[:, 1] == 0) & (m[:, 2] > 0))
    )
    norms = torch.linalg.norm(m[half] @ recip, dim=1)
    return torch.sort(norms[norms <= k_max]).values


# --------------------------------------------------------------------------------------------------
# real space (point charges)


def ewald_alpha(n_atoms: int, volume: float) -> float:
    """Ewald splitting ``α = √π (N/V²)^{1/6}`` (Å⁻¹), the classic real/k-space balance."""
    return math.sqrt(math.pi) * (max(n_atoms, 1) / volume**2) ** (1.0 / 6.0)


#: range separation of Gaussian charges narrower than the k-space sum would like: ``s = c ℓ N^{1/6}``
#: for Ewald and ``s = c ℓ`` for PME, ``c`` the fastest measured (energy + forces, NaCl and water,
#: 64–4 096 atoms, σ = 0.71 and 1 Å); split only when ``s`` exceeds the charges' own width by a quarter
SPLIT_EWALD = 0.25
SPLIT_PME = 0.8
SPLIT_MIN_RATIO = 1.25


def split_smearing(volume: float, s_phys: float, n_atoms: int, method: str) -> float:
    """Range separation ``s`` (Å) of the periodic sum of charges of pair width ``s_phys`` in a cell of
    ``volume`` (Å³).

    The k-space part is ``erf(r/√2 s)/r``; the rest is summed over real-space pairs within
    :func:`realspace_cutoff`. Point charges (``s_phys = 0``) use the classic Ewald balance
    (:func:`ewald_alpha`). Gaussian charges keep ``s = s_phys`` (no real-space part) unless the
    balance of the two costs lies well above it: a k-space sum's cutoff or mesh step scales with
    ``s``, so narrow Gaussians (σ ≲ 1 Å) summed wholly in k-space cost up to 15× wide ones.
    """
    if s_phys == 0.0:
        return 1.0 / (math.sqrt(2.0) * ewald_alpha(n_atoms, volume))
    ell = coulomb_length(n_atoms, volume)
    balance = SPLIT_PME * ell if method == "pme" else SPLIT_EWALD * ell * max(n_atoms, 1) ** (1.0 / 6.0)
    return balance if balance >= SPLIT_MIN_RATIO * s_phys else s_phys


@lru_cache(maxsize=256)
def realspace_cutoff(alpha: float, length: float, accuracy: float) -> float:
    """Smallest ``r_c`` (Å) with real-space force and potential estimates ≤ ``accuracy``."""

    def worst(rc: float) -> float:
        r = torch.linspace(rc, rc + 8.0 / alpha, 801, dtype=torch.float64)
        erfc = torch.erfc(alpha * r)
        gauss = (2.0 * alpha / math.sqrt(math.pi)) * torch.exp(-((alpha * r) ** 2))
        dv = erfc / r**2 + gauss / r
        phi = math.sqrt(4.0 * math.pi * float(torch.trapezoid(erfc**2, r))) / math.sqrt(length)
        force = math.sqrt(length) * math.sqrt(4.0 * math.pi * float(torch.trapezoid((r * dv) ** 2, r)))
        return max(phi, force)

    lo, hi = 0.5 / alpha, 10.0 / alpha
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if worst(mid) <= accuracy / SAFETY else (mid, hi)
    return hi


# --------------------------------------------------------------------------------------------------
# PME mesh


@dataclass(frozen=True)
class PMEParameters:
    """Mesh points along the three cell vectors and Lagrange interpolation nodes."""

    mesh: tuple[int, int, int]
    nodes: int


def smooth_size(n: int) -> int:
    """Smallest integer ≥ ``n`` whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = max(int(n), 1)
    while True:
        k = m
        for f in (2, 3, 5):
            while k % f == 0:
                k //= f
        if k == 1:
            return m
        m += 1


def pme_max_step(beta: float, length: float, nodes: int, accuracy: float) -> float:
    """Largest mesh step ``H`` (Å) meeting the PME force and potential estimates with ``nodes``."""
    a, gamma = PME_FORCE[nodes]
    force = (accuracy / (a * (length / beta) ** gamma)) ** (1.0 / (nodes - 1))
    potential = (accuracy / PME_POTENTIAL[nodes]) ** (1.0 / nodes)
    # the mesh must also hold the kernel: truncation at k = π/H, ℓ erfc(πβ/H)/(β√π) ≤ accuracy
    x = 1.0
    while length * math.erfc(x) / (beta * math.sqrt(math.pi)) > accuracy:
        x += 0.05
    return beta * min(force, potential, math.pi / x)


def pme_parameters(
    cell: torch.Tensor, beta: float, n_atoms: int, accuracy: float, nodes: int | None = None
) -> PMEParameters:
    """Cheapest mesh and node count meeting ``accuracy`` (``nodes`` fixes the node count)."""
    lengths = [float(x) for x in torch.linalg.norm(cell.detach().cpu().double(), dim=1)]
    volume = abs(float(torch.linalg.det(cell.detach().cpu().double())))
    ell = coulomb_length(n_atoms, volume)
    best: tuple[float, PMEParameters] | None = None
    for p in [nodes] if nodes is not None else sorted(PME_FORCE):
        step = pme_max_step(beta, ell, p, accuracy)
        mesh = tuple(smooth_size(max(math.ceil(length / step), p)) for length in lengths)
        cost = n_atoms * p**3 + PME_MESH_COST * mesh[0] * mesh[1] * mesh[2]
        if best is None or cost < best[0]:
            best = (cost, PMEParameters(mesh=mesh, nodes=p))
    return best[1]


# --------------------------------------------------------------------------------------------------
# dipole mesh (aiida_emlip.models.dipole_mesh)

#: smooth-PME dipole mesh (B-splines of order p), measured on random charges and dipoles
#: (``ℓ/β`` = 0.7 … 5.6, cubic and triclinic, ``|p| ~ ℓ``), each constant the largest measured ×1.5:
#: ``Δ/scale = D (ℓ/β)^γ (H/β)^order``, ``(D, γ)`` per quantity; forces and dipole fields have
#: ``order = p − 1``, energy and potentials ``order = p``
DIPOLE_MESH = {
    5: {"forces": (0.031, 2.5), "fields": (0.006, 1.75), "energy": (0.0021, 2.0), "potential": (0.004, 0.75)},
    7: {
        "forces": (0.0036, 2.75),
        "fields": (0.00076, 1.75),
        "energy": (0.00022, 2.25),
        "potential": (0.00047, 0.75),
    },
    9: {
        "forces": (0.00046, 3.0),
        "fields": (0.00024, 2.25),
        "energy": (6.2e-5, 2.75),
        "potential": (6.2e-5, 1.25),
    },
}


def dipole_mesh_max_step(cell: torch.Tensor, beta: float, n_atoms: int, nodes: int, accuracy: float) -> float:
    """Largest step ``H`` (Å) of the dipole mesh meeting every estimate with B-splines of order ``nodes``.

    The mesh must also hold the kernel: its Nyquist sphere ``π/H`` reaches the k-space cutoff that the
    dipole terms need at this accuracy (:func:`kspace_cutoff`).
    """
    volume = abs(float(torch.linalg.det(cell.detach().cpu().double())))
    ratio = coulomb_length(n_atoms, volume) / beta
    steps = []
    for quantity, (d, gamma) in DIPOLE_MESH[nodes].items():
        order = nodes - 1 if quantity in ("forces", "fields") else nodes
        steps.append(beta * (accuracy / (d * ratio**gamma)) ** (1.0 / order))
    steps.append(math.pi / kspace_cutoff(cell, beta, n_atoms, accuracy, dipoles=True))
    return min(steps)


def dipole_mesh_parameters(cell: torch.Tensor, beta: float, n_atoms: int, accuracy: float) -> PMEParameters:
    """Cheapest mesh and B-spline order meeting ``accuracy`` for the charge–dipole and dipole–dipole terms.

    ``beta``: width of the kernel ``e^{−β²k²}/k²`` (σ for the energy, ``√((σ² + w²)/2)`` for potentials
    projected on width ``w``). Cost model as for the charges' PME (``N p³ + 0.7 M``).
    """
    lengths = [float(x) for x in torch.linalg.norm(cell.detach().cpu().double(), dim=1)]
    best: tuple[float, PMEParameters] | None = None
    for p in sorted(DIPOLE_MESH):
        step = dipole_mesh_max_step(cell, beta, n_atoms, p, accuracy)
        mesh = tuple(smooth_size(max(math.ceil(length / step), p)) for length in lengths)
        cost = n_atoms * p**3 + PME_MESH_COST * mesh[0] * mesh[1] * mesh[2]
        if best is None or cost < best[0]:
            best = (cost, PMEParameters(mesh=mesh, nodes=p))
    return best[1]
