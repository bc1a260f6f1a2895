"""Timing helpers: interleaved best-of-N so that ratios measured in one run share the machine's state."""
from __future__ import annotations

import time
from typing import Callable


def best_of(fns: dict[str, Callable[[], object]], repeats: int = 7, min_seconds: float = 0.05) -> dict[str, float]:
    """Best wall time (ms) of each callable; the callables run round-robin so load affects all alike."""
    for fn in fns.values():  # warm-up (allocations, lazy programming)
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds or calls >= 50:
                    break
            best[name] = min(best[name], 1e3 * elapsed / calls)
    return best
