"""Train a small CNN on scikit-learn's bundled digits, then compress its convolutions with Tucker-2 and CP.

Everything is offline: the 1,797 8x8 digit images ship with scikit-learn.

    python examples/digits_cnn.py
"""

from __future__ import annotations

import argparse
import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

import lowrank
from lowrank.nn.dense import dense_flops


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test splits (75% / 25%) of the digits, as ``(N, 1, 8, 8)`` images in [0, 1]."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(labels))
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


def make_cnn(width: int = 64, seed: int = 0) -> nn.Sequential:
    """Three 3x3 convolutions and a linear classifier, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, 10),
    )


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    """Adam on cross-entropy, mini-batches of 64."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correctly classified images."""
    return float((model(images).argmax(1) == labels).float().mean())


def conv_flops(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the model's convolutions (dense or factorized) on one image."""
    total, shapes = 0, {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        shapes[module] = tuple(inputs[0].shape)

    convs = [m for m in model if isinstance(m, (nn.Conv2d, lowrank.nn.FactorizedModule))]
    handles = [m.register_forward_hook(hook) for m in convs]
    with torch.no_grad():
        model(torch.zeros(1, *image_shape))
    for handle in handles:
        handle.remove()
    for module in convs:
        total += module.flops(shapes[module]) if isinstance(module, lowrank.nn.FactorizedModule) else dense_flops(
            module, shapes[module])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ratio", type=float, default=0.34, help="fraction of each conv's parameters kept")
    args = parser.parse_args()
    train_x, train_y, test_x, test_y = digits()
    dense = train(make_cnn(), train_x, train_y, args.epochs)
    base_flops = conv_flops(dense, (1, 8, 8))
    print(f"dense CNN: test accuracy {accuracy(dense, test_x, test_y):.3f}, conv MACs per image {base_flops:,}\n")
    for method in ("tucker2", "cp"):
        model = copy.deepcopy(dense)
        # the first conv sees a single input channel: as usual, it stays dense
        report = lowrank.compress(model, ratio=args.ratio, method={"conv": method}, exclude=["0"],
                                  filter_fn=lambda name, m: isinstance(m, nn.Conv2d), progress=False)
        print(f"--- {method} ---")
        print(report)
        flops = conv_flops(model, (1, 8, 8))
        print(f"test accuracy {accuracy(model, test_x, test_y):.3f} (before fine-tuning), conv MACs per image "
              f"{flops:,} ({base_flops / flops:.2f}x fewer)\n")


if __name__ == "__main__":
    main()
