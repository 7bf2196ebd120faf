"""The zoo's networks written in PyTorch: the side-by-side peer of `benchmarks.train_step`.

torchvision has no CPU build here, so each network is written out from its paper, with the
same layers, widths and padding as the cnn_jax model of the same name (NCHW, as PyTorch
runs). They exist to time a train step; the models' numerical equality with independent
references is tested in `tests/`.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from cnn_jax.models.googlenet import MODULES as INCEPTION, POOL_BEFORE
from cnn_jax.models.lenet import C3_TABLE, rbf_prototypes
from cnn_jax.models.vgg import CONFIGS, WIDTHS


class LRN(nn.Module):
    """The paper's LRN (alpha not divided by n), over `groups` separate channel blocks."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0, groups=1):
        super().__init__()
        self.norm = nn.LocalResponseNorm(size, alpha * size, beta, k)  # PyTorch divides alpha by n
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.shape
        return self.norm(x.reshape(b * self.groups, c // self.groups, h, w)).reshape(b, c, h, w)


class AlexNet(nn.Sequential):
    """Krizhevsky et al. (2012); `towers=2` gives the two-GPU split as grouped convolutions:
    conv2, conv4 and conv5 see only their own tower, LRN runs per tower, conv3 and the fully
    connected layers see both. `pool5`: pool5's output size (6 at 227x227, 1 at 67x67)."""

    def __init__(self, num_classes=1000, towers=1, pool5=6):
        g = towers
        super().__init__(
            nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(), LRN(groups=g), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2, groups=g), nn.ReLU(), LRN(groups=g), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1, groups=g), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1, groups=g), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(256 * pool5 * pool5, 4096), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, num_classes))


def vgg(config="D", num_classes=1000) -> nn.Sequential:
    layers, channels = [], 3
    for convs, width in zip(CONFIGS[config], WIDTHS):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, num_classes))


class Bottleneck(nn.Module):
    def __init__(self, cin, filters, stride):
        super().__init__()
        cout = filters * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, filters, 1, bias=False), nn.BatchNorm2d(filters), nn.ReLU(),
            nn.Conv2d(filters, filters, 3, stride, 1, bias=False), nn.BatchNorm2d(filters), nn.ReLU(),
            nn.Conv2d(filters, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.project = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                        if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.body(x) + self.project(x))


def resnet50(num_classes=1000) -> nn.Sequential:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    channels = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        for b in range(blocks):
            layers.append(Bottleneck(channels, 64 * 2**stage, 2 if stage > 0 and b == 0 else 1))
            channels = 64 * 2**stage * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _conv(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2), nn.ReLU())


class Inception(nn.Module):
    def __init__(self, cin, widths):
        super().__init__()
        b1, r3, b3, r5, b5, proj = widths
        self.b1 = _conv(cin, b1, 1)
        self.b2 = nn.Sequential(_conv(cin, r3, 1), _conv(r3, b3, 3))
        self.b3 = nn.Sequential(_conv(cin, r5, 1), _conv(r5, b5, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv(cin, proj, 1))
        self.width = b1 + b3 + b5 + proj

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    """Szegedy et al. (2014) with both auxiliary heads (their losses weighted 0.3 in training)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        lrn = dict(size=5, alpha=1e-4 / 5, beta=0.75, k=1.0)  # Caffe's constants, in the paper's form
        self.stem = nn.Sequential(_conv(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1), LRN(**lrn), _conv(64, 64, 1),
                                  _conv(64, 192, 3), LRN(**lrn), nn.MaxPool2d(3, 2, 1))
        self.blocks, self.aux = nn.ModuleDict(), nn.ModuleDict()
        channels = 192
        for name, widths in INCEPTION.items():
            self.blocks[name] = Inception(channels, widths)
            channels = self.blocks[name].width
            if name in ("4a", "4d"):
                self.aux[name] = nn.Sequential(nn.AvgPool2d(5, 3), _conv(channels, 128, 1), nn.Flatten(),
                                               nn.Linear(128 * 4 * 4, 1024), nn.ReLU(), nn.Dropout(0.7),
                                               nn.Linear(1024, num_classes))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.4),
                                  nn.Linear(channels, num_classes))

    def forward(self, x):
        x, aux = self.stem(x), []
        for name, block in self.blocks.items():
            if name in POOL_BEFORE:
                x = F.max_pool2d(x, 3, 2, 1)
            x = block(x)
            if name in self.aux and self.training:
                aux.append(self.aux[name](x))
        return self.head(x), aux


def _squash(a):
    return 1.7159 * torch.tanh(2.0 * a / 3.0)


class Subsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.coefficient = nn.Parameter(torch.ones(channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x):
        return F.avg_pool2d(x, 2) * 4.0 * self.coefficient + self.bias


class LeNet5(nn.Module):
    """LeCun et al. (1998): C3's partial connections as a masked kernel, fixed RBF outputs."""

    def __init__(self):
        super().__init__()
        self.c1, self.s2 = nn.Conv2d(1, 6, 5), Subsample(6)
        self.c3, self.s4 = nn.Conv2d(6, 16, 5), Subsample(16)
        self.c5, self.f6 = nn.Conv2d(16, 120, 5), nn.Linear(120, 84)
        mask = torch.zeros(16, 6, 1, 1)
        for j, maps in enumerate(C3_TABLE):
            mask[j, list(maps)] = 1.0
        self.register_buffer("mask", mask)
        self.register_buffer("prototypes", torch.from_numpy(rbf_prototypes()))

    def forward(self, x):
        x = _squash(self.s2(_squash(self.c1(x))))
        x = _squash(F.conv2d(x, self.c3.weight * self.mask, self.c3.bias))
        x = _squash(self.c5(_squash(self.s4(x)))).flatten(1)
        x = _squash(self.f6(x))
        return -((x[:, None, :] - self.prototypes[None]) ** 2).sum(-1)


PEERS = {
    "alexnet": AlexNet,
    "alexnet_2tower": lambda: AlexNet(towers=2),
    "vgg16": vgg,
    "resnet50": resnet50,
    "googlenet": GoogLeNet,
    "lenet5": LeNet5,
}
