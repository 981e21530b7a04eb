"""The controller: a small ResNet that maps an image to one probability per (cell, module)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from service.manifest import SearchSpace


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class Controller(nn.Module):
    """Three stages of one basic block (channels configurable), then one sigmoid per (cell, module).

    `downsample` average-pools the image first, as the paper's ImageNet controller
    does, to keep the controller cheap next to the meta-graph it steers.
    """

    def __init__(self, space: SearchSpace, channels: tuple[int, int, int] = (16, 32, 64), downsample: int = 1):
        super().__init__()
        self.shape = (space.num_cells, space.num_modules)
        self.downsample = downsample
        c1, c2, c3 = channels
        self.stem = nn.Sequential(nn.Conv2d(3, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(_Block(c1, c1, 1), _Block(c1, c2, 2), _Block(c2, c3, 2))
        self.fc = nn.Linear(c3, space.num_cells * space.num_modules)
        # Start every module near p = 0.5 with a slight bias to keep: early rewards then
        # come from architectures the pre-trained meta-graph knows.
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, 0.5)

    @torch.no_grad()
    def start_at(self, matrix, strength: float = 3.0) -> "Controller":
        """Choose the (cells, modules) architecture `matrix` for every image: p = sigmoid(+-strength)."""
        nn.init.zeros_(self.fc.weight)
        signs = torch.as_tensor(matrix, dtype=torch.float32).flatten() * 2 - 1
        self.fc.bias.copy_(signs * strength)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        x = self.stages(self.stem(x)).mean(dim=(2, 3))
        return torch.sigmoid(self.fc(x)).view(-1, *self.shape)
