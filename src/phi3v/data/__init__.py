"""Data: collation (the jsonl format, dataset and converters come with the data tools)."""

from phi3v.data.collate import collate

__all__ = ["collate"]
