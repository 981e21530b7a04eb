"""Fused hot paths: one onnxruntime session per frequent architecture.

The per-block path calls one graph per executed (cell, module) block, and each call costs
dispatch (about 35 us on the reference machine) on top of its arithmetic. For an
architecture seen often, `compose` copies the stem, the selected blocks and the head of the
bundle into ONE graph, with the cell merges written as ONNX `Mul`/`Add` nodes in the
executor's own order (so the two paths agree to rounding), and `FusedCache` keeps a bounded
LRU of such sessions, keyed by architecture code.

Sessions are compiled OFF the request path, by one background thread: an architecture is
admitted after it has been seen `min_count` times, at most one build runs at a time and at
most `builds_per_minute` run a minute, so clients sending explicit architectures cannot make
the server compile a graph per request. The manifest's `frequent_architectures` warm the
cache at start-up (not rate-limited: the bundle is trusted).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service import architecture
from service.bundle import Bundle, session_options

log = logging.getLogger("instanas.service")

try:  # the `onnx` package edits graphs; without it the cache stays empty and the per-block path serves
    import onnx
    from onnx import helper, numpy_helper
except ImportError:  # pragma: no cover - onnx is in the serve extra
    onnx = None

GRAPH_INPUT, GRAPH_OUTPUT = "input", "output"  # every bundle graph's names (training/export.py)


class FusionError(RuntimeError):
    """A graph the composer cannot copy (e.g. one holding subgraphs)."""


def _tensor_names(node) -> list[str]:
    return [*node.input, *node.output]


def copy_graph(src, dst, prefix: str, input_name: str, output_name: str) -> None:
    """Append `src`'s nodes and initializers to `dst` (a GraphProto), every name prefixed, its
    input read from `input_name` and its output written to `output_name`."""

    def rename(name: str) -> str:
        if name == "":  # an omitted optional input stays omitted
            return name
        if name == GRAPH_INPUT:
            return input_name
        if name == GRAPH_OUTPUT:
            return output_name
        return prefix + name

    if [i.name for i in src.input if i.name not in {t.name for t in src.initializer}] != [GRAPH_INPUT] or \
            [o.name for o in src.output] != [GRAPH_OUTPUT]:
        raise FusionError(f"graph {src.name!r} does not have exactly one input {GRAPH_INPUT!r} and one output "
                          f"{GRAPH_OUTPUT!r}")
    for init in src.initializer:
        copy = dst.initializer.add()
        copy.CopyFrom(init)
        copy.name = rename(init.name)
    if len(src.sparse_initializer):
        raise FusionError(f"graph {src.name!r} has sparse initializers")
    for node in src.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise FusionError(f"node {node.name!r} holds a subgraph")
        copy = dst.node.add()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        copy.ClearField("input")
        copy.ClearField("output")
        copy.input.extend(rename(n) for n in node.input)
        copy.output.extend(rename(n) for n in node.output)


class GraphLibrary:
    """The bundle's graphs as ONNX protos (stem, head, blocks), read once, checked against the
    manifest's sha256 (the files were verified at start-up; this re-checks what is read now)."""

    def __init__(self, bundle: Bundle):
        if onnx is None:
            raise FusionError("the onnx package is not installed")
        manifest = bundle.manifest

        def load(entry):
            data = (bundle.path / entry.file).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise FusionError(f"{entry.file} changed on disk after the bundle was verified")
            return onnx.load_from_string(data)

        self.stem, self.head = load(manifest.stem), load(manifest.head)
        self.blocks = {(b.cell, b.module): load(b) for b in manifest.blocks}
        models = [self.stem, self.head, *self.blocks.values()]
        self.ir_version = max(m.ir_version for m in models)
        opsets: dict[str, int] = {}
        for m in models:
            for o in m.opset_import:
                opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        self.opsets = opsets


def compose(library: GraphLibrary, space, executed: np.ndarray, pool: int = 1):
    """One ONNX model computing stem -> the cells of `executed` ((cells, modules) bool, empty-cell
    rule already applied) -> head, input "input", output "output" (logits), dynamic batch.
    With `pool` > 1 (a network at a lower resolution than its bundle's input) the model reads the
    bundle's input and averages each `pool` x `pool` square first, as service/cascade.py's `pool`
    does: cheaper in the graph than in numpy, and every image a cascade serves runs its first stage.

    Merges are written as the executor computes them: a residual cell starts from its input,
    any other from its first selected module; each selected module's output (times 1/k under
    `combine = "mean"` with k modules running, k > 1) is added in module order.
    """
    graph = onnx.GraphProto()
    graph.name = "instanas_fused_" + architecture.encode(executed)
    graph.input.add().CopyFrom(library.stem.graph.input[0])
    graph.output.add().CopyFrom(library.head.graph.output[0])
    h = "stem/out"
    first = GRAPH_INPUT
    if pool > 1:
        for dim in graph.input[0].type.tensor_type.shape.dim[2:]:
            if dim.HasField("dim_value"):
                dim.dim_value *= pool
        first = "pooled"
        graph.node.append(helper.make_node("AveragePool", [GRAPH_INPUT], [first], kernel_shape=[pool, pool],
                                           strides=[pool, pool], name="pool"))
    copy_graph(library.stem.graph, graph, "stem/", first, h)
    for cell in space.cells:
        c = cell.index
        modules = np.flatnonzero(executed[c])
        if len(modules) == 0:
            if not cell.skippable:
                raise ValueError(f"cell {c} cannot be empty (apply the empty-cell rule first)")
            continue  # identity skip
        acc = h if cell.skippable else None
        scale = None
        if space.combine == "mean" and len(modules) > 1:
            scale = f"c{c}/scale"
            graph.initializer.append(numpy_helper.from_array(np.array(1.0 / len(modules), np.float32), scale))
        for m in modules:
            y = f"c{c}m{m}/out"
            copy_graph(library.blocks[(c, int(m))].graph, graph, f"c{c}m{m}/", h, y)
            if scale is not None:
                graph.node.append(helper.make_node("Mul", [y, scale], [y + "_scaled"], name=f"c{c}m{m}/merge_scale"))
                y += "_scaled"
            if acc is None:
                acc = y
            else:
                graph.node.append(helper.make_node("Add", [acc, y], [f"c{c}/acc{m}"], name=f"c{c}m{m}/merge_add"))
                acc = f"c{c}/acc{m}"
        h = acc
    copy_graph(library.head.graph, graph, "head/", h, GRAPH_OUTPUT)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in library.opsets.items()],
                              producer_name="instanas.fused")
    model.ir_version = library.ir_version
    return model


class FusedGraph:
    """A compiled fused architecture: (N, 3, H, W) float32 -> (N, classes) logits."""

    def __init__(self, code: str, session: ort.InferenceSession):
        self.code, self.session = code, session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(x)})[0]


def build(library: GraphLibrary, space, executed: np.ndarray, intra_op_threads: int = 1, pool: int = 1) -> FusedGraph:
    """Compose and compile the fused graph of `executed`. Its session runs as every bundle graph
    does (service.bundle.session_options) but without onnxruntime's CPU memory arena: on the
    default bundle that is about 5 MiB a session instead of 11, at the same speed."""
    model = compose(library, space, executed, pool)
    options = session_options(intra_op_threads)
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return FusedGraph(architecture.encode(executed), session)


@dataclass
class _Stats:
    hits: int = 0  # images served by a fused graph
    misses: int = 0  # images whose architecture had none ready
    builds: int = 0
    build_errors: int = 0
    evictions: int = 0


class FusedCache:
    """Bounded LRU of fused sessions by architecture code, filled by a background builder.

    `get(code, images)` is what the request path calls: a dictionary look-up under a lock,
    never a build. A miss counts a sighting; the `min_count`-th sighting queues a build.
    `metrics` (service.metrics.Metrics or None) receives hits, misses, size, builds. Every graph
    reads the bundle's input: one of a network at a lower resolution pools it itself (`compose`).
    """

    def __init__(self, bundle: Bundle, *, size: int = 32, min_count: int = 3, builds_per_minute: float = 30,
                 intra_op_threads: int = 1, metrics=None, max_tracked: int = 4096, clock=time.monotonic):
        self.space = bundle.manifest.search_space
        self.size, self.min_count, self.builds_per_minute = size, max(1, min_count), builds_per_minute
        self.intra_op_threads, self.metrics, self._clock = intra_op_threads, metrics, clock
        self.enabled = size > 0 and onnx is not None
        if size > 0 and onnx is None:
            log.warning("fused graphs disabled: the onnx package is not installed")
        self._bundle = bundle
        self._libraries: dict[str | None, GraphLibrary] = {}  # by network (None: the bundle's own graphs)
        self._graphs: OrderedDict[str, FusedGraph] = OrderedDict()
        self._seen: OrderedDict[str, int] = OrderedDict()  # sightings of architectures not cached, bounded
        self._max_tracked = max(max_tracked, 4 * size)
        self._warm: deque[tuple[str | None, np.ndarray]] = deque()  # (network, architecture)
        self._admitted: deque[tuple[str | None, np.ndarray]] = deque()
        self._pending: set[str] = set()  # queued or being built
        self._failed: set[str] = set()
        self._recent_builds: deque[float] = deque()  # start times of rate-limited builds, last minute
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = _Stats()

    # --- the request path --------------------------------------------------------------------

    def get(self, code: str, images: int = 1, executed: np.ndarray | None = None,
            network: str | None = None) -> FusedGraph | None:
        """The fused graph of `code` (of `network`, one of the bundle's networks; None: its own graphs)
        if it is compiled; else None, and the sighting is counted (`executed`, the code's matrix, lets
        a build be queued without decoding the code)."""
        if not self.enabled:
            return None
        key = _key(network, code)
        with self._cond:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
                self.stats.hits += images
            else:
                self.stats.misses += images
                self._sighted(key, images, executed, network)
        if self.metrics is not None:  # after the response, for a request run on the event loop
            self.metrics.later((self.metrics.fused_hits if graph is not None else self.metrics.fused_misses).inc, images)
        return graph

    def network(self, name: str) -> "NetworkCache":
        """This cache as one of the bundle's networks sees it (the executor of a cascade's network)."""
        return NetworkCache(self, name)

    def _sighted(self, key: str, images: int, executed: np.ndarray | None, network: str | None) -> None:
        if key in self._pending or key in self._failed:
            return
        count = self._seen.pop(key, 0) + images
        if count < self.min_count:
            self._seen[key] = count
            while len(self._seen) > self._max_tracked:
                self._seen.popitem(last=False)
            return
        if len(self._admitted) >= max(self.size, 1):
            self._seen[key] = count  # the queue is full: admitted again on a later sighting
            return
        code = key.rpartition("/")[2]
        executed = self._matrix(code, network) if executed is None else np.array(executed, bool)
        self._pending.add(key)
        self._admitted.append((network, executed))
        self._cond.notify_all()

    # --- warm-up, the builder thread ------------------------------------------------------------

    def _space(self, network: str | None):
        return self.space if network is None else self._bundle.networks[network].manifest.search_space

    def _matrix(self, code: str, network: str | None = None) -> np.ndarray:
        space = self._space(network)
        matrix = architecture.decode(code, space.num_cells, space.num_modules)
        return architecture.apply_empty_cell_rule(matrix[None], space)[0]

    def warm(self, codes: list[str], network: str | None = None) -> int:
        """Queue builds of `codes` (most important first; of `network`, None: the bundle's own graphs),
        not rate-limited; returns how many were queued."""
        if not self.enabled:
            return 0
        queued = 0
        with self._cond:
            for code in codes[: self.size]:
                try:
                    matrix = self._matrix(code, network)
                except ValueError as exc:
                    log.warning("frequent architecture %r skipped: %s", code, exc)
                    continue
                key = _key(network, architecture.encode(matrix))
                if key in self._pending or key in self._graphs:
                    continue
                self._pending.add(key)
                self._warm.append((network, matrix))
                queued += 1
            self._cond.notify_all()
        return queued

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._builder, name="instanas-fused-builder", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Until nothing is queued or being built (tests, warm-up); False on timeout."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._pending:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def __len__(self) -> int:
        return len(self._graphs)

    def peek(self, code: str, network: str | None = None) -> FusedGraph | None:
        """The compiled graph of `code`, if any, counting neither a hit nor a sighting (warm-up checks)."""
        with self._cond:
            return self._graphs.get(_key(network, code))

    def codes(self) -> list[str]:
        with self._cond:
            return list(self._graphs)

    def _next(self) -> tuple[tuple[str | None, np.ndarray], bool] | None:
        """The next architecture to build (warm-up first), waiting for the rate limit; None to stop."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._warm:
                    return self._warm.popleft(), True
                if self._admitted:
                    now = self._clock()
                    while self._recent_builds and now - self._recent_builds[0] >= 60.0:
                        self._recent_builds.popleft()
                    if len(self._recent_builds) < self.builds_per_minute:
                        self._recent_builds.append(now)
                        return self._admitted.popleft(), False
                    wait = 60.0 - (now - self._recent_builds[0]) if self._recent_builds else 60.0
                    self._cond.wait(min(max(wait, 0.01), 1.0))
                else:
                    self._cond.wait(1.0)

    def _builder(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            (network, executed), _warm = item
            code = _key(network, architecture.encode(executed))
            t0 = time.perf_counter()
            try:
                if network not in self._libraries:
                    self._libraries[network] = GraphLibrary(self._bundle if network is None
                                                            else self._bundle.networks[network])
                own = self._space(network)
                graph = build(self._libraries[network], own, executed, self.intra_op_threads,
                              pool=self.space.input_size // own.input_size)
            except Exception as exc:  # noqa: BLE001 - a failed build must never reach requests: per-block serves
                log.warning("fused graph for %s not built: %s", code, exc)
                with self._cond:
                    self._pending.discard(code)
                    if len(self._failed) >= self._max_tracked:
                        self._failed.clear()
                    self._failed.add(code)
                    self.stats.build_errors += 1
                    self._cond.notify_all()
                if self.metrics is not None:
                    self.metrics.fused_builds.labels("error").inc()
                continue
            seconds = time.perf_counter() - t0
            with self._cond:
                self._graphs[code] = graph
                self._graphs.move_to_end(code)
                self._seen.pop(code, None)
                evicted = 0
                while len(self._graphs) > self.size:
                    self._graphs.popitem(last=False)
                    evicted += 1
                self.stats.evictions += evicted
                self._pending.discard(code)
                self.stats.builds += 1
                size = len(self._graphs)
                self._cond.notify_all()
            if self.metrics is not None:
                self.metrics.fused_builds.labels("ok").inc()
                self.metrics.fused_build_duration.observe(seconds)
                self.metrics.fused_cache_size.set(size)
                if evicted:
                    self.metrics.fused_evictions.inc(evicted)
            log.debug("fused graph for %s built in %.3f s", code, seconds)


def _key(network: str | None, code: str) -> str:
    """The cache's key of an architecture: its code, after `<network>/` for one of the bundle's networks."""
    return code if network is None else f"{network}/{code}"


def split_key(key: str) -> tuple[str | None, str]:
    """(network, code) of a cache key (`codes()`); network None for the bundle's own graphs."""
    network, _, code = key.rpartition("/")
    return network or None, code


class NetworkCache:
    """A FusedCache seen from one of its bundle's networks: `get` and `warm` name the network."""

    def __init__(self, cache: FusedCache, network: str):
        self.cache, self.name = cache, network

    @property
    def enabled(self) -> bool:
        return self.cache.enabled

    def get(self, code: str, images: int = 1, executed: np.ndarray | None = None) -> FusedGraph | None:
        return self.cache.get(code, images, executed, self.name)

    def warm(self, codes: list[str]) -> int:
        return self.cache.warm(codes, self.name)
