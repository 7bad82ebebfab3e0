"""AiiDA data types of aiida-emlip."""

from .dataset import EmlipDatasetData

__all__ = ("EmlipDatasetData",)
