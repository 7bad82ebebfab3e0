"""aiida-emlip: electrostatic machine-learning interatomic potentials in one AiiDA provenance graph."""

__version__ = "0.1.0"
