"""Fleet data: records, the embedded synthetic fleet, partitions and tokenization.

The front door is :func:`build_fleet`; the rest is exported for the client and
coordinator (``encode_texts``) and for tests.
"""

from fedlora.data.fleet import DeviceData, Fleet, build_fleet, load_records
from fedlora.data.partition import Partition, partition_records
from fedlora.data.records import Record, read_records
from fedlora.data.shakespeare import find_shakespeare, looks_like_play, shakespeare_records
from fedlora.data.synthetic import GENERATOR_VERSION, default_records
from fedlora.data.tokenize import encode_texts

__all__ = [
    "GENERATOR_VERSION",
    "DeviceData",
    "Fleet",
    "Partition",
    "Record",
    "build_fleet",
    "default_records",
    "encode_texts",
    "find_shakespeare",
    "load_records",
    "looks_like_play",
    "partition_records",
    "read_records",
    "shakespeare_records",
]
