"""What every phase of a run needs: config, run folder, device, data, the search space."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from service.manifest import SearchSpace
from training import data as datasets
from training import distributed
from training.config import CIFAR10_MEAN, CIFAR10_STD, RunConfig
from training.controller import Controller
from training.metagraph import MetaGraph
from training.rundir import RunDir


@dataclass
class Context:
    run: RunDir
    data_root: str
    device: torch.device
    train: datasets.ImageSet
    val: datasets.ImageSet  # held out from the training images: every choice is made on it
    test: datasets.ImageSet  # read only for final reports
    space: SearchSpace
    mean: tuple[float, float, float] = CIFAR10_MEAN  # the inputs' normalisation (data.mean, data.std)
    std: tuple[float, float, float] = CIFAR10_STD
    rank: int = 0  # this process under torchrun, of `world`
    world: int = 1

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @classmethod
    def open(cls, run: RunDir, data_root: str) -> "Context":
        config = run.config
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        if config.threads:
            torch.set_num_threads(config.threads)
        device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if config.device == "auto" else config.device))
        rank, world, device = distributed.setup(device)
        run.main = rank == 0
        size = config.space.input_size
        train, val = datasets.load(data_root, split="train", size=size).split(config.data.val_images, config.seed)
        train = train.subset(config.data.train_limit, config.seed)
        test = datasets.load(data_root, split="test", size=size).subset(config.data.test_limit, config.seed)
        if train.classes != test.classes:
            raise ValueError(f"train classes {train.classes} differ from test classes {test.classes}")
        measured = datasets.channel_statistics(train) if config.data.mean is None or config.data.std is None else None
        mean = config.data.mean if config.data.mean is not None else measured[0]
        std = config.data.std if config.data.std is not None else measured[1]
        space = config.space.build(len(train.classes)).model_copy(update={"resolutions": config.resolutions})
        return cls(run, data_root, device, train, val, test, space,
                   mean=tuple(mean), std=tuple(std), rank=rank, world=world)

    def batches(self, split: str, batch_size: int | None = None, *, seed: int = 0,
                cutout_epochs: int | None = None) -> datasets.Batches:
        """`train` batches are shuffled and augmented (cutout in the first `cutout_epochs` epochs,
        None: all); `val` and `test` are neither."""
        images = {"train": self.train, "val": self.val, "test": self.test}[split]
        train = split == "train"
        size = batch_size or (self.config.data.batch_size if train else self.config.data.eval_batch_size)
        shard = {"rank": self.rank, "world": self.world} if train else {}
        return datasets.Batches(images, size, mean=self.mean, std=self.std, train=train, seed=self.config.seed + seed,
                                cutout_epochs=cutout_epochs, **shard)

    @property
    def baseline_space(self) -> SearchSpace:
        """The static MobileNetV2 of the same width: the search space with module 0 only in every cell."""
        cells = [cell.model_copy(update={"modules": cell.modules[:1]}) for cell in self.space.cells]
        return self.space.model_copy(update={"cells": cells, "resolutions": []})

    def space_at(self, resolution: int) -> SearchSpace:
        """The search space for inputs of `resolution` x `resolution` (a network of its own)."""
        return dataclasses.replace(self.config.space, input_size=resolution).build(len(self.train.classes))

    def baseline_space_at(self, resolution: int) -> SearchSpace:
        """The baseline's space (module 0 in every cell) for inputs of `resolution` x `resolution`."""
        space = self.space_at(resolution)
        cells = [cell.model_copy(update={"modules": cell.modules[:1]}) for cell in space.cells]
        return space.model_copy(update={"cells": cells})

    @property
    def memory_format(self) -> torch.memory_format:
        # channels-last runs the depthwise convolutions about 1.4x faster on CPU (measured here).
        return torch.channels_last if self.device.type == "cpu" else torch.contiguous_format

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device).contiguous(memory_format=self.memory_format)

    def new_metagraph(self, space: SearchSpace | None = None) -> MetaGraph:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(datasets.derive_seed(self.config.seed, 101))
            model = MetaGraph(space or self.space)
        return model.to(self.device, memory_format=self.memory_format)

    def new_controller(self) -> Controller:
        c = self.config.controller
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(datasets.derive_seed(self.config.seed, 102))
            model = Controller(self.space, tuple(c.channels), c.downsample)
        return model.to(self.device, memory_format=self.memory_format)
