"""Pure analysis of validation results (numpy, ASE, pymatgen, phonopy; no AiiDA)."""
