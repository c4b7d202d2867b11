from __future__ import annotations

from collections.abc import Iterator

import pytest

from marketpipe.sim.server import SimServer
from tests.service.vendors import reset, three_faces


@pytest.fixture(scope="module")
def vendors() -> Iterator[dict[str, SimServer]]:
    with three_faces() as faces:
        yield faces


@pytest.fixture
def clean_vendors(vendors: dict[str, SimServer]) -> Iterator[dict[str, SimServer]]:
    yield vendors
    reset(vendors)
