"""`leancnn.compress(model, spec, data=...)`: post-training methods on a model the user holds, the
same call that `leancnn compress RUN` makes."""
from __future__ import annotations

import json

import pytest
import torch

import leancnn
from leancnn.cli import main
from leancnn.config import load_config
from leancnn.errors import ConfigError
from leancnn.experiment import prepare_data
from leancnn.measure import count
from leancnn.runs import load_run, load_run_with_methods, read_result


def test_the_library_call_and_the_command_give_the_same_model(synthetic_vgg, tmp_path):
    run = synthetic_vgg.run_dir
    out = tmp_path / "cli"
    assert main(["compress", str(run), "--method", "l1prune:macs=0.5", "--epochs", "1", "--out", str(out),
                 "--no-latency", "--no-progress"]) == 0
    by_command, _ = load_run(out)
    model, _, existing = load_run_with_methods(run)
    config = load_config(run / "config.toml")
    by_call, record = leancnn.compress(model, "l1prune:macs=0.5", data=prepare_data(config), epochs=1,
                                       config=config, methods=existing)
    assert by_call.state_dict().keys() == by_command.state_dict().keys()
    for name, value in by_command.state_dict().items():
        assert torch.equal(by_call.state_dict()[name], value), name
    assert record.methods[0].startswith("l1prune:macs=0.5") and len(record.finetune_log) == 1
    assert set(record.test_accuracy) == {"original", "compressed", "finetuned"}
    # The compressed run's training time is its parent's plus its fine-tuning epoch's.
    finetuned = read_result(out)
    epoch_seconds = json.loads((out / "log.jsonl").read_text().splitlines()[0])["seconds"]
    assert epoch_seconds > 0
    assert finetuned.train_seconds == pytest.approx(synthetic_vgg.result.train_seconds + epoch_seconds, abs=2e-3)


def test_tensors_or_batches_of_a_model_in_hand(synthetic_vgg):
    model, _ = load_run(synthetic_vgg.run_dir)
    dataset = prepare_data(load_config(synthetic_vgg.run_dir / "config.toml"))
    images = dataset.train_images[:600].float() / 255           # floats in [0, 1], as a user holds them
    labels = dataset.train_labels[:600]
    shape = tuple(dataset.input_shape)
    dense_macs = count(model, shape).totals()["macs_effective"]
    pair, record = leancnn.compress(model, ["l1prune:macs=0.5"], data=(images, labels),
                                    example_input=images[:1])
    fresh, _ = load_run(synthetic_vgg.run_dir)   # a method may change the model it is given
    batches, _ = leancnn.compress(fresh, ["l1prune:macs=0.5"], data=[(images[i:i + 100], labels[i:i + 100])
                                                                   for i in range(0, 600, 100)])
    macs = count(pair, shape).totals()["macs_effective"]
    assert abs(macs / dense_macs - 0.5) <= 0.03, macs / dense_macs
    for name, value in pair.state_dict().items():   # the same images either way: the same model
        assert torch.equal(batches.state_dict()[name], value), name
    assert record.finetune_log == [] and record.test_accuracy == {}
    assert set(record.selection_accuracy) == {"original", "compressed", "finetuned"}


@pytest.mark.parametrize("data, example, message", [
    ((torch.full((8, 1, 16, 16), 2.0), torch.zeros(8, dtype=torch.long)), None, "floats in [0, 1]"),
    ((torch.rand(8, 16, 16), torch.zeros(8, dtype=torch.long)), None, "must be [N, C, H, W]"),
    ((torch.rand(8, 1, 16, 16), torch.zeros(7, dtype=torch.long)), None, "8 images but 7 labels"),
    ((torch.rand(8, 1, 16, 16), torch.zeros(8, dtype=torch.long)), torch.rand(1, 3, 16, 16), "does not fit"),
])
def test_bad_data_fails_with_one_line_before_the_model_changes(synthetic_vgg, data, example, message):
    model, _ = load_run(synthetic_vgg.run_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        leancnn.compress(model, "l1prune:macs=0.5", data=data, example_input=example)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
