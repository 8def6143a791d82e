"""A model the user brings (`--model FILE.py:FUNCTION` or `package.module:FUNCTION`): trained,
reloaded only with the source that trained it, profiled; bad references fail with one line."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from leancnn import apply_method
from leancnn.cli import main
from leancnn.config import TrainConfig
from leancnn.errors import ConfigError, LeancnnError
from leancnn.models import create_model
from leancnn.runs import load_run

# The user model (examples/user_model.py): a residual block whose body concatenates a
# 3x3 branch and a depthwise branch, then a 1x1; no leancnn import, and it takes only some of the
# keywords offered.
USER_NET = (Path(__file__).resolve().parents[1] / "examples" / "user_model.py").read_text()


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(USER_NET)
    return path


def test_a_user_model_trains_reloads_with_its_source_and_not_with_changed_source(user_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", f"{user_file}:build", "--data", "synthetic", "--epochs", "1",
                 "--train-subset", "128", "--test-subset", "64", "--batch-size", "32", "--threads", "1",
                 "--no-latency", "--no-progress", "--out", str(out)]) == 0
    recorded = json.loads((out / "model.json").read_text())["model_source"]
    assert recorded == {"reference": f"{user_file}:build", "file": str(user_file.resolve()),
                        "sha256": hashlib.sha256(user_file.read_bytes()).hexdigest()}
    model, architecture = load_run(out)
    assert type(model).__name__ == "MyNet" and architecture["model"] == f"{user_file}:build"
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = model(images)
    capsys.readouterr()
    assert main(["profile", str(out), "--json"]) == 0   # the other commands take the run as any other
    assert json.loads(capsys.readouterr().out)["params_total"] == sum(p.numel() for p in model.parameters())

    user_file.write_text(USER_NET + "\n# edited\n")
    with pytest.raises(LeancnnError, match="changed since the run was trained"):
        load_run(out)
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mynet.py changed since the run was trained" in err and len(err.splitlines()) == 1
    user_file.write_text(USER_NET)   # the same source again: the run loads and computes as before
    again, _ = load_run(out)
    assert torch.equal(again(images), reference)


def test_a_module_reference_builds_and_takes_methods(tmp_path, monkeypatch):
    package = tmp_path / "usernets_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mynet.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("usernets_pkg.mynet:build", num_classes=4, in_channels=3)
    assert model.head.out_features == 4 and model.stem[0].in_channels == 3
    pruned = apply_method(model, "dnr:density=0.5")
    densities = {name: float((m.weight != 0).float().mean()) for name, m in pruned.named_modules()
                 if isinstance(m, torch.nn.Conv2d)}
    assert densities["blocks.0.branch.0"] < 0.75 and densities["stem.0"] == 1.0   # the stem stays dense, as in DNR


@pytest.mark.parametrize("reference, message", [
    ("{dir}/absent.py:build", "is not a file"),
    ("{dir}/mynet.py:nothere", "has no function 'nothere'"),
    ("{dir}/mynet.py:", "a user model is FILE.py:FUNCTION"),
    ("no_such_package_xyz.net:build", "cannot import no_such_package_xyz.net"),
])
def test_bad_user_model_references_fail_with_one_line_before_any_work(user_file, tmp_path, capsys, reference,
                                                                     message):
    reference = reference.format(dir=user_file.parent)
    out = tmp_path / "run"
    assert main(["train", "--model", reference, "--data", "synthetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    with pytest.raises(ConfigError, match=message.split("{")[0]):
        create_model(reference, num_classes=10, in_channels=1)


def test_a_user_model_run_is_named_by_its_file_and_function():
    config = TrainConfig(model="nets/my_net.py:build", data="synthetic")
    assert config.run_dir().as_posix() == "runs/my_net.build-w1-synthetic-s0"
