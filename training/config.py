"""Run configuration: one dataclass per phase, presets by name, JSON files and overrides."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from service.manifest import SearchSpace
from training import searchspace


@dataclass
class SpaceConfig:
    layout: Literal["mobilenet_v2", "tiny"] = "mobilenet_v2"
    width_multiplier: float = 1.0
    input_size: int = 32
    modules: tuple[str, ...] = searchspace.INSTANAS_MODULES
    combine: Literal["mean", "sum"] = "mean"  # how a cell merges its selected modules (the paper: "sum")

    def build(self, num_classes: int) -> SearchSpace:
        if self.layout == "tiny":
            space = searchspace.build_tiny_space(num_classes, self.input_size)
        elif self.layout == "mobilenet_v2":
            space = searchspace.build_search_space(
                width_multiplier=self.width_multiplier,
                input_size=self.input_size,
                modules=tuple(self.modules),
                stem_stride=1 if self.input_size <= 64 else 2,
                num_classes=num_classes,
            )
        else:
            raise ValueError(f"unknown space layout {self.layout!r}")
        if self.combine not in ("mean", "sum"):
            raise ValueError(f"space.combine must be 'mean' or 'sum', not {self.combine!r}")
        return space.model_copy(update={"combine": self.combine})


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class DataConfig:
    # Held out from the training images (same for every phase): every choice (epochs, controller,
    # static twins) is made on it, and the test split is read only for the final report.
    val_images: int = 5000
    train_limit: int | None = None  # use a random subset of this many training images (after the hold-out)
    test_limit: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 500
    # Each channel's mean and standard deviation on the 0-1 pixel scale, which the inputs are normalised
    # by and the bundle's manifest records; null: measured on the training images (your own data).
    mean: tuple[float, float, float] | None = CIFAR10_MEAN
    std: tuple[float, float, float] | None = CIFAR10_STD


@dataclass
class BaselineConfig:
    """A standalone MobileNetV2: module 0 of every cell, the meta-graph's stem, head, data and augmentation."""

    epochs: int = 40
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on convolution and linear weights only
    warmup_epochs: float = 1.0


@dataclass
class TwinsConfig:
    """The baseline fine-tuned at each lower input resolution (phase `twins`), the finished baseline teaching."""

    resolutions: tuple[int, ...] = ()  # each divides space.input_size; none: the phase does nothing
    epochs: int = 40
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.2
    distill: float = 0.5  # weight of the baseline's predictions (vs labels)
    # After `epochs`: this many more without cutout, on a fresh cosine schedule from `polish_lr`. A
    # 16x16 image keeps a quarter of a 32x32 one's pixels, and a 16x16 hole hides a quarter of it.
    polish_epochs: int = 0
    polish_lr: float = 0.005


@dataclass
class MultiresConfig:
    """The fine-tuned meta-graph trained at its input size and each lower resolution at once (phase
    `multires`): shared convolutions, batch norms per resolution, the finished baseline teaching."""

    resolutions: tuple[int, ...] = ()  # the lower ones, each dividing space.input_size; none: nothing
    epochs: int = 0  # 0: the phase does nothing
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.2
    distill: float = 0.5  # weight of the baseline's predictions (vs labels)
    bn_images: int = 2000  # training images a served architecture's batch norms are re-estimated on


@dataclass
class SharedTwinsConfig:
    """The baseline trained at its twins' resolutions and its input size at once (phase `shared_twins`):
    one set of convolutions, batch norms per resolution, the finished baseline teaching."""

    epochs: int = 0  # 0: the phase does nothing (needs twins.resolutions)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.2
    distill: float = 0.5  # weight of the baseline's predictions (vs labels)


@dataclass
class CoadaptConfig:
    """The cascade's last stage fine-tuned on the images its first stage escalates (phase `coadapt`),
    beside the same fine-tuning on images drawn at random, its control; the finished baseline teaching."""

    epochs: int = 0  # 0: the phase does nothing (needs twins)
    share: float = 0.4  # of each training batch: the images the lowest-resolution twin is least sure about
    confidence: Literal["max_softmax", "margin"] = "margin"  # how the twin's sureness is read
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.2
    distill: float = 0.5  # weight of the baseline's predictions (vs labels)


@dataclass
class PretrainConfig:
    epochs: int = 200
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0  # linear lr warm-up; sums of modules make the first steps unstable
    grad_clip: float | None = 10.0  # max global gradient norm
    # "drop_path": the paper's schedule (all modules on for the first half, then each kept
    # with a probability falling linearly to 0.5). "sparse": every cell keeps a uniformly
    # drawn number of modules (none included), and some rows always take the cheapest and the
    # MobileNetV2 paths, so that the sparse paths a latency reward favours are trained too.
    # "sandwich": the all-modules and MobileNetV2 paths and sampled ones in every step.
    sampling: Literal["drop_path", "sparse", "sandwich"] = "drop_path"
    dense_epochs: int = 0  # with "sparse": first epochs with every module on, before sampling starts
    fixed_path_rows: float = 0.125  # with "sparse": share of rows on each of the two fixed paths
    # with "sandwich": start from the finished baseline (module 0 = MobileNetV2, other modules silent)
    warm_start: bool = False
    distill: float = 0.5  # with "sandwich": weight of distillation (vs labels) in the sampled paths' loss
    # with "sandwich": the sampled paths learn from "all" (the all-modules path, in-place distillation)
    # or "baseline" (the finished MobileNetV2, frozen: a teacher that is already good from the first step)
    teacher: Literal["all", "baseline"] = "all"


@dataclass
class SearchConfig:
    mode: Literal["paper", "variants"] = "paper"  # "paper": one search, falling bound; "variants": one per point
    batch_size: int = 32
    lr: float = 5e-4
    alpha: float = 0.8  # exploration: p' = alpha p + (1 - alpha)(1 - p); with "variants", its start
    beta: float = 0.8  # entropy bonus; with "variants", its start
    entropy: Literal["bernoulli", "one_sided"] = "bernoulli"  # "one_sided": -p log p, the authors' code
    pos_weight: float = 30.0
    neg_weight: float = 0.0
    names: tuple[str, ...] = ("A", "B", "C", "D", "E")  # operating points, slowest first
    # "paper"
    epochs: int = 500
    steps_per_epoch: int | None = None  # None: one pass over the training data
    upper_start: float = 0.7  # x sum of all module latencies
    upper_end: float = 0.5  # x latency of MobileNetV2 (module 0 everywhere)
    metagraph_steps: int | None = None  # meta-graph steps after each controller epoch (None: one pass)
    metagraph_lr: float = 0.01
    # "variants": each point's target latency x the static MobileNetV2 path's (controller counted)
    targets: tuple[float, ...] = (1.3, 1.0, 0.75, 0.55, 0.4)
    window: float = 0.4  # reward window [target (1 - window), target (1 + window)]
    steps_per_variant: int = 400
    alpha_end: float = 1.0
    beta_end: float = 0.0
    init_strength: float = 3.0  # the first point starts at the MobileNetV2 path, p = sigmoid(+-3)
    log_steps: int = 50
    # how sampled paths are scored on the frozen meta-graph: "running" BatchNorm statistics (the
    # mixture pre-training left) or each batch's own ("batch": ranks paths as re-estimated
    # statistics do, measured by scripts/search_signal.py)
    batchnorm: Literal["running", "batch"] = "running"


@dataclass
class FinetuneConfig:
    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 4e-5
    bn_images: int = 5000  # training images the batch-norm statistics are re-estimated on, at the end
    # "none": labels only; "baseline": the finished MobileNetV2 (frozen) teaches every point's
    # path too, with weight `distill` (vs labels), as the sandwich's sampled paths in pre-training
    teacher: Literal["none", "baseline"] = "none"
    distill: float = 0.5


@dataclass
class RouteConfig:
    enabled: bool = False  # after fine-tuning: routers over the search's architectures (training/route.py)
    epochs: int = 2
    lr: float = 1e-3
    names: tuple[str, ...] = ("A", "B", "C", "D", "E")
    targets: tuple[float, ...] = (1.05, 0.95, 0.85, 0.75, 0.65)  # x the MobileNetV2 path's latency


@dataclass
class ControllerConfig:
    channels: tuple[int, int, int] = (16, 32, 64)
    downsample: int = 1


@dataclass
class ProfileConfig:
    repeats: int = 50
    warmup: int = 10
    intra_op_threads: int = 1


@dataclass
class ExportConfig:
    latency_images: int = 500  # test images timed through the service's executor, per operating point
    # With twins: one cascade point (lowest-resolution twin, then the baseline) per tolerance, the
    # validation top-1 points it may lose against the baseline; its threshold is the cheapest within.
    cascade_tolerances: tuple[float, ...] = (0.0, 0.3, 1.0, 2.0)
    # The shares of the first stage's answer a cascade's last stage may blend into its own; the fit takes the cheapest.
    cascade_blends: tuple[float, ...] = (0.0,)
    # The default point: the fastest within this many points of the baseline's top-1 on validation. A
    # paired interval of a point against the baseline spans about +-0.4 points on 5,000 validation
    # images, so a point fitted right at a 0.3-point tolerance loses more than that on unseen images
    # about as often as not; at 0, the default is no less accurate than the baseline where it was fitted.
    default_tolerance: float = 0.0
    # The learned escalation gate (training/gate.py), cross-fitted on validation in this many folds and
    # compared with the plain confidences at every cascade tolerance; 0: not fitted.
    gate_folds: int = 5
    # One more cascade, `cascade-top` (training/cascade_points.py): the most accurate on validation at no
    # more MFLOPs than the baseline, whose third stage is one of this many of the meta-graph's most
    # frequent architectures, blending in these shares of the answer so far; 0: no such point.
    top_candidates: int = 4
    top_blends: tuple[float, ...] = (0.3, 0.5)
    # With phase `multires`: the first stages tried besides the lowest-resolution twin, at each lower
    # resolution: the meta-graph's MobileNetV2 and cheapest paths and this many of its most frequent
    # architectures (training/cascade_points.py, `first_codes`).
    first_candidates: int = 2
    # A controller point that runs several architectures is served only where its routes beat the same
    # routes shuffled across images on validation (training/controls.py); false: every point is served
    # (the smoke preset, whose barely trained controllers give the serving tests per-image routes).
    instance_aware_only: bool = True


@dataclass
class ReportConfig:
    latency_images: int = 2000  # test images timed at batch 1, per model and control
    resamples: int = 2000  # paired bootstrap resamples
    twin_candidates: int = 5  # most frequent architectures tried as a point's static twin


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    checkpoint_steps: int = 200  # a resumable checkpoint every this many optimizer steps, and at each epoch's end
    space: SpaceConfig = field(default_factory=SpaceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    twins: TwinsConfig = field(default_factory=TwinsConfig)
    multires: MultiresConfig = field(default_factory=MultiresConfig)
    shared_twins: SharedTwinsConfig = field(default_factory=SharedTwinsConfig)
    coadapt: CoadaptConfig = field(default_factory=CoadaptConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    route: RouteConfig = field(default_factory=RouteConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def resolutions(self) -> list[int]:
        """The input resolutions the run trains networks at (the search space's `resolutions`): its
        twins' and its multi-resolution meta-graph's, then the input size; empty with neither."""
        lower = {*self.twins.resolutions, *self.multires.resolutions}
        return [*sorted(lower), self.space.input_size] if lower else []


def _preset_smoke() -> RunConfig:
    return RunConfig(
        name="smoke",
        space=SpaceConfig(layout="tiny", combine="sum"),
        checkpoint_steps=2,
        data=DataConfig(val_images=100, train_limit=256, test_limit=200, batch_size=64, eval_batch_size=200),
        baseline=BaselineConfig(epochs=2, lr=0.05, warmup_epochs=0.5),
        twins=TwinsConfig(resolutions=(16,), epochs=1, polish_epochs=1),
        multires=MultiresConfig(resolutions=(16,), epochs=1, bn_images=128),
        shared_twins=SharedTwinsConfig(epochs=1),
        coadapt=CoadaptConfig(epochs=1),
        controller=ControllerConfig(channels=(8, 8, 16), downsample=2),
        pretrain=PretrainConfig(epochs=2, lr=0.05, sampling="sandwich", warm_start=True),
        search=SearchConfig(mode="variants", names=("A", "B", "C"), targets=(1.0, 0.7, 0.5), steps_per_variant=3,
                            batch_size=32, alpha=0.9, beta=0.1, entropy="one_sided", log_steps=2),
        finetune=FinetuneConfig(epochs=1, bn_images=128),
        profile=ProfileConfig(repeats=5, warmup=2),
        export=ExportConfig(latency_images=20, cascade_blends=(0.0, 0.3), instance_aware_only=False),
        report=ReportConfig(latency_images=30, resamples=200, twin_candidates=2),
    )


def _preset_cifar10_cpu() -> RunConfig:
    """Sized for 2 CPU cores, several hours, resumable (docs/TRAINING.md, "Presets"): the default bundle."""
    return RunConfig(
        name="cifar10-cpu",
        space=SpaceConfig(width_multiplier=0.25, combine="sum"),
        data=DataConfig(batch_size=128),
        # 84 s an epoch on 2 cores (measured: 20,000 images in 38 s); a short schedule regularises less.
        baseline=BaselineConfig(epochs=60, lr=0.1, weight_decay=2e-4, warmup_epochs=1.0),
        # small next to a cheap path: the controller is charged in every latency
        controller=ControllerConfig(channels=(8, 16, 32), downsample=2),
        # Starts from the converged baseline: a short, gentle schedule. The baseline teaches the
        # sampled paths: as good as it will be from the first step, where the all-modules path
        # is weaker (81.5% against 85.2% on validation after 6 epochs: docs/history/2026-11-29-cifar10-default.md).
        pretrain=PretrainConfig(epochs=11, lr=0.02, weight_decay=1e-4, warmup_epochs=0.2, sampling="sandwich",
                                warm_start=True, distill=0.5, teacher="baseline"),
        # 3,000 steps a point, not 400: the cheap points end on better architectures (+1.5 points at equal
        # latency). Paths scored with batch statistics: the running ones under-score cheap paths, and the
        # cheap points found this way are 0.2-0.8 validation points better at equal latency.
        search=SearchConfig(mode="variants", batch_size=64, lr=1e-3, alpha=0.95, beta=0.01, entropy="one_sided",
                            steps_per_variant=3000, batchnorm="batch"),
        finetune=FinetuneConfig(epochs=24, lr=0.01, weight_decay=1e-4, teacher="baseline"),
        # The baseline at 16x16, the cascades' first stage: 80 epochs (78.1% on validation after 40, 79.2%
        # after 80), then 15 without cutout (docs/RESULTS.md, "Cascades").
        twins=TwinsConfig(resolutions=(16,), epochs=80, lr=0.02, distill=0.5, polish_epochs=15, polish_lr=0.005),
        # The baseline fine-tuned on the 40% of each batch the 16x16 twin is least sure about, beside the
        # same fine-tuning on 40% drawn at random (docs/RESULTS.md, "Cascades").
        coadapt=CoadaptConfig(epochs=12, share=0.4, lr=0.01, distill=0.5),
        # The fine-tuned meta-graph at 16x16 and 32x32 at once, batch norms per resolution: its cheap
        # architectures at 16x16 are first-stage candidates beside the twin (docs/RESULTS.md, "Cascades").
        multires=MultiresConfig(resolutions=(16,), epochs=6, lr=0.01, distill=0.5),
        # The baseline at 16x16 and 32x32 at once, one set of convolutions, batch norms per resolution:
        # against the separate twin and baseline, on validation (docs/RESULTS.md, "Cascades").
        shared_twins=SharedTwinsConfig(epochs=12, lr=0.01, distill=0.5),
        profile=ProfileConfig(repeats=30, warmup=5),
        # The blends of the twin's answer into the baseline's that the export tries for each cascade point:
        # on validation, the cheapest cascade no less accurate than the baseline blends 0.2 and escalates
        # 37% of the images; with no blend, only escalating every image holds the baseline's top-1.
        export=ExportConfig(cascade_blends=(0.0, 0.1, 0.2, 0.3, 0.4)),
    )


def _preset_cifar10_paper() -> RunConfig:
    """The published CIFAR-10 schedule (needs a GPU)."""
    return RunConfig(name="cifar10-paper", space=SpaceConfig(combine="sum"), pretrain=PretrainConfig(sampling="drop_path"))


PRESETS = {"smoke": _preset_smoke, "cifar10-cpu": _preset_cifar10_cpu, "cifar10-paper": _preset_cifar10_paper}


def _type_problem(value, hint) -> str | None:
    """Why `value` does not fit the annotation `hint` (None when it does)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return None if value in args else f"{value!r} is not one of {', '.join(map(repr, args))}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if None in problems else problems[0]
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return f"{value!r} is not a list"
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            return f"{list(value)!r} needs {len(args)} items"
        for item, item_hint in zip(value, args):
            problem = _type_problem(item, item_hint)
            if problem:
                return f"item {problem}"
        return None
    if hint is bool:
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"{value!r} is not an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{value!r} is not a number"
    if hint is str:
        return None if isinstance(value, str) else f"{value!r} is not a string"
    return None


def _field_problems(obj, where: str = "") -> list[str]:
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += _field_problems(value, f"{where}{f.name}.")
            continue
        problem = _type_problem(value, hints[f.name])
        if problem:
            problems.append(f"{where}{f.name}: {problem}")
    return problems


_NON_NEGATIVE = ("epochs", "warmup_epochs", "dense_epochs", "polish_epochs", "momentum", "weight_decay", "distill", "alpha", "beta",
                 "alpha_end", "beta_end", "pos_weight", "neg_weight", "window", "init_strength", "fixed_path_rows",
                 "warmup", "val_images", "default_tolerance", "gate_folds", "top_candidates",
                 "first_candidates")
_POSITIVE = ("lr", "polish_lr", "metagraph_lr", "batch_size", "eval_batch_size", "repeats", "intra_op_threads", "latency_images",
             "resamples", "twin_candidates", "bn_images", "log_steps", "steps_per_variant", "checkpoint_steps",
             "threads", "train_limit", "test_limit", "steps_per_epoch", "metagraph_steps", "grad_clip", "downsample",
             "width_multiplier", "input_size")


def _range_problems(obj, where: str = "") -> list[str]:
    problems = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += _range_problems(value, f"{key}.")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        elif f.name in _POSITIVE and value <= 0:
            problems.append(f"{key}: {value!r} must be above 0")
        elif f.name in _NON_NEGATIVE and value < 0:
            problems.append(f"{key}: {value!r} must be 0 or more")
    return problems


def validate(config: RunConfig) -> RunConfig:
    """Refuse, naming each key and what it allows, every value the run could not use: the wrong
    type, a choice not offered, a count or rate out of range, settings that contradict each other.
    Called on every config loaded, before any data is read."""
    problems = _field_problems(config)
    if not problems:
        problems = _range_problems(config)
    if not problems:
        size = config.space.input_size
        for section in ("twins", "multires"):
            for r in getattr(config, section).resolutions:
                if r <= 0 or r >= size or size % r:
                    problems.append(f"{section}.resolutions: {r} must divide space.input_size ({size}) and be below it")
        if not 0 < config.coadapt.share < 1:
            problems.append(f"coadapt.share: {config.coadapt.share!r} must lie between 0 and 1 (not either)")
        if config.export.gate_folds == 1:
            problems.append("export.gate_folds: 1 cannot cross-fit (each fold's gate is fitted on the others); "
                            "use 2 or more, or 0 for no gate")
        if len(set(config.multires.resolutions)) != len(config.multires.resolutions):
            problems.append(f"multires.resolutions: {list(config.multires.resolutions)} names a resolution twice")
        if config.multires.epochs and config.multires.resolutions and not config.twins.resolutions:
            problems.append("multires.epochs: the export tries the multi-resolution meta-graph's architectures as "
                            "cascade first stages, and cascades need twins; set twins.resolutions, or multires.epochs "
                            "to 0")
        if config.shared_twins.epochs and not config.twins.resolutions:
            problems.append("shared_twins.epochs: the phase trains the baseline at the twins' resolutions; set "
                            "twins.resolutions, or shared_twins.epochs to 0")
        if config.coadapt.epochs and not config.twins.resolutions:
            problems.append("coadapt.epochs: co-adaptation fine-tunes a cascade's last stage on what its first "
                            "stage escalates; set twins.resolutions for a first stage, or coadapt.epochs to 0")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", config.device):
            problems.append(f"device: {config.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:<n>', 'mps'")
        for module in config.space.modules:
            try:
                searchspace.parse_module(module)
            except ValueError as exc:
                problems.append(f"space.modules: {exc}")
        if config.search.mode == "variants" and len(config.search.names) != len(config.search.targets):
            problems.append("search.names and search.targets: one target per name with search.mode 'variants'")
        if config.route.enabled and len(config.route.names) != len(config.route.targets):
            problems.append("route.names and route.targets: one target per name")
        if config.pretrain.teacher == "baseline" and config.pretrain.sampling != "sandwich":
            problems.append("pretrain.teacher: 'baseline' teaches the sandwich's sampled paths; "
                            "set pretrain.sampling to 'sandwich'")
        if config.data.mean is not None and not all(0 <= v <= 1 for v in config.data.mean):
            problems.append(f"data.mean: {list(config.data.mean)} must lie between 0 and 1 (the 0-1 pixel scale), "
                            "or null to measure it")
        if config.data.std is not None and not all(v > 0 for v in config.data.std):
            problems.append(f"data.std: {list(config.data.std)} must be above 0, or null to measure it")
        for key in ("cascade_blends", "top_blends"):
            for share in getattr(config.export, key):
                if not 0 <= share < 1:
                    problems.append(f"export.{key}: {share!r} must be at least 0 and below 1")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    return config


def _merge(obj, updates: dict, where: str = ""):
    for key, value in updates.items():
        if not hasattr(obj, key):
            raise ValueError(f"unknown config key {where}{key}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key} takes a mapping")
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, tuple(value) if isinstance(value, list) else value)  # sequences are tuples


def load_config(preset_or_file: str, overrides: list[str] = ()) -> RunConfig:
    """A preset name or a JSON file (a preset's keys, optionally with `"preset": name` as base),
    then `section.key=value` overrides."""
    if preset_or_file in PRESETS:
        config = PRESETS[preset_or_file]()
    else:
        path = Path(preset_or_file)
        if not path.exists():
            raise ValueError(f"{preset_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        data = json.loads(path.read_text())
        config = PRESETS[data.pop("preset", "cifar10-paper")]()
        _merge(config, data)
    return apply_overrides(config, overrides)


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` items in place (values parsed as JSON where they parse)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *path, last = key.split(".")
        nested: dict = {last: value}
        for part in reversed(path):
            nested = {part: nested}
        _merge(config, nested)
    return validate(config)


def from_dict(data: dict) -> RunConfig:
    config = RunConfig()
    _merge(config, data)
    return validate(config)
