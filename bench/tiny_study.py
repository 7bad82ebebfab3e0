"""The tiny study (6 water configurations in two charge states, two designs, 3 epochs) as a spec text, for
the benchmarks that launch a real study and for the study tests: seconds of pw.x and training each."""

from __future__ import annotations


def tiny_spec(
    name: str = "tiny",
    description: str = "water in two charge states, two designs",
    max_concurrent: int = 3,
    budget: int = 10,
    extra: str = "",
    title: str = "Tiny study",
) -> str:
    """The spec; ``extra`` (YAML lines, e.g. a ``validations`` block) goes before the report."""
    return f"""\
name: {name}
description: {description}
dft:
  protocol: fast
  max_concurrent: {max_concurrent}
  overrides: {{ecutwfc: 20.0, ecutrho: 160.0, conv_thr_per_atom: 1.0e-8, max_iterations: 1}}
budget: {{max_dft_configurations: {budget}}}
systems:
  water:
    structure: {{molecule: H2O, box: 8.0}}
    rattle: {{n: 3, stdev: 0.05}}
    charges: [0, 1]
    isolated: true
split: {{held_out_fraction: 0.3, seed: 0}}
training:
  epochs: 3
  backbone: {{num_channels: 4, max_L: 0, max_ell: 1, correlation: 1, num_interactions: 1, r_max: 3.5,
             mlp_hidden: 4}}
  options: {{environment_variables: {{OMP_NUM_THREADS: "1"}}}}
designs: [sr, charges]
{extra}report: {{title: {title}}}
"""
