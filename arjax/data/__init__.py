"""Image datasets behind one interface, and deterministic, resumable, globally sharded batches."""

from arjax.data.batches import Batches
from arjax.data.sources import DataConfig, DataError, ImageSource, open_source

__all__ = ["Batches", "DataConfig", "DataError", "ImageSource", "open_source"]
