"""The one error of the data layer, importable by every data module without import circles."""
from __future__ import annotations


class DataError(ValueError):
    """Data that is missing or unusable; the message says where and what to do."""
