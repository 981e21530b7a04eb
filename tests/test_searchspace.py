"""The search space is data: the paper's 17 x 5 space and a tiny one from the same builder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service import architecture
from service.manifest import SearchSpace
from training import flops
from training.metagraph import MetaGraph
from training.searchspace import INSTANAS_MODULES, build_search_space, build_tiny_space, parse_module


def test_paper_space_is_mobilenet_v2_layout_with_five_modules():
    space = build_search_space()
    assert (space.num_cells, space.num_modules) == (17, 5)
    assert [m.name for m in space.cells[0].modules] == list(INSTANAS_MODULES)
    assert [c.out_channels for c in space.cells] == [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
    assert [c.stride for c in space.cells] == [1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert space.cells[-1].output_size == 4 and space.stem_channels == 32 and space.head_channels == 1280
    # the cells an empty policy may skip are exactly those with MobileNetV2's residual
    assert [c.skippable for c in space.cells] == [False, False, True, False, True, True, False, True, True, True,
                                                  False, True, True, False, True, True, False]


def test_static_mobilenet_v2_path_costs_what_mobilenet_v2_costs():
    """Module 0 everywhere is MobileNetV2 1.0x: about 0.09 G multiply-adds at 32x32 with stride-1 stem."""
    space = build_search_space()
    net = MetaGraph(space)
    total = flops.count(net.stem, (3, 32, 32))[0] + flops.count(net.head, (320, 4, 4))[0]
    for cell in space.cells:
        total += flops.count(net.cells[cell.index][0], (cell.in_channels, cell.input_size, cell.input_size))[0]
    params = sum(p.numel() for p in net.stem.parameters()) + sum(p.numel() for p in net.head.parameters()) + sum(
        sum(p.numel() for p in net.cells[c][0].parameters()) for c in range(17))
    assert 2.2e6 < params < 2.3e6  # MobileNetV2 1.0x with a 10-class head: 2.24 M
    assert 170 < total < 200  # MFLOPs (multiply-adds x 2); DESIGN.md: 0.178 GFLOPs


def test_width_and_input_size_are_parameters():
    space = build_search_space(width_multiplier=0.5, input_size=64, num_classes=100)
    assert space.cells[-1].out_channels == 160 and space.num_classes == 100 and space.cells[0].input_size == 64
    tiny = build_tiny_space()
    assert tiny.num_cells == 4 and tiny.num_modules == 3
    assert any(c.skippable for c in tiny.cells) and not all(c.skippable for c in tiny.cells)


@pytest.mark.parametrize("name, kind, kernel, expansion", [("ir_k3_e6", "inverted_residual", 3, 6),
                                                           ("ir_k5_e3", "inverted_residual", 5, 3),
                                                           ("basic_k3", "basic", 3, 1)])
def test_module_strings(name, kind, kernel, expansion):
    spec = parse_module(name)
    assert (spec.kind, spec.kernel, spec.expansion) == (kind, kernel, expansion)


@pytest.mark.parametrize("bad", ["ir_k3", "conv_k3", "ir_k4_e6", "ir_k3_e"])
def test_bad_module_strings_are_refused(bad):
    with pytest.raises(ValueError):
        parse_module(bad)


def test_space_round_trips_through_json():
    space = build_search_space(width_multiplier=0.25)
    assert SearchSpace.model_validate_json(space.model_dump_json()) == space


def test_every_module_maps_its_cell_shapes():
    space = build_tiny_space()
    net = MetaGraph(space).eval()
    for cell in space.cells:
        x = torch.zeros(2, cell.in_channels, cell.input_size, cell.input_size)
        for module in net.cells[cell.index]:
            assert module(x).shape == (2, cell.out_channels, cell.output_size, cell.output_size)


def test_architecture_codes_round_trip_and_name_mobilenet_v2():
    space = build_search_space()
    rng = np.random.default_rng(0)
    for _ in range(200):
        matrix = rng.random((17, 5)) < rng.random()
        code = architecture.encode(matrix)
        assert len(code) == 17
        assert np.array_equal(architecture.decode(code, 17, 5), matrix)
    assert architecture.encode(architecture.mobilenet_v2(space)) == "1" * 17
    with pytest.raises(ValueError):
        architecture.decode("1" * 16, 17, 5)
    with pytest.raises(ValueError):
        architecture.decode("w" * 17, 17, 5)  # bit beyond module 4


def test_empty_cell_rule():
    space = build_search_space()
    executed = architecture.apply_empty_cell_rule(np.zeros((1, 17, 5), bool), space)[0]
    for cell, row in zip(space.cells, executed):
        assert row.tolist() == ([False] * 5 if cell.skippable else [True, False, False, False, False])
    full = np.ones((1, 17, 5), bool)
    assert np.array_equal(architecture.apply_empty_cell_rule(full, space), full)


def test_an_unknown_module_kind_is_refused_not_built_as_something_else():
    from service.manifest import ModuleSpec
    from training.metagraph import MODULE_KINDS, build_module

    space = build_tiny_space()
    cell = space.cells[0]
    for spec in cell.modules:
        assert spec.kind in MODULE_KINDS
        build_module(cell, spec)
    odd = ModuleSpec.model_construct(name="se_k3", kind="squeeze_excite", kernel=3, expansion=1)
    with pytest.raises(ValueError, match="unknown module kind 'squeeze_excite'"):
        build_module(cell, odd)
