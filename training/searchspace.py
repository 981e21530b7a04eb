"""The InstaNAS search space as data, built from a stage table and module strings.

Module strings follow timm's block notation: `ir_k3_e6` is an inverted residual
with a 3x3 depthwise kernel and expansion 6; `basic_k3` is two 3x3 convolutions.
Everything else (the PyTorch meta-graph, file names, manifest, codes, reports) is
derived from the `SearchSpace` built here.
"""

from __future__ import annotations

import re

from service.manifest import CellSpec, ModuleSpec, SearchSpace

# MobileNetV2 stages for CIFAR: (expansion t, channels c, repeats n, first stride s).
# The expansion column is MobileNetV2's; in InstaNAS each cell's modules set their own.
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# The paper's five candidate modules, in its order (module 0 = MobileNetV2's block).
INSTANAS_MODULES: tuple[str, ...] = ("ir_k3_e6", "ir_k3_e3", "ir_k5_e6", "ir_k5_e3", "basic_k3")

_MODULE_RE = re.compile(r"^(ir|basic)_k(\d+)(?:_e(\d+))?$")


def parse_module(name: str) -> ModuleSpec:
    """`ir_k5_e3` -> ModuleSpec(kind='inverted_residual', kernel=5, expansion=3)."""
    match = _MODULE_RE.match(name)
    if not match:
        raise ValueError(f"unknown module string {name!r}; expected ir_k<k>_e<e> or basic_k<k>")
    kind, kernel, expansion = match.groups()
    if kind == "ir" and expansion is None:
        raise ValueError(f"module {name!r} needs an expansion (_e<e>)")
    if int(kernel) % 2 == 0:
        raise ValueError(f"module {name!r}: kernel must be odd")
    return ModuleSpec(
        name=name,
        kind="inverted_residual" if kind == "ir" else "basic",
        kernel=int(kernel),
        expansion=int(expansion or 1),
    )


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: nearest multiple of divisor, never 10% below value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def build_search_space(
    *,
    width_multiplier: float = 1.0,
    input_size: int = 32,
    stages: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_STAGES,
    modules: tuple[str, ...] = INSTANAS_MODULES,
    stem_channels: int = 32,
    stem_stride: int = 1,
    head_channels: int = 1280,
    num_classes: int = 10,
) -> SearchSpace:
    """Build a search space; the defaults are the paper's CIFAR 17 x 5 space."""
    module_specs = [parse_module(m) for m in modules]
    stem_out = make_divisible(stem_channels * width_multiplier)
    size = (input_size - 1) // stem_stride + 1
    channels = stem_out
    cells = []
    for _, c, n, s in stages:
        out_channels = make_divisible(c * width_multiplier)
        for r in range(n):
            stride = s if r == 0 else 1
            cells.append(
                CellSpec(
                    index=len(cells),
                    in_channels=channels,
                    out_channels=out_channels,
                    stride=stride,
                    input_size=size,
                    modules=module_specs,
                )
            )
            size = (size - 1) // stride + 1
            channels = out_channels
    head = make_divisible(head_channels * max(1.0, width_multiplier))
    return SearchSpace(
        input_size=input_size,
        width_multiplier=width_multiplier,
        stem_channels=stem_out,
        stem_stride=stem_stride,
        head_channels=head,
        num_classes=num_classes,
        cells=cells,
    )


# A space small enough for unit tests and the smoke preset, from the same code:
# 4 cells (a skippable one included), 3 module kinds (ir, ir with 5x5, basic).
TINY_STAGES: tuple[tuple[int, int, int, int], ...] = ((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 1, 2))
TINY_MODULES: tuple[str, ...] = ("ir_k3_e3", "ir_k5_e2", "basic_k3")


def build_tiny_space(num_classes: int = 10, input_size: int = 32) -> SearchSpace:
    return build_search_space(
        width_multiplier=1.0,
        input_size=input_size,
        stages=TINY_STAGES,
        modules=TINY_MODULES,
        stem_channels=8,
        head_channels=32,
        num_classes=num_classes,
    )
