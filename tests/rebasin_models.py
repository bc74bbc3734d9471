"""Small seeded models of every architecture the Re-Basin spec derivation supports (shared by the tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(widths: tuple[int, ...] = (64, 32, 32, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """conv-BN-ReLU blocks with max pooling, flatten, two Linear layers (8×8 single-channel input)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc1 = nn.Linear(2 * width * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    """Basic residual block; a 1×1 conv + BN projection shortcut when the width or stride changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, stride=2), Block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


class TransformerMLP(nn.Module):
    """Token embedding, pre-LayerNorm residual MLP blocks (GELU), final LayerNorm and head."""

    def __init__(self, vocab: int = 20, dim: int = 16, hidden: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(6, dim) * 0.1)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            x = x + down(F.gelu(up(norm(x))))
        return self.head(self.norm(x))


class Attention(nn.Module):
    """Patch embedding, pre-LayerNorm self-attention and MLP blocks with residuals, mean pooling, head."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 24) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(x.shape[0], 8, 8))  # the 8 rows of an 8×8 image as tokens
        y = self.norm1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        h = h + self.down(F.gelu(self.up(self.norm2(h))))
        return self.head(h.mean(1))


def inputs(model: nn.Module, batch: int = 4, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, TransformerMLP):
        return torch.randint(0, 20, (batch, 6), generator=generator)
    if isinstance(model, nn.Sequential):
        return torch.randn(batch, 64, generator=generator)
    return torch.randn(batch, 1, 8, 8, generator=generator)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (as after training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=generator))
    return model


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"mlp": mlp, "vgg": VGG, "resnet": ResNet, "transformer": TransformerMLP, "attention": Attention}[name]()
    return randomise_bn(model, seed).eval()
