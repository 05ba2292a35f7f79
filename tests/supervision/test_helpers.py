"""The tests' own waiting helpers stay bounded even while freezegun freezes the clock."""

from __future__ import annotations

import time

import pytest
from freezegun import freeze_time

from tests.supervision import eventually

FROZEN = "2026-11-25T03:02:11.402113Z"


@pytest.mark.timeout(10)
async def test_eventually_times_out_under_frozen_time() -> None:
    started = time.perf_counter()
    with freeze_time(FROZEN, real_asyncio=True):
        assert time.monotonic() == time.monotonic()  # frozen for the code under test...
        with pytest.raises(AssertionError, match=r"timed out after 0\.05s"):
            await eventually(lambda: False, timeout=0.05)  # ...but not for the helper's deadline
    assert time.perf_counter() - started < 2
