"""The cyclic garbage collector's settings for a serving process, set once it has started.

Every streamed request allocates a few hundred short-lived container objects (frames, async generators,
protobuf wrappers); most die by reference counting, but with CPython's default gen-0 threshold (700) the
collector still ran every ~11 requests and traversed the young objects of every request in flight, and its
full collections walked the start-up heap (tokenizer tables, modules, the router's index): measured with
`gc.callbacks` in a frontend under `bench frontend` load, 68 us of CPU per request, 4 us after. As Instagram's
`gc.freeze` note recommends for servers, the heap built at start-up is moved out of the collector's view and
the young generation is collected less often (the memory a cycle can hold meanwhile is bounded by the threshold).
"""

from __future__ import annotations

import gc

#: gen-0 allocations between collections (CPython: 700), and the gen-1 / gen-2 ratios (CPython: 10, 10)
SERVING_THRESHOLD = (10_000, 20, 20)


def tune_for_serving() -> None:
    """Freeze the start-up heap and collect the young generation less often; call once, when ready to serve."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLD)
