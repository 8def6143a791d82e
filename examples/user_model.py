"""A CNN of the user's own, as `--model examples/user_model.py:build` takes it: a residual block
whose body concatenates a 3x3 branch and a depthwise branch, then mixes them with a 1x1. No
leancnn import: any function returning an nn.Module works, taking whichever of num_classes,
in_channels, width, mean and std it wants."""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(channels), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                       nn.BatchNorm2d(channels), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(x + self.mix(torch.cat([self.branch(x), self.depthwise(x)], dim=1)))


class MyNet(nn.Module):
    def __init__(self, num_classes, in_channels, channels=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(Block(channels), nn.MaxPool2d(2), Block(channels))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def build(num_classes, in_channels, width=1.0):
    return MyNet(num_classes, in_channels, channels=max(8, int(round(32 * width))))
