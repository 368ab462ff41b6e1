"""The event-loop lag probe of ``scripts/bench_wait.py``: a trigger the triggerer runs beside the waiting
batches. It sleeps ``interval`` seconds in a loop and records how late each wake-up was (the time the
loop was busy with other triggers), writing ``[[unix time, lag seconds], ...]`` to ``out`` every second,
until ``stop`` exists. Imported by class path in the triggerer (``scripts/`` is on its ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class LoopLagProbe(BaseTrigger):
    def __init__(self, out: str, stop: str, interval: float = 0.1) -> None:
        super().__init__()
        self.out, self.stop, self.interval = out, stop, float(interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{__name__}.LoopLagProbe", {"out": self.out, "stop": self.stop, "interval": self.interval}

    async def run(self):
        samples: list[list[float]] = []
        written = time.monotonic()
        while not Path(self.stop).exists():
            start = time.monotonic()
            await asyncio.sleep(self.interval)
            samples.append([round(time.time(), 3), round(time.monotonic() - start - self.interval, 4)])
            if time.monotonic() - written >= 1:
                self._write(samples)
                written = time.monotonic()
        self._write(samples)
        yield TriggerEvent({"samples": len(samples)})

    def _write(self, samples: list[list[float]]) -> None:
        part = f"{self.out}.part"
        with open(part, "w") as fh:
            json.dump(samples, fh)
        os.replace(part, self.out)
