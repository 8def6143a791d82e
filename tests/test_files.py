"""Every file leancnn reads fails, when truncated or garbage, with one line naming the file and
exit 2 in each command that reads it: never a traceback, never an unpickle."""
from __future__ import annotations

import json
import shutil

import pytest

from leancnn.cli import main
from leancnn.experiment import train_run

from .conftest import tiny_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    train_run(tiny_config(root, epochs=1, out=str(root / "run")), progress=False)
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def garbage(path):
    path.write_bytes(b"\x00\x01not what it should be\xff" * 8)


def one_line_error(capsys, argv, name):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and name in err and "Traceback" not in err, err
    return err


COMMANDS = {
    "eval": lambda run: ["eval", str(run), "--no-progress"],
    "profile": lambda run: ["profile", str(run)],
    "compress": lambda run: ["compress", str(run), "--method", "l1prune:macs=0.5", "--epochs", "0",
                             "--out", str(run.parent / "out"), "--no-progress"],
}


@pytest.mark.parametrize("damage", [truncate, garbage])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_damaged_weights(run_copy, capsys, command, damage):
    damage(run_copy / "model.safetensors")
    err = one_line_error(capsys, COMMANDS[command](run_copy), "model.safetensors")
    assert "not a readable safetensors file" in err
    assert not (run_copy.parent / "out").exists(), "nothing is written after a bad input"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"{}"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_damaged_model_description(run_copy, capsys, command, content):
    (run_copy / "model.json").write_bytes(content)
    one_line_error(capsys, COMMANDS[command](run_copy), "model.json")


@pytest.mark.parametrize("damage", [truncate, garbage])
def test_damaged_result(run_copy, capsys, damage):
    damage(run_copy / "result.json")
    one_line_error(capsys, ["eval", str(run_copy), "--no-progress"], "result.json")


def test_damaged_checkpoint_on_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "synthetic", "--width", "0.25", "--epochs", "1", "--train-subset", "300",
            "--test-subset", "100", "--out", "run", "--no-progress", "--no-latency", "--threads", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    # A finished run made unfinished again, with a damaged checkpoint record, then damaged weights.
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    (tmp_path / "run" / "result.json").unlink()
    (checkpoint / "latest.json").write_text("{garbage")
    one_line_error(capsys, [*argv, "--resume"], "latest.json")
    (checkpoint / "latest.json").write_text(json.dumps({"epoch": 1, "weights": "epoch.safetensors"}))
    (checkpoint / "epoch.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    one_line_error(capsys, [*argv, "--resume"], "epoch.safetensors")


@pytest.mark.parametrize("content", [b"{garbage", b"[]", b'{"models": []}'])
def test_damaged_zoo_manifest(tmp_path, capsys, content):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "manifest.json").write_bytes(content)
    one_line_error(capsys, ["zoo", "show", str(tmp_path / "zoo")], "manifest.json")
