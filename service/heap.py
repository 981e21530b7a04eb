"""Garbage-collection pauses kept off the request path.

CPython's cyclic collector walks every object of the oldest generation at each full
collection. A ready server holds a few hundred thousand such objects made at start-up (the
bundles' parsed graphs and manifests, FastAPI's and pydantic's models), none of them ever
garbage, and every full collection paused whichever thread ran it for tens of milliseconds:
at concurrency 32 the p99 was about 4x the p50, with every measured stage of the requests
well under the p99 (docs/RESULTS.md, "One socket per worker, and the collector out of the
way"). `freeze()` moves all that into the
permanent generation, which collections skip: it runs once the server is ready, and again
after a reload has retired the old models. Frozen objects are still freed by reference
counting; what `freeze()` first unfreezes and collects is the rest (cycles left by a retired
bundle).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("instanas.service")


def freeze() -> int:
    """Collect what is garbage now, then exempt everything left from later collections.
    Returns the number of objects frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    log.info("%d objects frozen out of garbage collection", count)
    return count
