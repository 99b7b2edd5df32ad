"""An in-memory audit sink for tests: what the shippers delivered, in order."""

from __future__ import annotations

from typing import Any


class MemorySink:
    name = "memory"
    batch_interval = 0.0

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def deliver(self, batch: list[dict[str, Any]]) -> None:
        self.events.extend(batch)
