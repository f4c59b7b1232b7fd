"""Faust shell tests patch faust-streaming's consumer class (``hold_faust_gaps``): undo it after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def restore_faust_consumer() -> Iterator[None]:
    from faust.transport.consumer import Consumer

    add_gap, had_release = Consumer.__dict__["_add_gap"], "release_gap" in Consumer.__dict__
    yield
    Consumer._add_gap = add_gap  # type: ignore[method-assign]
    if not had_release and "release_gap" in Consumer.__dict__:
        del Consumer.release_gap  # type: ignore[attr-defined]
