"""Data: the generic jsonl format, its checker, a lazy dataset and converters."""

from phi3v.data.dataset import DataError, JsonlDataset, read_records
from phi3v.data.schema import Record, parse_record

__all__ = ["DataError", "JsonlDataset", "Record", "parse_record", "read_records"]
