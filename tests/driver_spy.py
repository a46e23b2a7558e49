"""What reaches a job's driver: every value it gets from Ray (`ray.get`), puts into Ray
(`ray.put`) or gets from a Ray dataset (iterating, taking, aggregating) is scanned for a
marker string that only corpus texts contain, so a test can show the corpus never passes
through the driver."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CONSUMERS = ("iter_batches", "iter_rows", "take", "take_all", "take_batch", "to_pandas",
             "to_arrow_refs", "count", "max", "min", "sum", "unique")


class DriverSpy:
    """Counts the values the driver received and those holding `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.received = 0
        self.leaks: list[str] = []

    def scan(self, value: Any) -> Any:
        self.received += 1
        if self._holds(value):
            self.leaks.append(repr(value)[:200])
        return value

    def _holds(self, value: Any) -> bool:
        if isinstance(value, str):
            return self.marker in value
        if isinstance(value, (pa.Table, pa.RecordBatch)):
            return any(self._holds(column) for column in value.columns)
        if isinstance(value, (pa.Array, pa.ChunkedArray)):
            if pa.types.is_string(value.type) or pa.types.is_large_string(value.type):
                return bool(pc.any(pc.match_substring(value, self.marker)).as_py())
            return self.marker in str(value) if pa.types.is_nested(value.type) else False
        if isinstance(value, np.ndarray):
            return value.dtype.kind in "OUS" and any(self._holds(v) for v in value.ravel())
        if isinstance(value, dict):
            return any(self._holds(v) for v in value.values())
        if isinstance(value, (list, tuple, set)):
            return any(self._holds(v) for v in value)
        if hasattr(value, "to_string") and hasattr(value, "columns"):  # a pandas frame
            return self.marker in value.to_string()
        return False


def _lazy(value: Any) -> bool:
    eager = (str, bytes, list, tuple, dict, set, pa.Table, np.ndarray)
    return (isinstance(value, Iterable) and not isinstance(value, eager)
            and not hasattr(value, "columns"))


@contextlib.contextmanager
def spy_on_driver(monkeypatch: Any, marker: str) -> Iterator[DriverSpy]:
    """Patch `ray.get`, `ray.put` and the dataset methods that hand data to the driver."""
    import ray
    import ray.data

    spy = DriverSpy(marker)
    real_get, real_put = ray.get, ray.put
    monkeypatch.setattr(ray, "get", lambda *a, **kw: spy.scan(real_get(*a, **kw)))
    monkeypatch.setattr(ray, "put", lambda value, *a, **kw: real_put(spy.scan(value), *a, **kw))
    for name in CONSUMERS:
        real = getattr(ray.data.Dataset, name)

        def wrapped(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            result = _real(self, *args, **kwargs)
            if _lazy(result):  # an iterator or iterable of batches: scan what it yields
                return (spy.scan(item) for item in result)
            return spy.scan(result)

        monkeypatch.setattr(ray.data.Dataset, name, wrapped)
    yield spy
