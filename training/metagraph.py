"""The one-shot meta-graph: a stem, cells of parallel candidate modules, a head.

Two forward paths over the same weights, given a per-sample policy (N, cells, modules):
- `forward(x, policy)` runs every module on every row and sums the selected outputs
  (masking), the textbook definition;
- `forward_selected(x, policy)` runs each module only on the rows that selected it and
  adds the result into those rows, which is what the served executor does and what
  training uses (the cost of a batch falls with the number of modules kept).
Both apply `service.architecture.apply_empty_cell_rule` first; in eval mode they agree.

Residual cells (stride 1, same channels in and out) add their input once, at the cell:
`out = x + merge(selected branches)`, so an empty residual cell is the identity and
"module 0 only" is exactly MobileNetV2's block. Were each selected module to carry its
own shortcut, as in the authors' code, a cell keeping k modules would pass k times its
input on. `merge` is the search space's `combine`: the mean by default, so that a cell's
output scale does not depend on how many modules an image selected (the sum the paper
describes is available as `combine="sum"`).
"""

from __future__ import annotations

import torch
from torch import nn

from service.architecture import apply_empty_cell_rule
from service.manifest import CellSpec, ModuleSpec, SearchSpace


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class InvertedResidual(nn.Module):
    """1x1 expand, BN, ReLU, kxk depthwise, BN, ReLU, 1x1 project, BN (the residual branch)."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, kernel, stride, groups=hidden), nn.ReLU(inplace=True)]
        layers += _conv_bn(hidden, cout, 1)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BasicBlock(nn.Module):
    """kxk conv, BN, ReLU, kxk conv, BN, ReLU6 (the paper's fifth module)."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, kernel, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(cout, cout, kernel),
            nn.ReLU6(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# Every module kind a search space may name (service.manifest.ModuleSpec.kind), and its builder.
MODULE_KINDS = {
    "inverted_residual": lambda cell, spec: InvertedResidual(cell.in_channels, cell.out_channels, cell.stride,
                                                             spec.kernel, spec.expansion),
    "basic": lambda cell, spec: BasicBlock(cell.in_channels, cell.out_channels, cell.stride, spec.kernel),
}


def build_module(cell: CellSpec, spec: ModuleSpec) -> nn.Module:
    """The PyTorch module of `spec` in `cell`; an unknown kind is an error, never a default."""
    try:
        builder = MODULE_KINDS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown module kind {spec.kind!r} (module {spec.name!r}); known: "
                         f"{', '.join(MODULE_KINDS)}") from None
    return builder(cell, spec)


class Stem(nn.Sequential):
    def __init__(self, space: SearchSpace):
        super().__init__(*_conv_bn(3, space.stem_channels, 3, space.stem_stride), nn.ReLU(inplace=True))


class Head(nn.Module):
    """1x1 conv to head_channels, BN, ReLU, global average pool, linear."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        last = space.cells[-1].out_channels
        self.features = nn.Sequential(*_conv_bn(last, space.head_channels, 1), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(space.head_channels, space.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.classifier(x)


class MetaGraph(nn.Module):
    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self.stem = Stem(space)
        self.cells = nn.ModuleList(
            nn.ModuleList(build_module(cell, spec) for spec in cell.modules) for cell in space.cells
        )
        self.head = Head(space)
        self._skippable = [cell.skippable for cell in space.cells]
        for m in self.modules():
            # Convolutions keep PyTorch's default (fan-in) init: fan-out init gives depthwise
            # kernels weights so small that SGD at lr 0.05 diverged in the first steps (measured).
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def executed(self, policy: torch.Tensor) -> torch.Tensor:
        """The (N, cells, modules) boolean matrix of what runs, empty-cell rule applied."""
        rule = apply_empty_cell_rule(policy.detach().bool().cpu().numpy(), self.space)
        return torch.from_numpy(rule).to(policy.device)

    def _weights(self, executed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N, cells) factor applied to each selected module's output: 1, or 1/k for the mean."""
        if self.space.combine == "sum":
            return torch.ones(executed.shape[:2], dtype=dtype, device=executed.device)
        return 1.0 / executed.sum(2).clamp(min=1).to(dtype)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Masked forward: every module on every row, selected outputs merged."""
        executed = self.executed(policy).to(x.dtype)
        weights = self._weights(executed, x.dtype)
        h = self.stem(x)
        for c, modules in enumerate(self.cells):
            mask = executed[:, c] * weights[:, c, None]
            out = sum(mask[:, m, None, None, None] * module(h) for m, module in enumerate(modules))
            h = h + out if self._skippable[c] else out
        return self.head(h)

    def forward_selected(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Sparse forward: each module runs only on the rows that selected it."""
        executed = self.executed(policy)
        weights = self._weights(executed, x.dtype)[:, :, None, None, None]
        mean = self.space.combine == "mean"
        h = self.stem(x)
        n = x.shape[0]
        for c, modules in enumerate(self.cells):
            mask = executed[:, c]
            out = h if self._skippable[c] else None
            for m, module in enumerate(modules):
                rows = mask[:, m]
                if bool(rows.all()):
                    y = module(h) * weights[:, c] if mean else module(h)
                    out = y if out is None else out + y
                elif bool(rows.any()):
                    idx = rows.nonzero().squeeze(1)
                    y = module(h.index_select(0, idx))
                    if mean:
                        y = y * weights[idx, c]
                    if out is None:
                        out = torch.empty((n, *y.shape[1:]), dtype=y.dtype, device=y.device,
                                          memory_format=_format_of(y)).zero_()
                    out = out.index_add(0, idx, y)
            h = out
        return self.head(h)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
