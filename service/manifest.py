"""The model bundle's manifest: the one contract between training and serving.

`training.export` writes it, `service.bundle` reads it; both use these models, so
the two cannot disagree. Everything the executor needs to know about a bundle is
here, and every file in the bundle is listed with its sha256.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 3
# A bundle folder still being written ends in this; it moves into place, renamed, once checked,
# and repositories skip it meanwhile.
PARTIAL_SUFFIX = ".partial"
# A run's static MobileNetV2 bundle (the baseline every point is measured against) is named after
# the run's bundle with this suffix, and lies beside it.
STATIC_TWIN_SUFFIX = "-mobilenet_v2"
# Version 1 had one `controller` and a bundle-level `evaluation`; `upgrade` reads it as a
# bundle with one operating point named "default". Version 3 added `networks` and `cascades`.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModuleSpec(_Strict):
    """One candidate module of a cell, named like a timm block string (`ir_k3_e6`)."""

    name: str
    kind: Literal["inverted_residual", "basic"]
    kernel: int = Field(ge=1)
    expansion: int = Field(ge=1)


class CellSpec(_Strict):
    """One cell of the meta-graph: its shapes and its parallel candidate modules."""

    index: int = Field(ge=0)
    in_channels: int = Field(ge=1)
    out_channels: int = Field(ge=1)
    stride: int = Field(ge=1)
    input_size: int = Field(ge=1, description="Height = width of the cell's input feature map.")
    modules: list[ModuleSpec] = Field(min_length=1)

    @property
    def output_size(self) -> int:
        return (self.input_size - 1) // self.stride + 1

    @property
    def skippable(self) -> bool:
        """An empty cell is an identity skip only where input and output shapes match."""
        return self.stride == 1 and self.in_channels == self.out_channels


class SearchSpace(_Strict):
    """The meta-graph as data: stem, cells x modules, head."""

    input_size: int = Field(ge=8)
    width_multiplier: float = Field(gt=0)
    stem_channels: int
    stem_stride: int
    head_channels: int
    num_classes: int = Field(ge=2)
    cells: list[CellSpec] = Field(min_length=1)
    empty_cell_rule: Literal["identity_else_first_module"] = Field(
        default="identity_else_first_module",
        description=(
            "A cell whose policy selects no module is an identity skip when its input and "
            "output shapes match; otherwise its first module (index 0) runs."
        ),
    )

    combine: Literal["mean", "sum"] = Field(
        default="mean",
        description=(
            "How a cell merges the selected modules' outputs: their mean (scale independent of how "
            "many modules run) or the paper's sum. Residual cells add their input once, on top."
        ),
    )

    resolutions: list[int] = Field(default_factory=list, description=(
        "The input resolutions (height = width) an architecture of the space runs at, lowest first and "
        "input_size last: a lower one reads the input average-pooled by a whole factor. An architecture "
        "is its modules and its resolution; empty (a manifest written before resolutions were listed): any "
        "resolution that divides input_size."))

    @property
    def num_cells(self) -> int:
        return len(self.cells)

    @property
    def total_stride(self) -> int:
        return self.input_size // self.cells[-1].output_size

    @property
    def num_modules(self) -> int:
        return max(len(c.modules) for c in self.cells)

    @model_validator(mode="after")
    def _cells_chain(self) -> "SearchSpace":
        for i, cell in enumerate(self.cells):
            if cell.index != i:
                raise ValueError(f"cell {i} has index {cell.index}")
            if len(cell.modules) != self.num_modules:
                raise ValueError("every cell must hold the same number of modules")
            if i and (cell.in_channels, cell.input_size) != (
                self.cells[i - 1].out_channels,
                self.cells[i - 1].output_size,
            ):
                raise ValueError(f"cell {i} input does not match cell {i - 1} output")
        if self.resolutions:
            if self.resolutions != sorted(set(self.resolutions)) or self.resolutions[-1] != self.input_size:
                raise ValueError(f"resolutions {self.resolutions} must rise, without repeats, to the input size "
                                 f"{self.input_size}")
            for r in self.resolutions:
                if r < self.total_stride or self.input_size % r:
                    raise ValueError(f"resolution {r} must divide the input size {self.input_size} (a lower resolution "
                                     f"is the input average-pooled by a whole factor) and be at least the total stride "
                                     f"{self.total_stride}")
        return self


class GraphFile(_Strict):
    """An ONNX graph in the bundle, with its hash and its measured cost at batch 1."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    latency_ms: float = Field(gt=0, description="Median wall-clock at batch 1 on the profiling runtime.")
    mflops: float = Field(ge=0, description="Multiply-adds x 2, in millions, per image.")
    params: int = Field(ge=0)


class BlockFile(GraphFile):
    cell: int = Field(ge=0)
    module: int = Field(ge=0)


class Preprocessing(_Strict):
    input_size: int
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB"] = "RGB"
    resize: Literal["bilinear"] = "bilinear"
    scale: float = Field(default=1 / 255, description="Pixel values are multiplied by this first.")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Profile(_Strict):
    """Where and how the latency figures were measured."""

    runtime: str
    intra_op_threads: int
    repeats: int
    machine: str
    dispatch_ms: float = Field(default=0.0, ge=0, description=(
        "The executor's own cost per graph call at batch 1 (Python, copies, session dispatch), measured "
        "at profiling; estimated latencies charge it for every call."))


class Evaluation(_Strict):
    """What the training run measured on held-out data, with the policy that serves."""

    dataset: str
    split: str
    images: int
    top1: float
    mean_estimated_latency_ms: float
    mean_mflops: float
    mean_modules_executed: float
    mean_measured_latency_ms: float | None = Field(
        default=None, description="Mean wall-clock per image through the service's executor at batch 1.")
    architectures: int | None = Field(default=None, description="Distinct architectures chosen.")
    escalated: float | None = Field(default=None, ge=0, le=1,
                                    description="A cascade's share of images that ran more than its first stage.")


class Validation(_Strict):
    """What the training run measured on its validation split, which the server's own choices rank
    by (a latency budget's most accurate point); `evaluation`, on the test split, is for reporting."""

    images: int = Field(ge=1)
    top1: float = Field(ge=0, le=1)
    mean_estimated_latency_ms: float = Field(ge=0)
    escalated: float | None = Field(default=None, ge=0, le=1)


GREEDY_THRESHOLD = 0.5  # a module runs where the controller's probability is at least this


class Controller(GraphFile):
    """One operating point: a controller graph over the bundle's blocks, with what it measured."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$", description="Operating point name, e.g. A..E.")
    threshold: float = Field(default=GREEDY_THRESHOLD, gt=0, lt=1, description="Module selected where p >= threshold.")
    description: str = ""
    evaluation: Evaluation | None = None
    validation: Validation | None = None


class Network(_Strict):
    """Another network a cascade runs: a static bundle of its own in the folder `path` (its manifest
    pinned by sha256), over the same classes and cells, at `resolution`. A stage at a lower
    resolution than this bundle's input reads the input average-pooled by the whole factor."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,47}$")
    path: str = Field(description="The network's bundle folder, relative to this bundle's.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Of the network's manifest.json.")
    resolution: int = Field(ge=1, description="Height = width of the network's input.")



class Stage(_Strict):
    """One stage of a cascade: an architecture of a network. The image stops here when the
    stage's confidence in its answer is at least `threshold`; the last stage always answers."""

    network: str | None = Field(default=None, description="A name in `networks`; null: this bundle's own graphs.")
    architecture: str = Field(description="The architecture code that runs (service.architecture).")
    confidence: Literal["max_softmax", "margin", "gate"] = Field(
        default="max_softmax", description=(
            "The top class's probability, its lead over the runner-up, or one minus the learned gate's "
            "probability that escalating pays (`gate`)."))
    gate: list[float] | None = Field(default=None, description=(
        "With confidence `gate`: the gate's logistic-regression weights over the stage answer's features "
        "(service.cascade.gate_features: its probabilities sorted from the top, their entropy, the top-2 "
        "margin, a one-hot of the top class), then its bias: 2 x classes + 3 numbers."))
    threshold: float | None = Field(default=None, ge=0, le=1, description="Null on the last stage only.")
    blend: float = Field(default=0.0, ge=0, lt=1, description=(
        "The share of the previous stage's answer in this stage's: its probabilities are (1 - blend) x its "
        "own + blend x the previous stage's (which the image has already paid for); 0 on the first stage."))


class Cascade(_Strict):
    """An operating point whose images escalate through stages of rising cost until one is confident."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
    description: str = ""
    stages: list[Stage] = Field(min_length=1)
    evaluation: Evaluation | None = None
    validation: Validation | None = None

    @model_validator(mode="after")
    def _thresholds(self) -> "Cascade":
        if self.stages[-1].threshold is not None:
            raise ValueError(f"cascade {self.name!r}: its last stage answers every image it gets, so has no threshold")
        for i, stage in enumerate(self.stages[:-1]):
            if stage.threshold is None:
                raise ValueError(f"cascade {self.name!r}: stage {i} needs a threshold (only the last has none)")
        if self.stages[0].blend:
            raise ValueError(f"cascade {self.name!r}: the first stage has no previous answer to blend")
        for i, stage in enumerate(self.stages):
            if (stage.confidence == "gate") != (stage.gate is not None):
                raise ValueError(f"cascade {self.name!r}, stage {i}: a gate's weights go with confidence 'gate', "
                                 f"and only with it (confidence {stage.confidence!r}, "
                                 f"{'no gate' if stage.gate is None else 'a gate'})")
            if stage.gate is not None and not all(math.isfinite(w) for w in stage.gate):
                raise ValueError(f"cascade {self.name!r}, stage {i}: the gate's weights must be finite numbers")
        return self


class FrequentArchitecture(_Strict):
    """An architecture the controllers chose often on held-out data (fused-graph cache warm-up)."""

    code: str
    share: float = Field(ge=0, le=1, description="Share of held-out images that ran it.")


class Manifest(_Strict):
    schema_version: Literal[3] = SCHEMA_VERSION
    name: str
    version: str
    created: str
    dataset: str
    classes: list[str] = Field(min_length=2)
    preprocessing: Preprocessing
    search_space: SearchSpace
    stem: GraphFile
    head: GraphFile
    blocks: list[BlockFile]
    controllers: list[Controller] = Field(
        default_factory=list, description="Operating points over the same blocks; empty for a static bundle.")
    networks: list[Network] = Field(default_factory=list, description="Other networks the cascades run.")
    cascades: list[Cascade] = Field(default_factory=list, description="Operating points that escalate through stages.")
    default_controller: str | None = Field(default=None, description="The operating point served by default "
                                           "(a controller's or a cascade's name).")
    fixed_architecture: str | None = Field(
        default=None, description="Architecture code served for every image by a static bundle."
    )
    frequent_architectures: list[FrequentArchitecture] = Field(default_factory=list)
    profile: Profile
    evaluation: Evaluation | None = Field(default=None, description="A static bundle's; operating points carry their own.")
    training: dict = Field(default_factory=dict, description="The run's config and source revision.")

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        space = self.search_space
        if len(self.classes) != space.num_classes:
            raise ValueError(f"{len(self.classes)} classes but the head has {space.num_classes} outputs")
        if self.preprocessing.input_size != space.input_size:
            raise ValueError("preprocessing.input_size differs from search_space.input_size")
        names = self.point_names
        if bool(names) == (self.fixed_architecture is not None):
            raise ValueError("a bundle has either operating points (controllers, cascades) or a fixed_architecture, "
                             "not both")
        if len(set(names)) != len(names):
            raise ValueError(f"operating point names repeat: {names}")
        if names and self.default_controller not in names:
            raise ValueError(f"default_controller {self.default_controller!r} is not one of {names}")
        if not names and self.default_controller is not None:
            raise ValueError("a static bundle has no default_controller")
        networks = [n.name for n in self.networks]
        if len(set(networks)) != len(networks):
            raise ValueError(f"network names repeat: {networks}")
        size = self.preprocessing.input_size
        for n in self.networks:
            if space.resolutions and n.resolution not in space.resolutions:
                raise ValueError(f"network {n.name!r}: resolution {n.resolution} is not one of the search space's "
                                 f"resolutions {space.resolutions}")
            if n.resolution > size or size % n.resolution:  # a manifest that lists no resolutions (written before)
                raise ValueError(f"network {n.name!r}: resolution {n.resolution} does not divide the input size "
                                 f"{size} (a lower resolution is the input average-pooled by a whole factor)")
        for cascade in self.cascades:
            for i, stage in enumerate(cascade.stages):
                if stage.network is not None and stage.network not in networks:
                    raise ValueError(f"cascade {cascade.name!r}, stage {i}: network {stage.network!r} is not one of "
                                     f"{networks or 'the bundle (it has no networks)'}")
                if stage.gate is not None and len(stage.gate) != 2 * len(self.classes) + 3:
                    raise ValueError(f"cascade {cascade.name!r}, stage {i}: the gate has {len(stage.gate)} weights; "
                                     f"{len(self.classes)} classes need {2 * len(self.classes) + 3} "
                                     "(2 x classes features and their bias)")
        expected = {(c.index, m) for c in space.cells for m in range(len(c.modules))}
        listed = [(b.cell, b.module) for b in self.blocks]
        if sorted(listed) != sorted(expected):
            raise ValueError("blocks must list exactly one graph per (cell, module) of the search space")
        return self

    def block(self, cell: int, module: int) -> BlockFile:
        return self._block_index()[(cell, module)]

    def _block_index(self) -> dict[tuple[int, int], BlockFile]:
        return {(b.cell, b.module): b for b in self.blocks}

    @property
    def points(self) -> list[Controller | Cascade]:
        """Every operating point: the controllers, then the cascades."""
        return [*self.controllers, *self.cascades]

    @property
    def point_names(self) -> list[str]:
        return [p.name for p in self.points]

    def point_name(self, name: str | None = None) -> str | None:
        """The operating point that answers a request naming `name`: `name` itself, or the
        default when it names none (None for a static bundle)."""
        return name or self.default_controller

    def point(self, name: str | None = None) -> Controller | Cascade:
        """The operating point `name` (a controller or a cascade), or the default one."""
        name = self.point_name(name)
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)

    def cascade(self, name: str) -> Cascade | None:
        return next((c for c in self.cascades if c.name == name), None)

    def network(self, name: str) -> Network:
        return next(n for n in self.networks if n.name == name)

    def controller(self, name: str | None = None) -> Controller:
        """The operating point `name`, or the default one."""
        name = self.point_name(name)
        for c in self.controllers:
            if c.name == name:
                return c
        raise KeyError(name)

    def files(self) -> list[GraphFile]:
        """Every file the bundle holds besides the manifest itself."""
        return [self.stem, self.head, *self.blocks, *self.controllers]


def partial_folder(folder: Path) -> Path:
    """Where a bundle bound for `folder` is written until it is checked."""
    return folder.with_name(folder.name + PARTIAL_SUFFIX)


def is_partial(folder: Path) -> bool:
    return folder.name.endswith(PARTIAL_SUFFIX)


def static_twin_folder(folder: Path) -> Path:
    """The static MobileNetV2 bundle beside the bundle in `folder`."""
    return folder.with_name(static_twin_name(folder.name))


def static_twin_name(name: str) -> str:
    return name + STATIC_TWIN_SUFFIX


def upgrade(data: dict) -> dict:
    """A manifest's JSON in the current schema: version 1 becomes one operating point "default";
    versions 1 and 2 have no networks and no cascades."""
    version = data.get("schema_version")
    if version not in (1, 2):
        return data
    data = {**data, "schema_version": SCHEMA_VERSION}
    controller = data.pop("controller", None) if version == 1 else None
    if controller is not None:
        data["controllers"] = [{"name": "default", **controller, "evaluation": data.pop("evaluation", None)}]
        data["default_controller"] = "default"
    return data
