"""Every registered model builds, trains one step and evaluates (parametrised
over the registry, so a new model is tested the day it is registered)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leancnn.data import load_dataset
from leancnn.errors import ConfigError
from leancnn.models import MODELS, Normalize, create_model
from leancnn.train import Trainer, evaluate

from .conftest import tiny_config


@pytest.mark.parametrize("name", MODELS.names())
def test_model_trains_one_step_and_evaluates(name, tmp_path):
    dataset = load_dataset("synthetic").subset(train=16, test=8)
    model = create_model(name, num_classes=dataset.num_classes, in_channels=1, width=0.25,
                         mean=dataset.mean, std=dataset.std)
    before = [p.detach().clone() for p in model.parameters()]
    config = tiny_config(tmp_path, model=name, batch_size=16)
    trainer = Trainer(model, dataset, config, progress=False)
    trainer.fit()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed > 0, "one SGD step must move the weights"
    result = evaluate(model, dataset.test_images, dataset.test_labels)
    with torch.no_grad():   # the same predictions by hand: uint8 pixels to [0, 1], argmax
        by_hand = (model.eval()(dataset.test_images.float() / 255).argmax(1) == dataset.test_labels).float().mean()
    assert result.top1 == pytest.approx(float(by_hand)) and result.count == 8
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, dataset.num_classes)


@pytest.mark.parametrize("name", MODELS.names())
def test_normalisation_is_the_first_op_and_width_scales(name):
    model = create_model(name, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    first = next(module for module in model.modules() if not isinstance(module, nn.Sequential) and module is not model)
    assert isinstance(first, Normalize)
    wide = sum(p.numel() for p in model.parameters())
    narrow = sum(p.numel() for p in create_model(name, width=0.5).parameters())
    assert narrow < 0.6 * wide


def test_conv_layer_is_injectable():
    built = []

    class CountingConv(nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    model = create_model("resnet20", conv_layer=CountingConv)
    assert len(built) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 19 + 2  # 19 3x3 convs, 2 projection shortcuts


def test_bad_model_arguments():
    with pytest.raises(ConfigError, match="unknown model 'resnet7'; choose one of: .*resnet20"):
        create_model("resnet7")
    with pytest.raises(ConfigError, match="width must be > 0"):
        create_model("resnet20", width=0)
    with pytest.raises(ConfigError, match="mean/std need 3 values"):
        create_model("resnet20", in_channels=3, mean=[0.5])
