"""fedlora.secagg.version: a fleet that does not all speak fedlora's SecAgg+ is refused."""

from __future__ import annotations

import pytest

from fedlora.errors import FedloraError
from fedlora.secagg import PROTOCOL_KEY, PROTOCOL_VERSION
from fedlora.secagg.version import check_fleet

NEW = {"device": "d1", "num_records": 5, PROTOCOL_KEY: PROTOCOL_VERSION}


def test_a_fleet_that_speaks_our_version_passes():
    check_fleet({1: NEW, 2: {**NEW, "device": "d2"}})


def test_a_mixed_fleet_is_refused_with_one_line_naming_the_nodes():
    devices = {1: NEW, 2: {"device": "d2", "num_records": 5}, 3: {**NEW, PROTOCOL_KEY: 2}}

    with pytest.raises(FedloraError) as err:
        check_fleet(devices)

    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("SecAgg+ refuses a mixed fleet: the coordinator speaks fedlora-v1")
    assert "2 of 3 device(s)" in msg
    assert "node 2 (device d2): flower" in msg and "node 3 (device d1): fedlora-v2" in msg
    assert "node 1" not in msg


def test_a_fleet_of_old_devices_is_refused_too():
    with pytest.raises(FedloraError, match=r"refuses a fleet: .* 1 of 1 device"):
        check_fleet({5: {"device": "d5"}})
