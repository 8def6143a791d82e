"""What each rank runs in tests/test_distributed.py, started as
`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT`.
One launch runs every scenario (a launch costs seconds of start-up); each rank writes what the
test compares under OUT/rank<r>/ with safetensors/json calls of its own, not through leancnn."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from leancnn.compress import compress_run
from leancnn.config import TrainConfig
from leancnn.experiment import build_model, prepare_data, train_run
from leancnn.methods.base import METHODS, Method, register_method
from leancnn.train import Trainer
from leancnn.train.distributed import tensors_digest

# Single-process reference runs import these from the test.
EQUAL_IMAGES = 71   # 32 + 32 + 7: the last global batch splits 4/3, which the loss weights must handle


def equal_config(**overrides) -> TrainConfig:
    values = dict(data="synthetic", model="resnet20", width=0.25, epochs=1, batch_size=32, lr=0.05,
                  train_subset=EQUAL_IMAGES, test_subset=64, threads=1, latency=False, sync_batchnorm=True)
    values.update(overrides)
    return TrainConfig(**values).validate()


def fitted_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    dataset = prepare_data(config)
    model, methods, _ = build_model(config, dataset)
    trainer = Trainer(model, dataset, config, methods=methods, progress=False)
    trainer.fit()
    return {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}


class RankLocal(Method):
    """A deliberately wrong method: its state is the rank it runs on."""

    name = "rank_local_test"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.value = torch.zeros(1)

    def after_epoch(self, trainer, epoch):
        self.value = torch.full((1,), float(dist.get_rank()))
        return None

    def state_tensors(self):
        return {"value": self.value}

    def load_state_tensors(self, tensors):
        self.value = tensors["value"].clone()


class Stop(Exception):
    pass


def record_writes(under: Path) -> list[str]:
    """Every file write, directory creation, rename, removal and database open under `under` made
    from now on in this process (Python's audit events), appended to the returned list."""
    seen: list[str] = []
    root = str(under)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and str(path).startswith(root):
                seen.append(f"open {path}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "sqlite3.connect"):
            if any(str(a).startswith(root) for a in args if isinstance(a, (str, os.PathLike))):
                seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return seen


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine = out / f"rank{rank}"
    mine.mkdir(parents=True, exist_ok=True)
    facts: dict = {}

    # 1. Weights after three steps (global batch norm), against one process in the test.
    save_file(fitted_weights(equal_config()), str(mine / "equal.safetensors"))

    # 2. DNR: masks after a rewiring epoch; the log says whether any rank disagreed.
    register_method(RankLocal)
    dnr = equal_config(methods=["dnr:density=0.3"], epochs=2, train_subset=128)
    dataset = prepare_data(dnr)
    model, methods, _ = build_model(dnr, dataset)
    initial = {n: b.clone() for n, b in model.named_buffers() if n.endswith("dnr_mask")}
    trainer = Trainer(model, dataset, dnr, methods=methods, progress=False)
    trainer.fit()
    masks = {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("dnr_mask")}
    save_file({**{f"after.{n}": m for n, m in masks.items()}, **{f"initial.{n}": m for n, m in initial.items()}},
              str(mine / "dnr_masks.safetensors"))
    facts["dnr_log"] = trainer.state.log
    # ADMM: its auxiliary and dual variables (method state tensors) after two epochs.
    admm = equal_config(methods=["admm:density=0.2,update_every=3,prune_at=0.9"], epochs=2, train_subset=128)
    dataset = prepare_data(admm)
    model, methods, _ = build_model(admm, dataset)
    snapshots: list[dict] = []   # after each epoch (the last one ends with the hard projection)
    trainer = Trainer(model, dataset, admm, methods=methods, progress=False, on_epoch=lambda entry: snapshots.append(
        {name: tensors_digest([t]) for name, t in methods[0].state_tensors().items()}))
    trainer.fit()
    facts["admm_log"] = trainer.state.log
    facts["admm_state"] = snapshots
    # dynamic: its search (timed on the machine) runs on rank 0 alone and its choice reaches all.
    dynamic = equal_config(methods=["dynamic:targets=1+0.5,random=1,candidates=4,holdout=32,recalibrate=32"],
                           epochs=1, train_subset=128)
    dataset = prepare_data(dynamic)
    model, methods, _ = build_model(dynamic, dataset)
    trainer = Trainer(model, dataset, dynamic, methods=methods, progress=False)
    trainer.fit()
    facts["dynamic_log"] = trainer.state.log
    facts["dynamic_model"] = tensors_digest(trainer.model.state_dict().values())
    # The rank-local method: seen in the log, and rank 0's value everywhere after the epoch.
    local = equal_config(methods=["rank_local_test"], epochs=1)
    dataset = prepare_data(local)
    model, methods, _ = build_model(local, dataset)
    trainer = Trainer(model, dataset, local, methods=methods, progress=False)
    trainer.fit()
    facts["rank_local_log"] = trainer.state.log
    facts["rank_local_value"] = methods[0].value.item()
    METHODS.unregister("rank_local_test")

    # 3. Only rank 0 writes: a whole run (checkpoints, log, model, result, runs.db) with rank 1's
    # writes recorded.
    runs = out / "runs"
    writes = record_writes(runs) if rank != 0 else []
    outcome = train_run(equal_config(epochs=2, out=str(runs / "whole"), sync_batchnorm=False), progress=False)
    facts["whole_has_result"] = outcome.result is not None

    # 4. Killed after epoch 1's checkpoint (every rank stops there), resumed, against no kill.
    resumable = dict(epochs=3, train_subset=96, methods=["dnr:density=0.3"])
    train_run(equal_config(out=str(runs / "straight"), **resumable), progress=False)

    def stop_after_first(entry: dict) -> None:
        if entry["epoch"] == 1:
            raise Stop()

    try:
        train_run(equal_config(out=str(runs / "killed"), **resumable), progress=False, on_epoch=stop_after_first)
    except Stop:
        facts["stopped"] = True
    train_run(equal_config(out=str(runs / "killed"), **resumable), resume=True, progress=False)

    # 5. `leancnn compress` (CaP's projections) on two ranks: the same model on each, fine-tuned in parallel.
    compressed = compress_run(runs / "whole", ["cap:macs=0.5,steps=3,lr=0.01"], epochs=1, out=runs / "compressed",
                              progress=False, latency=False)
    facts["compressed_digest"] = tensors_digest(compressed.model.state_dict().values())
    facts["compressed_has_result"] = compressed.result is not None
    facts["writes"] = list(writes)
    (mine / "facts.json").write_text(json.dumps(facts, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
