"""Trainer throughput against a minimal hand-written PyTorch loop: same model,
batch, optimizer, threads and in-memory data; no augmentation in either, so
both do the same work. Prints images per second (median of alternating
repeats) and the ratio docs/results.md quotes.

    .venv/bin/python benchmarks/train_throughput.py [--model resnet20] [--steps 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from common import machine_line, median, pin_threads

from leancnn.config import TrainConfig
from leancnn.data import load_dataset
from leancnn.models import create_model
from leancnn.train import Trainer


def hand_loop(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(images))
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        x = images[index].float().div_(255.0)
        loss = loss_fn(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(images) / (time.perf_counter() - started)


def trainer_run(model: nn.Module, dataset, batch_size: int) -> float:
    config = TrainConfig(model="resnet20", epochs=1, batch_size=batch_size, lr=0.05, augment=False,
                         channels_last=False).validate()
    trainer = Trainer(model, dataset, config, progress=True)
    trainer.fit()
    return len(dataset.train_images) / trainer.state.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    pin_threads(args.threads)
    full = load_dataset("fashion-mnist")
    dataset = full.subset(train=args.steps * args.batch_size, test=1, seed=0)

    def fresh_model() -> nn.Module:
        torch.manual_seed(0)
        return create_model(args.model, num_classes=10, in_channels=1, mean=full.mean, std=full.std)

    hand_loop(fresh_model(), dataset.train_images[:4 * args.batch_size], dataset.train_labels, args.batch_size)  # warm-up
    hand, ours = [], []
    for _ in range(args.repeats):
        hand.append(hand_loop(fresh_model(), dataset.train_images, dataset.train_labels, args.batch_size))
        ours.append(trainer_run(fresh_model(), dataset, args.batch_size))
    print(machine_line())
    print(f"{args.model}, batch {args.batch_size}, {args.steps} steps, {args.repeats} alternating repeats")
    print(f"hand-written loop: {median(hand):.1f} img/s (runs: {', '.join(f'{v:.0f}' for v in hand)})")
    print(f"leancnn Trainer:   {median(ours):.1f} img/s (runs: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"ratio Trainer / hand loop: {median(ours) / median(hand):.3f}")


if __name__ == "__main__":
    main()
