"""Per-epoch checkpoints in safetensors + JSON (never pickle). The JSON file
`latest.json` is renamed into place last: it is the commit point, so a run
killed mid-write resumes from the previous complete epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import LeancnnError
from ..io import load_tensors, read_json_file, save_tensors, write_json

LATEST = "latest.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Optimizer buffers keyed by parameter position (stable across rebuilds)."""
    tensors = {}
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                           tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, index, key = name.split(".", 2)
        param = params[int(index)]
        optimizer.state[param][key] = value.to(param.device)


def method_tensors(methods_tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each method's own tensors, keyed by the method's position in the run's list."""
    return {f"method.{index}.{key}": value for index, tensors in enumerate(methods_tensors)
            for key, value in tensors.items()}


def tensors_of_method(tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"method.{index}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def save_checkpoint(folder: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    params: list[torch.nn.Parameter], info: dict[str, Any],
                    methods_tensors: list[dict[str, torch.Tensor]] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights_name = f"epoch-{epoch:04d}.safetensors"
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors(optimizer, params))
    tensors.update(method_tensors(list(methods_tensors)))
    save_tensors(folder / weights_name, tensors)
    write_json(folder / LATEST, {"epoch": epoch, "weights": weights_name, **info})
    for old in folder.glob("epoch-*.safetensors"):
        if old.name != weights_name:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    latest = folder / LATEST
    if not latest.is_file():
        return None
    info = read_json_file(latest)
    if not isinstance(info, dict) or not isinstance(info.get("weights"), str):
        raise LeancnnError(f"{latest}: not a leancnn checkpoint record (no 'weights' file named)")
    return info, load_tensors(folder / info["weights"])


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
