"""Data-parallel training under torchrun (gloo, two processes of one thread on loopback): the same
weights as one process, methods that agree across ranks, only rank 0 writing, exact resume; and
the pieces one process can check (sharded batches, global batch norm's arithmetic, bad settings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leancnn.cli import main
from leancnn.data import BatchLoader
from leancnn.errors import ConfigError
from leancnn.experiment import build_model, prepare_data
from leancnn.methods.base import Method
from leancnn.train import Trainer
from leancnn.train.distributed import Ranks, without_flag

from .conftest import tiny_config
from .distributed_worker import equal_config, fitted_weights

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every scenario of distributed_worker.py, run once on two ranks; the folder it wrote."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = tmp_path_factory.mktemp("ddp")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return out


def facts(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}" / "facts.json").read_text())


def test_two_ranks_reach_the_weights_of_one_process(two_ranks):
    torch.set_num_threads(1)
    expected = fitted_weights(equal_config())
    ranks = [load_file(str(two_ranks / f"rank{r}" / "equal.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
        if value.is_floating_point():
            assert torch.allclose(ranks[0][name], value, atol=2e-5, rtol=1e-4), \
                f"{name}: {(ranks[0][name] - value).abs().max().item():.2e} from one process"
        else:
            assert torch.equal(ranks[0][name], value), name
    # Three steps moved the weights: an untrained model would not match one process by accident.
    untrained, _, _ = build_model(equal_config(), prepare_data(equal_config()))
    assert not torch.allclose(untrained.state_dict()["features.0.0.weight"], expected["features.0.0.weight"])


def test_dnr_masks_are_bit_identical_on_both_ranks_after_rewiring(two_ranks):
    masks = [load_file(str(two_ranks / f"rank{r}" / "dnr_masks.safetensors")) for r in (0, 1)]
    after = [name for name in masks[0] if name.startswith("after.")]
    assert after and masks[0].keys() == masks[1].keys()
    for name in after:
        assert torch.equal(masks[0][name], masks[1][name]), name
    # The epoch did rewire (the masks moved), and no rank disagreed that had to be overwritten.
    assert any(not torch.equal(masks[0][name], masks[0]["initial." + name[len("after."):]]) for name in after)
    for rank in (0, 1):
        assert all("ranks_disagreed" not in entry for entry in facts(two_ranks, rank)["dnr_log"])


def test_admm_variables_agree_across_ranks(two_ranks):
    zero, one = facts(two_ranks, 0), facts(two_ranks, 1)
    assert zero["admm_state"][0] and zero["admm_state"] == one["admm_state"]   # Z, U after epoch 1, and so on
    assert all("ranks_disagreed" not in entry for entry in zero["admm_log"] + one["admm_log"])


def test_the_dynamic_search_runs_on_rank_0_and_every_rank_takes_its_choice(two_ranks):
    zero, one = facts(two_ranks, 0), facts(two_ranks, 1)
    assert zero["dynamic_model"] == one["dynamic_model"]   # the sub-networks' widths and statistics
    assert len(zero["dynamic_log"][-1]["dynamic_subnets"]) == 2 and "dynamic_subnets" not in one["dynamic_log"][-1]
    assert all("ranks_disagreed" not in entry for entry in zero["dynamic_log"] + one["dynamic_log"])


def test_a_rank_local_method_state_is_reported_and_replaced_by_rank_0s(two_ranks):
    for rank in (0, 1):
        seen = facts(two_ranks, rank)
        assert seen["rank_local_log"][-1]["ranks_disagreed"] == ["method 0 (rank_local_test)"]
        assert seen["rank_local_value"] == 0.0


def test_only_rank_0_writes_and_the_run_is_whole(two_ranks):
    run = two_ranks / "runs" / "whole"
    assert {"config.toml", "log.jsonl", "model.json", "model.safetensors", "result.json"} <= \
        {p.name for p in run.iterdir()}
    assert (two_ranks / "runs" / "runs.db").is_file()
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    assert facts(two_ranks, 0)["whole_has_result"] and not facts(two_ranks, 1)["whole_has_result"]
    assert facts(two_ranks, 1)["writes"] == [], "rank 1 wrote under the runs folder"
    assert facts(two_ranks, 0)["writes"] == []   # rank 0 is not watched: the check is rank 1's


def test_resume_after_a_kill_gives_the_uninterrupted_weights(two_ranks):
    assert facts(two_ranks, 0)["stopped"] and facts(two_ranks, 1)["stopped"]
    straight = load_file(str(two_ranks / "runs" / "straight" / "model.safetensors"))
    resumed = load_file(str(two_ranks / "runs" / "killed" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    log = [json.loads(line) for line in (two_ranks / "runs" / "killed" / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2, 3]


def test_compress_fine_tunes_on_two_ranks_into_one_model_that_rank_0_writes(two_ranks):
    zero, one = facts(two_ranks, 0), facts(two_ranks, 1)
    assert zero["compressed_has_result"] and not one["compressed_has_result"]
    assert zero["compressed_digest"] == one["compressed_digest"]
    result = json.loads((two_ranks / "runs" / "compressed" / "result.json").read_text())
    assert result["macs_effective"] < json.loads((two_ranks / "runs" / "whole" / "result.json").read_text())["macs_effective"]
    assert len((two_ranks / "runs" / "compressed" / "log.jsonl").read_text().splitlines()) == 1   # the fine-tuning epoch


def test_shards_of_a_global_batch_are_one_process_batch_split():
    images = torch.randint(0, 256, (23, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(23)
    settings = dict(shuffle=True, crop_padding=2, horizontal_flip=True, seed=3)
    whole = BatchLoader(images, labels, 8, **settings)
    parts = [BatchLoader(images, labels, 8, shard=(rank, 3), **settings) for rank in range(3)]
    for loader in (whole, *parts):
        loader.set_epoch(2)
    assert len(whole) == 3 and all(len(p) == 3 for p in parts)
    assert whole.global_batch_sizes() == [8, 8, 7]
    for (x, y), *shards in zip(whole, *parts):
        assert [len(s[1]) for s in shards] == ([3, 3, 2] if len(y) == 8 else [3, 2, 2])
        assert torch.equal(torch.cat([s[0] for s in shards]), x)   # augmented exactly as one process
        assert torch.equal(torch.cat([s[1] for s in shards]), y)
    # A last global batch smaller than the ranks is skipped, not given to some ranks only.
    assert len(BatchLoader(images, labels, 11, shard=(0, 3))) == 2 and len(BatchLoader(images, labels, 11)) == 3


def test_without_flag_drops_the_flag_and_its_value_only():
    argv = ["train", "--nproc", "2", "--epochs", "3", "--nproc=4", "--nprocs-x", "1"]
    assert without_flag(argv, "--nproc") == ["train", "--epochs", "3", "--nprocs-x", "1"]


@pytest.mark.parametrize("arguments, message", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "2", "--backend", "mpi"], "backend 'mpi' is not available in this torch build"),
    (["--nproc", "2", "--backend", "nccl", "--device", "cpu"], "backend 'nccl'"),
    (["--nproc", "2", "--backend", "smoke"], "invalid choice: 'smoke'"),
])
def test_bad_launcher_settings_fail_with_one_line_and_write_nothing(tmp_path, capsys, arguments, message):
    out = tmp_path / "run"
    try:
        code = main(["train", "--data", "synthetic", "--epochs", "1", "--out", str(out), *arguments])
    except SystemExit as exc:   # argparse's own check of a choice
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_fp16_on_cpu_and_a_method_that_cannot_train_distributed_fail_before_training(tmp_path, register_test_method):
    config = tiny_config(tmp_path, precision="fp16", device="cpu")
    dataset = prepare_data(config)
    model, methods, _ = build_model(config, dataset)
    with pytest.raises(ConfigError, match="precision 'fp16' needs CUDA"):
        Trainer(model, dataset, config, methods=methods, progress=False)

    @register_test_method
    class OneRankOnly(Method):
        name = "one_rank_only_test"

        def check_distributed(self, world: int) -> None:
            raise ConfigError(f"method 'one_rank_only_test' cannot train on {world} ranks")

    config = tiny_config(tmp_path, methods=["one_rank_only_test"])
    model, methods, _ = build_model(config, dataset)
    with pytest.raises(ConfigError, match="cannot train on 2 ranks"):   # no process group is needed to say so
        Trainer(model, dataset, config, methods=methods, progress=False, ranks=Ranks(0, 2))


def test_bf16_autocast_trains_on_cpu_with_fp32_master_weights(tmp_path):
    config = tiny_config(tmp_path, precision="bf16", epochs=1, train_subset=64)
    dataset = prepare_data(config)
    model, methods, _ = build_model(config, dataset)
    before = model.state_dict()["features.0.0.weight"].clone()
    trainer = Trainer(model, dataset, config, methods=methods, progress=False)
    trainer.fit()
    after = trainer.model.state_dict()["features.0.0.weight"]
    assert after.dtype == torch.float32 and not torch.equal(before, after)
    images = torch.rand(2, *dataset.input_shape)
    with trainer.step_context():   # what each training step runs under
        assert trainer.model(images).dtype == torch.bfloat16
    assert trainer.model(images).dtype == torch.float32


def test_bench_refuses_torchrun_and_a_bad_nproc_with_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    assert main(["bench", "--data", "synthetic", "--nproc", "0", "--out", str(out)]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "--data", "synthetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "use `leancnn bench --nproc N`, not torchrun" in err and len(err.splitlines()) == 1
    assert not out.exists()
