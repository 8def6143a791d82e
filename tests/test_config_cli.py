"""Config validation and the CLI's one-line errors (exit code 2)."""
from __future__ import annotations

import json

import pytest

from leancnn import __version__
from leancnn.cli import build_parser
from leancnn.commands import COMMANDS, GROUPS
from leancnn.config import config_help
from leancnn.cli import main
from leancnn.config import load_config, to_toml
from leancnn.errors import ConfigError


def test_toml_then_flags_override(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('model = "vgg11"\nepochs = 3\nlr = 1\nmethods = []\n')
    config = load_config(path, {"epochs": 5})
    assert (config.model, config.epochs, config.lr) == ("vgg11", 5, 1.0)
    assert isinstance(config.lr, float)
    round_trip = tmp_path / "again.toml"
    round_trip.write_text(to_toml(config))
    assert load_config(round_trip) == config


def test_train_table_is_accepted(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[train]\nepochs = 2\n')
    assert load_config(path).epochs == 2


@pytest.mark.parametrize("text, message", [
    ('epoch = 3\n', "unknown key 'epoch'; valid keys: data, "),
    ('epochs = "three"\n', "key 'epochs' expects int, got str"),
    ('augment = 1\n', "key 'augment' expects bool"),
    ('schedule = "linear"\n', "key 'schedule' must be one of onecycle, cosine, step"),
    ('epochs = 0\n', "config key 'epochs' must be >= 1"),
    ('epochs = \n', "not valid TOML"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet7", "--no-progress"], "unknown model 'resnet7'; choose one of:"),
    (["train", "--data", "imagenet", "--no-progress"], "unknown dataset 'imagenet'; choose one of:"),
    (["train", "--method", "nosuch", "--no-progress"], "unknown method 'nosuch'"),
    (["train", "--epochs", "x"], "--epochs: 'x' is not a valid int"),
    (["train", "--config", "missing.toml"], "missing.toml: config file not found"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists(), "a rejected command writes nothing"


def test_version_and_listings(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "resnet20" in capsys.readouterr().out.split()
    assert main(["datasets"]) == 0
    assert "fashion-mnist" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_train_cli_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "exp.toml"
    config.write_text('data = "synthetic"\nwidth = 0.25\nepochs = 1\nlatency = false\n')
    code = main(["train", "--config", str(config), "--out", "runs/a", "--json", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dataset"] == "synthetic" and printed["epochs"] == 1
    assert main(["runs", "--root", "runs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in listed] == ["resnet20"]
    # Same --out again: refused, nothing overwritten.
    assert main(["train", "--config", str(config), "--out", "runs/a", "--no-progress"]) == 2
    assert "already there" in capsys.readouterr().err


@pytest.mark.parametrize("name", COMMANDS.names())
def test_every_registered_command_has_help_and_its_own_parser(name, capsys):
    command = COMMANDS.get(name)
    top = name.split()[0]   # a sub-command ("zoo build") is listed under its group
    assert command.help and top in build_parser().format_help() and (top == name or top in GROUPS)
    with pytest.raises(SystemExit) as exit_info:
        main([*name.split(), "--help"])
    assert exit_info.value.code == 0
    shown = "".join(capsys.readouterr().out.split())   # argparse wraps lines, also at hyphens
    assert "".join((command.description or command.help).split()) in shown


def test_config_flags_come_from_the_config_fields():
    parser = build_parser()
    text = "".join(parser._subparsers._group_actions[0].choices["train"].format_help().split())
    for key, help_text in config_help().items():
        if key != "methods":
            assert f"--{key.replace('_', '-')}" in text and "".join(help_text.split()) in text
