"""The experiment config: one typed dataclass, TOML file as defaults, command-line
flags on top. Unknown keys and wrong types are rejected naming the key."""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError
from .spec import check_value

Schedule = Literal["onecycle", "cosine", "step"]
Precision = Literal["fp32", "bf16", "fp16"]
Backend = Literal["auto", "gloo", "nccl", "mpi", "ucc"]


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text (what `--help` and the TOML reference show)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = option("fashion-mnist", "dataset name (see `leancnn datasets`)")
    data_dir: str | None = option(None, "folder holding the dataset files")
    model: str = option("resnet20", "model name (see `leancnn models`), or your own: FILE.py:FUNCTION or "
                                    "package.module:FUNCTION (called with num_classes, in_channels, ... it accepts)")
    width: float = option(1.0, "channel width multiplier")
    methods: list[str] = option(factory=list, help="method specs, applied in order (see `leancnn methods`)")
    epochs: int = option(10, "training epochs")
    batch_size: int = option(128, "images per step")
    lr: float = option(0.1, "peak learning rate, for batch_size images per step")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "L2 weight decay")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss")
    schedule: Schedule = option("onecycle", "learning-rate schedule")
    warmup_fraction: float = option(0.15, "onecycle/cosine: share of all steps spent warming up")
    step_milestones: list[int] = option(factory=lambda: [40, 80, 100, 115, 130, 140],
                                        help="step schedule: epochs at which the lr is multiplied by step_gamma")
    step_gamma: float = option(0.2, "step schedule: lr factor at each milestone")
    augment: bool = option(True, "random crops and flips while training")
    train_subset: int | None = option(None, "train on this many images (seeded subset; default: the whole split)")
    test_subset: int | None = option(None, "evaluate on this many images")
    seed: int = option(0, "random seed (data order, init, augmentation)")
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(0, "CPU threads per process (0 = all, or under torchrun its OMP_NUM_THREADS)")
    precision: Precision = option("fp32", "training arithmetic: fp32, or autocast to bf16 (CPU or CUDA) or fp16 (CUDA, "
                                          "with loss scaling)")
    backend: Backend = option("auto", "process-group backend under torchrun (auto: NCCL on CUDA, gloo on CPU)")
    # Off by default: on 2 CPU ranks over gloo the 38 collectives a resnet20 step adds cut the
    # throughput to 0.62x (benchmarks/ddp_throughput.py); per-rank statistics are DDP's default too.
    sync_batchnorm: bool = option(False, "under torchrun: batch norm in training normalises with the global batch's "
                                         "statistics, as one process does (exact, slower), not each rank's")
    # None = auto: on for CUDA; off for CPU training, where contiguous measured
    # 1.2x faster for resnet20 on this project's 2-core machines.
    channels_last: bool | None = option(None, "channels-last memory format (default: on for CUDA only)")
    eval_batch_size: int = option(500, "images per evaluation batch")
    latency: bool = option(True, "measure CPU latency (batch 1 and 64) into result.json; MACs and storage are always counted")
    out: str | None = option(None, "run directory (default runs/<model>-w<width><methods>-<data>-s<seed>)")

    def validate(self) -> "TrainConfig":
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("width", self.width > 0, "must be > 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("warmup_fraction", 0 <= self.warmup_fraction < 1, "must be in [0, 1)"),
            ("threads", self.threads >= 0, "must be >= 0"),
            ("train_subset", self.train_subset is None or self.train_subset >= 1, "must be >= 1"),
            ("test_subset", self.test_subset is None or self.test_subset >= 1, "must be >= 1"),
            ("device", self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "must be auto, cpu or cuda"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key {key!r} {why}, got {getattr(self, key)!r}")
        return self

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        methods = "".join("-" + re.sub(r"[^A-Za-z0-9_.=]+", "_", m) for m in self.methods)
        # A user model (dir/net.py:build) is named by its file's stem and function.
        where, _, function = self.model.rpartition(":")
        model = f"{Path(where).stem}.{function}" if where else self.model
        return Path("runs") / f"{model}-w{self.width:g}{methods}-{self.data}-s{self.seed}"


def config_fields() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def config_help() -> dict[str, str]:
    """Config key -> its help text."""
    return {item.name: item.metadata.get("help", "") for item in dataclasses.fields(TrainConfig)}


def apply_overrides(config: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    hints = config_fields()
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {', '.join(hints)}")
        setattr(config, key, check_value(key, value, hints[key], source))
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        # Allow the keys at the top level or under a [train] table.
        if isinstance(values.get("train"), dict):
            values = {**{k: v for k, v in values.items() if k != "train"}, **values["train"]}
        apply_overrides(config, values, str(path))
    if overrides:
        apply_overrides(config, overrides, "command line")
    return config.validate()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(config: TrainConfig) -> str:
    """The resolved config; None values are left out (TOML has no null), which
    reads back as the same defaults."""
    lines = ["# resolved leancnn config: `leancnn train --config config.toml` repeats this run"]
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if value is not None:
            lines.append(f"{item.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
