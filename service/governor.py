"""Load-driven operating points: while requests queue, the default moves to faster points.

A bundle with several operating points can trade accuracy for latency inside one model.
When a request names no point, no budget and no architecture, the server answers with the
bundle's default, unless the recent queue time (an exponential moving average of how long
requests waited for a free executor, weighted by time so that an idle spell empties it) is
above `target_ms`: then it steps to the next faster
point, one step per `cooldown_s` at most, and steps back while the average stays below a
quarter of the target. Responses and `instanas_operating_point_total` say `reason="load"`
for images answered by a point other than the default for this reason.
"""

from __future__ import annotations

import math
import threading
import time

from service.manifest import Manifest
from service.operating_points import mean_latency_ms


class LoadGovernor:
    def __init__(self, manifest: Manifest, target_ms: float, *, cooldown_s: float = 1.0, smoothing: float = 0.2,
                 horizon_s: float = 1.0, clock=time.monotonic):
        default = manifest.default_controller
        timed = {p.name: mean_latency_ms(p) for p in manifest.points}
        faster = [] if default is None or timed.get(default) is None else sorted(
            (name for name, ms in timed.items() if ms is not None and ms < timed[default]), key=lambda n: -timed[n])
        self.ladder = [default, *faster]  # the default, then ever faster points
        self.enabled = target_ms > 0 and len(self.ladder) > 1
        self.target_s, self.cooldown_s, self.smoothing, self.horizon_s = target_ms / 1e3, cooldown_s, smoothing, horizon_s
        self.level = 0
        self.queue_s = 0.0  # the moving average
        self._changed = self._last = float("-inf")
        self._clock = clock
        self._lock = threading.Lock()

    def observe(self, queue_s: float) -> None:
        """One request's wait for an executor; may move the level one step."""
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            # each observation weighs at least `smoothing`, more after a quiet spell
            weight = max(self.smoothing, 1 - math.exp(-(now - self._last) / self.horizon_s))
            self._last = now
            self.queue_s += weight * (queue_s - self.queue_s)
            if now - self._changed < self.cooldown_s:
                return
            if self.queue_s > self.target_s and self.level < len(self.ladder) - 1:
                self.level += 1
                self._changed = now
            elif self.queue_s < self.target_s / 4 and self.level > 0:
                self.level -= 1
                self._changed = now

    def current(self) -> tuple[str | None, str]:
        """(the point to answer with by default, why: "default" or "load")."""
        level = self.level
        return self.ladder[level], "default" if level == 0 else "load"
