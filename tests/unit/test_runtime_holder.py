"""broker.resources.RuntimeHolder: a runtime replaced by reloads is collected, even though the start-up heap
that built the first one was frozen out of the collector (broker.server.serve)."""

from __future__ import annotations

import gc
import weakref
from typing import Any, cast

from broker.resources import RuntimeHolder
from broker.runtime import Runtime


class _Cyclic:
    """Stands for a runtime: compiled objects that refer to each other (a reference cycle)."""

    def __init__(self) -> None:
        self.me: Any = self


def test_the_first_runtime_is_collected_after_two_swaps_although_it_was_frozen() -> None:
    first = _Cyclic()
    gone = weakref.ref(first)
    holder = RuntimeHolder(cast(Runtime, first))
    gc.collect()
    gc.freeze()
    try:
        del first
        holder.swap(cast(Runtime, _Cyclic()))  # the first is "previous" (a rollback may return to it)
        holder.swap(cast(Runtime, _Cyclic()))  # now it is garbage
        gc.collect()
        assert gone() is None
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
