"""Fleet data: records, the embedded synthetic fleet, partitions and tokenization.

The front door is :func:`build_fleet`; the rest is exported for tests. Tokenization
(:mod:`fedlora.data.tokenize`, which needs torch) is imported from its module, so the
fleet's records can be read without loading torch (the simulation's calibration
prefetch does).
"""

from fedlora.data.fleet import DeviceData, Fleet, build_fleet, load_records
from fedlora.data.partition import Partition, partition_records
from fedlora.data.records import Record, read_records
from fedlora.data.shakespeare import find_shakespeare, looks_like_play, shakespeare_records
from fedlora.data.synthetic import GENERATOR_VERSION, default_records

__all__ = [
    "GENERATOR_VERSION",
    "DeviceData",
    "Fleet",
    "Partition",
    "Record",
    "build_fleet",
    "default_records",
    "find_shakespeare",
    "load_records",
    "looks_like_play",
    "partition_records",
    "read_records",
    "shakespeare_records",
]
