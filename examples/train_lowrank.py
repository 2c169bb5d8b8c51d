"""Train a CNN on scikit-learn's digits with Trained Rank Pruning, then finalize it into a smaller network.

TRP (``lowrank.train.TRP``) attaches to the optimizer: every few steps it truncates each convolution
and linear layer to the rank that keeps a share of its spectral energy (falling from 0.99 to the
final ``--energy``; its default 0.95 cut this CNN's conv MACs 2x within half a point of dense in
``benchmarks/train.py``), and adds a nuclear-norm subgradient. The training loop is the usual one.
At the end ``finalize()`` swaps each layer for its factorized module at the trained rank; a short
fine-tuning of the factorized network follows. Everything is offline (the digits ship with scikit-learn).

    python examples/train_lowrank.py
"""

from __future__ import annotations

import argparse

import torch
from digits_cnn import accuracy, conv_flops, digits, make_cnn
from torch import nn
from tqdm.auto import tqdm

import lowrank


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
        epochs: int, description: str, seed: int = 0) -> nn.Module:
    """Mini-batches of 64 with a progress bar; whatever is attached to ``optimizer`` runs on its own."""
    torch.manual_seed(seed)
    model.train()
    batches = [torch.randperm(len(labels)).split(64) for _ in range(epochs)]
    with tqdm(total=sum(map(len, batches)), desc=description, unit="step") as bar:
        for epoch in batches:
            for batch in epoch:
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs of training with TRP")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="epochs of the factorized network after")
    parser.add_argument("--energy", type=float, default=0.95, help="final share of spectral energy kept")
    parser.add_argument("--period", type=int, default=10, help="optimizer steps between truncations")
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()

    train_x, train_y, test_x, test_y = digits()
    dense = make_cnn(args.width)
    dense_params = sum(p.numel() for p in dense.parameters())
    dense_flops = conv_flops(dense, (1, 8, 8))

    model = make_cnn(args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = args.epochs * -(-len(train_y) // 64)
    # the first conv sees one input channel and the classifier is tiny: TRP trains the two wide convolutions
    trp = lowrank.train.TRP(model, optimizer, energy=lowrank.train.Ramp(0.99, args.energy, steps=steps // 2),
                            period=args.period, include=["2", "5"])
    fit(model, optimizer, train_x, train_y, args.epochs, "TRP")
    trained_accuracy = accuracy(model, test_x, test_y)
    report = trp.finalize()
    print(report)
    finalized_accuracy = accuracy(model, test_x, test_y)
    fit(model, torch.optim.Adam(model.parameters(), lr=1e-3), train_x, train_y, args.finetune_epochs, "fine-tune")

    params = sum(p.numel() for p in model.parameters())
    flops = conv_flops(model, (1, 8, 8))
    print(f"\ntest accuracy: {trained_accuracy:.3f} after TRP, {finalized_accuracy:.3f} finalized, "
          f"{accuracy(model, test_x, test_y):.3f} after fine-tuning")
    print(f"parameters {dense_params:,} -> {params:,}; conv MACs per image {dense_flops:,} -> {flops:,} "
          f"({dense_flops / flops:.2f}x fewer)")


if __name__ == "__main__":
    main()
