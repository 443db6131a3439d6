"""Data: the data set and its views, sources (one registry), the labeled/unlabeled pool, and data versions."""
from tidal.data.dataset import Dataset
from tidal.data.errors import DataError
from tidal.data.sources import SOURCES, load_dataset, materialize

__all__ = ["SOURCES", "Dataset", "DataError", "load_dataset", "materialize"]
