from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Numerical warnings from privacy code (overflow, a struggling integral) are
    # failures here: an ε computed through them is not to be trusted silently.
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.filterwarnings("error::RuntimeWarning"))
            item.add_marker(pytest.mark.filterwarnings("error::scipy.integrate.IntegrationWarning"))
