"""Builders shared by tests: models with non-trivial weights, exported to a real bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.manifest import Preprocessing
from training.controller import Controller
from training.bundle_writer import write_bundle
from training.metagraph import MetaGraph


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm random statistics and affine terms, so eval mode is not an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module.eval()


def unit_table(space) -> dict:
    """A stand-in cost table (every graph 0.01 ms, 1 MFLOP) for bundles that are not profiled."""
    cost = {"latency_ms": 0.01, "mflops": 1.0, "params": 0}
    return {"stem": cost, "head": cost, "controller": cost,
            "blocks": [[cost] * len(c.modules) for c in space.cells],
            "profile": {"runtime": "none (test bundle)", "intra_op_threads": 1, "repeats": 0, "machine": "test"}}


def random_controller(space, seed: int, bias: float = 0.0) -> Controller:
    with torch.random.fork_rng(devices=[]):  # its convolutions too: the same controller whatever ran before
        torch.manual_seed(seed)
        controller = randomise(Controller(space, (8, 8, 16)), seed + 1)
    # a trained controller's choices depend on the image: so must this one's
    torch.nn.init.normal_(controller.fc.weight, 0.0, 2.0, generator=torch.Generator().manual_seed(seed))
    torch.nn.init.constant_(controller.fc.bias, bias)
    return controller


def three_points(space) -> dict:
    """Operating points A (many modules), B, C (few) over `space`: controllers whose choices differ."""
    return {"A": random_controller(space, 1, bias=2.0), "B": random_controller(space, 2),
            "C": random_controller(space, 3, bias=-2.0)}


def export_test_bundle(out: Path, space, *, with_controller: bool = True, seed: int = 0,
                       controllers: dict | None = None, evaluations: dict | None = None,
                       default_controller: str | None = None, name: str = "test"):
    """(metagraph, controller, manifest) for a randomly initialised model written to `out`;
    `controllers` (name -> controller) makes a bundle of several operating points."""
    torch.manual_seed(seed)
    metagraph = randomise(MetaGraph(space), seed)
    controller = None
    if controllers is None and with_controller:
        controller = random_controller(space, seed)
        controllers = {"default": controller}
    manifest = write_bundle(
        out, metagraph, controllers or {}, unit_table(space), evaluations=evaluations,
        default_controller=default_controller, name=name, version="0", dataset="none",
        classes=[f"class{i}" for i in range(space.num_classes)],
        preprocessing=Preprocessing(input_size=space.input_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        fixed_architecture=None if with_controller else "1" * space.num_cells,
    )
    return metagraph, controller, manifest


def export_cascade_bundle(out: Path, *, seed: int = 0, name: str = "cascade") -> dict:
    """A tiny-space bundle with one controller ("A") and a cascade ("fast", the default): its
    16x16 network answers where its max softmax is at least the median on random inputs, the
    32x32 network the rest. Returns the PyTorch models by network name, and the threshold."""
    from service.bundle import sha256_file
    from service.cascade import confidence
    from service.manifest import Cascade, Network, Stage
    from training.evaluate import fixed_policy
    from training.searchspace import build_tiny_space

    space = build_tiny_space(10, 32).model_copy(update={"resolutions": [16, 32]})
    models = {}
    networks = []
    pre = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for resolution, network in ((16, "mobilenet_v2@16"), (32, "mobilenet_v2")):
        own = build_tiny_space(10, resolution)
        own = own.model_copy(update={"cells": [c.model_copy(update={"modules": c.modules[:1]}) for c in own.cells]})
        torch.manual_seed(seed + resolution)
        model = randomise(MetaGraph(own), seed + resolution)
        folder = out / "networks" / network
        write_bundle(folder, model, {}, unit_table(own), name=f"{name}-{network}", version="0", dataset="none",
                     classes=[f"class{i}" for i in range(10)], fixed_architecture="1" * own.num_cells,
                     preprocessing=Preprocessing(input_size=resolution, **pre))
        networks.append(Network(name=network, path=f"networks/{network}", sha256=sha256_file(folder / "manifest.json"),
                                resolution=resolution))
        models[network] = model
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((64, 3, 32, 32)).astype(np.float32))
    low = models["mobilenet_v2@16"]
    with torch.no_grad():
        logits = low.forward_selected(torch.nn.functional.avg_pool2d(x, 2), fixed_policy(np.ones((space.num_cells, 1), bool))(x))
    threshold = float(np.median(confidence("max_softmax", logits.numpy())))
    cascade = Cascade(name="fast", stages=[
        Stage(network="mobilenet_v2@16", architecture="1" * space.num_cells, threshold=threshold),
        Stage(network="mobilenet_v2", architecture="1" * space.num_cells)])
    torch.manual_seed(seed)
    metagraph = randomise(MetaGraph(space), seed)
    write_bundle(out, metagraph, {"A": random_controller(space, seed + 1)}, unit_table(space), name=name, version="0",
                 dataset="none", classes=[f"class{i}" for i in range(10)], default_controller="fast",
                 preprocessing=Preprocessing(input_size=32, **pre), networks=networks, cascades=[cascade])
    return {"models": models, "metagraph": metagraph, "threshold": threshold}


def assert_trained_apart_per_resolution(own: dict, start: dict, what: str) -> None:
    """`own` (a multi-resolution model's state: `metagraph.` + a plain network's keys, batch norms
    switched per resolution) starts from `start` (a plain network's state) and trains: a convolution
    differs from it, and some batch norm's statistics differ between the resolutions' copies."""
    import torch

    convolution = next(k for k in start if k.endswith("weight") and start[k].dim() == 4)
    assert f"metagraph.{convolution}" in own, "one set of convolutions for every resolution"
    assert not torch.equal(own[f"metagraph.{convolution}"], start[convolution]), f"starts from {what} and trains"
    means = [k for k in own if k.endswith(".norms.0.running_mean")]
    assert means and any(not torch.equal(own[k], own[k.replace(".norms.0.", ".norms.1.")]) for k in means), \
        "each resolution's batch norms keep statistics of their own"
