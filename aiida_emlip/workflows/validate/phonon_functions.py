"""Calcfunctions of the phonon workchain: displacements, model response, ph.x tensors, analysis, figures.

The physics is in :mod:`aiida_emlip.analysis.phonons` and :mod:`aiida_emlip.models.response` (pure);
these wrappers keep every step in the provenance graph.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_emlip import schema
from aiida_emlip.analysis import phonons as analysis
from aiida_emlip.data import EmlipDatasetData
from aiida_emlip.data.model import EmlipModelData

#: Key of the host (primitive) cell in the DFT dataset: the pw.x run that ph.x continues.
HOST = "host"
#: stdout of ph.x in the retrieved folder (aiida-quantumespresso's default output name).
PH_STDOUT = "aiida.out"


def supercell_key(index: int) -> str:
    return f"d{index:03d}"


@calcfunction
def phonon_displacements(structure: orm.StructureData, settings: orm.Dict) -> dict[str, orm.Data]:
    """phonopy's displaced supercells of ``structure``: the ``setup``, a dataset and one structure each.

    ``settings``: ``supercell`` (3 repeats or a 3×3 matrix), ``distance`` (Å), ``plusminus`` and
    ``reference`` (the undisplaced supercell first). Supercell ``k`` is keyed ``d000``, ``d001``, ...
    in the order of phonopy's displacements (after the reference).
    """
    values = settings.get_dict()
    setup, supercells = analysis.build_displacements(
        structure.get_ase(),
        values["supercell"],
        distance=float(values["distance"]),
        plusminus=values["plusminus"],
        reference=bool(values["reference"]),
    )
    keys = [supercell_key(k) for k in range(len(supercells))]
    setup["keys"] = keys
    frames = []
    for key, atoms in zip(keys, supercells):
        atoms.info["key"] = key
        atoms.info[schema.TOTAL_CHARGE] = 0.0
        atoms.info[schema.CONFIG_TYPE] = "phonon_supercell"
        frames.append(atoms)
    outputs: dict[str, orm.Data] = {
        "setup": orm.Dict(setup),
        "supercells": EmlipDatasetData(frames=frames),
    }
    for key, atoms in zip(keys, supercells):
        outputs[key] = orm.StructureData(ase=atoms)
    return outputs


@calcfunction
def model_dielectric(model: EmlipModelData, structure: orm.StructureData, settings: orm.Dict) -> orm.Dict:
    """Born charges (when ``settings['born']``), polarisability and ε∞ of ``structure`` from ``model``."""
    from aiida_emlip.models.response import dielectric_response

    atoms = structure.get_ase()
    atoms.info[schema.TOTAL_CHARGE] = 0.0
    response = dielectric_response(model.load(device="cpu"), atoms, born=bool(settings["born"]))
    return orm.Dict(response.to_dict())


@calcfunction
def ph_dielectric(retrieved: orm.FolderData) -> orm.Dict:
    """ε∞ and Born charges from the ph.x stdout (``epsil = .true.``), in the schema's convention."""
    return orm.Dict(analysis.parse_ph_dielectric(retrieved.base.repository.get_object_content(PH_STDOUT)))


def _forces(dataset: EmlipDatasetData, keys: list[str]) -> list[np.ndarray] | str:
    frames = {atoms.info.get("key"): atoms for atoms in dataset.to_ase()}
    missing = [k for k in keys if k not in frames]
    if missing:
        return f"no forces for supercells {missing}"
    bad = [k for k in keys if frames[k].info.get("scf_converged") is False]
    if bad:
        return f"SCF not converged for supercells {bad}"
    return [np.asarray(frames[k].arrays[schema.FORCES], dtype=float) for k in keys]


@calcfunction
def analyse_phonons(
    setup: orm.Dict, settings: orm.Dict, dft: EmlipDatasetData, **inputs: orm.Data
) -> dict[str, orm.Dict]:
    """Phonons of DFT and every model from their supercell forces, and the comparison rows.

    ``inputs``: ``dft_dielectric`` (ph.x ε∞ and Z*), and per model ``predictions_<label>``
    (emlip.evaluate predictions on the supercells) and ``dielectric_<label>`` (its Born charges and ε∞,
    used for the NAC when they hold Born charges).
    """
    values = setup.get_dict()
    keys = values["keys"]
    methods: dict[str, dict] = {}
    notes: dict[str, list[str]] = {}
    forces = _forces(dft, keys)
    if isinstance(forces, str):
        raise ValueError(f"DFT: {forces}")
    reference = {"forces": forces, "notes": []}
    if "dft_dielectric" in inputs:
        tensors = inputs["dft_dielectric"].get_dict()
        if tensors.get("born_charges") is not None:
            reference.update(born=tensors["born_charges"], epsilon=tensors["epsilon"])
    else:
        reference["notes"].append("no ph.x: DFT bands without the non-analytical correction")
    methods[analysis.REFERENCE] = reference
    labels = sorted(k[len("predictions_") :] for k in inputs if k.startswith("predictions_"))
    for label in labels:
        forces = _forces(inputs[f"predictions_{label}"], keys)
        if isinstance(forces, str):
            notes[label] = [forces]
            continue
        method = {"forces": forces, "notes": []}
        dielectric = inputs.get(f"dielectric_{label}")
        if dielectric is not None:
            tensors = dielectric.get_dict()
            method["notes"].extend(tensors.get("notes", []))
            if tensors.get(schema.BORN_CHARGES) is not None:
                method.update(born=tensors[schema.BORN_CHARGES], epsilon=tensors["epsilon"])
        else:
            method["notes"].append("no Born charges: bands without the non-analytical correction")
        methods[label] = method
    result = analysis.analyse(values, methods, settings.get_dict())
    comparison = result["comparison"]
    for label in labels:
        dielectric = inputs.get(f"dielectric_{label}")
        if label in comparison and dielectric is not None:
            comparison[label]["born_asr_residual"] = dielectric.get_dict().get("asr_residual")
            comparison[label]["epsilon"] = dielectric.get_dict().get("epsilon")
        if label in notes:
            comparison[label] = {"error": "; ".join(notes[label])}
    if "dft_dielectric" in inputs:
        comparison[analysis.REFERENCE]["born_asr_residual"] = inputs["dft_dielectric"].get("asr_residual")
        comparison[analysis.REFERENCE]["epsilon"] = inputs["dft_dielectric"].get("epsilon")
    return {"phonons": orm.Dict(result), "comparison": orm.Dict(comparison)}


@calcfunction
def phonon_figures(phonons: orm.Dict) -> dict[str, orm.SinglefileData]:
    """Band structures and densities of states of DFT and every model as PNG files."""
    from aiida_emlip.report.figures_phonons import write_figures

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_figures(phonons.get_dict(), Path(tmp))
        return {name: orm.SinglefileData(file=str(path), filename=path.name) for name, path in paths.items()}
