"""Models the user brings: `path/to/file.py:build` or `package.module:build` wherever a model name
goes. `build` is called with the keywords it accepts of num_classes, in_channels, width, mean, std
(the dataset's normalisation, [0, 1] pixel units; a model that takes no mean/std is fed [0, 1]
images) and returns an nn.Module. The source file's SHA-256 is recorded with a run, so that a run
reloads only with the code that trained it."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError, LeancnnError

BUILD_KEYWORDS = ("num_classes", "in_channels", "width", "mean", "std")


def is_user_model(name: str) -> bool:
    return ":" in name


def _split(reference: str) -> tuple[str, str]:
    where, _, attribute = reference.rpartition(":")
    if not where or not attribute.isidentifier():
        raise ConfigError(f"model {reference!r}: a user model is FILE.py:FUNCTION or package.module:FUNCTION")
    return where, attribute


def _is_file_reference(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def user_source_file(reference: str) -> Path:
    """The file that defines the reference's builder (for a module: its source file)."""
    where, _ = _split(reference)
    if _is_file_reference(where):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"model {reference!r}: {where} is not a file")
        return path
    module = _import_module(reference, where)
    source = inspect.getsourcefile(module)
    if source is None:
        raise ConfigError(f"model {reference!r}: module {where} has no source file to record")
    return Path(source).resolve()


def _import_module(reference: str, where: str) -> Any:
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise ConfigError(f"model {reference!r}: cannot import {where} ({exc})") from None


def _load_file_module(path: Path) -> Any:
    # A name of its own per file and content, so that two files called model.py do not collide.
    name = "leancnn_user_model_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:   # the user's code: any error it raises is the file's problem
        del sys.modules[name]
        raise ConfigError(f"{path}: importing it failed ({type(exc).__name__}: {exc})") from None
    return module


def user_builder(reference: str) -> Callable[..., nn.Module]:
    where, attribute = _split(reference)
    module = _load_file_module(user_source_file(reference)) if _is_file_reference(where) \
        else _import_module(reference, where)
    builder = getattr(module, attribute, None)
    if not callable(builder):
        raise ConfigError(f"model {reference!r}: {where} has no function {attribute!r}")
    return builder


def build_user_model(reference: str, **kwargs: Any) -> nn.Module:
    builder = user_builder(reference)
    parameters = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    given = {k: v for k, v in kwargs.items() if k in BUILD_KEYWORDS and (takes_any or k in parameters)}
    model = builder(**given)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {reference!r}: {builder.__name__}() returned {type(model).__name__}, not an nn.Module")
    return model


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def user_model_source(reference: str) -> dict[str, str]:
    """What model.json records of a user model: the reference, its file and the file's SHA-256."""
    path = user_source_file(reference)
    return {"reference": reference, "file": str(path), "sha256": file_sha256(path)}


def reload_reference(recorded: dict[str, str]) -> str:
    """The reference to rebuild a recorded user model from: a file by its recorded absolute path
    (the run may be loaded from another folder), a module by its name."""
    where, attribute = _split(recorded["reference"])
    return f"{recorded['file']}:{attribute}" if _is_file_reference(where) else recorded["reference"]


def check_user_model_source(recorded: dict[str, str], described_in: Path) -> None:
    """Raise, naming the file, when the user model's source is gone or differs from the one recorded."""
    path = Path(recorded["file"])
    if not path.is_file():
        raise LeancnnError(f"{described_in}: the run was trained with the user model in {path}, which is not there")
    now = file_sha256(path)
    if now != recorded["sha256"]:
        raise LeancnnError(f"{described_in}: {path} changed since the run was trained (SHA-256 {now[:12]}, recorded "
                           f"{recorded['sha256'][:12]}); restore that version or train again")
