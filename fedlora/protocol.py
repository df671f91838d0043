"""Keys of the instructions the coordinator sends a device with every training request.

The wire contract between :mod:`fedlora.server` (which writes them) and
:mod:`fedlora.client` (which reads them) lives below both, so neither imports the
other. What a device reports about its privacy spend is in
:mod:`fedlora.privacy.spend`.
"""

from __future__ import annotations

#: The round being trained (1-based).
ROUND_KEY = "server-round"
#: The run's number of rounds (a calibrating device plans its budget over them).
NUM_ROUNDS_KEY = "num-rounds"

#: The config record a training request carries (Flower's ``fitins_to_recorddict``), in
#: both workflows: the plain training message, and SecAgg+'s masked-vector stage.
FIT_CONFIG_RECORD = "fitins.config"
