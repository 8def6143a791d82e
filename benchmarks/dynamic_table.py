"""Run-time dynamic sub-networks on Fashion-MNIST: one resnet20 trained with `dynamic` (the
sandwich rule, in-place distillation), its sub-networks at ~100%, 70%, 50% and 35% of the MACs
as the search chose them, each against the same architecture trained alone from scratch for the
same number of epochs on as many images as the dynamic network trained on (its subset less the
search's hold-out; `--alone-subset N` sets another count), built with `l1prune:widths=...`,
leancnn's rebuild of a thinner architecture from recorded widths; the full one is the plain
dense model.

Test accuracy on the full 10k test set; a sub-network is the dynamic model switched to it
(`select_subnet`: its widths and its own batch-norm statistics). Finished runs are skipped.

    nohup .venv/bin/python benchmarks/dynamic_table.py --threads 1 > dynamic.log 2>&1 &
    .venv/bin/python benchmarks/dynamic_table.py --quick      # a toy run: nothing published
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import log, machine_line, pin_threads, publish, write_json

from leancnn.config import TrainConfig
from leancnn.data import load_dataset
from leancnn.experiment import ensure_run
from leancnn.measure import count
from leancnn.measure.robustness import clean_accuracy
from leancnn.methods import parse_method
from leancnn.methods.dynamic import producers, select_subnet, subnet_count, subnet_widths
from leancnn.runs import load_run, read_result

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--spec", default="dynamic:targets=1+0.7+0.5+0.35")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "dynamic"))
    parser.add_argument("--alone-subset", type=int, default=0,
                        help="training images of the models trained alone (default 0: as many as the dynamic network "
                             "trained on, the subset less the search's hold-out)")
    parser.add_argument("--quick", action="store_true", help="a toy run (1 epoch, 1000 images): nothing published")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_subset, args.out = 1, 1000, str(Path(args.out) / "quick")
        args.spec += ",candidates=6,holdout=200,recalibrate=200"
    pin_threads(args.threads)

    # The dynamic network trains on its subset less the search's hold-out: the models alone get as many images.
    dynamic_images = args.train_subset - parse_method(args.spec).holdout_images(args.train_subset)
    alone_images = args.alone_subset or dynamic_images

    def train(name: str, methods: list[str], images: int) -> Path:
        out = Path(args.out) / name
        config = TrainConfig(data="fashion-mnist", model=args.model, width=args.width, epochs=args.epochs,
                             train_subset=images, seed=args.seed, threads=args.threads, lr=args.lr,
                             batch_size=128, methods=methods, latency=False, out=str(out)).validate()
        log(f"{name}: {', '.join(methods) or 'dense'} ...")
        result = ensure_run(config, progress=False)
        log(f"    {result.test_acc:.4f}, {result.train_seconds:.0f} s of training")
        return out

    dynamic_dir = train(f"{args.model}-w{args.width}-dynamic", [args.spec], args.train_subset)
    model, architecture = load_run(dynamic_dir)
    shape = tuple(architecture["input_shape"])
    dataset = load_dataset("fashion-mnist")
    chosen = json.loads((dynamic_dir / "log.jsonl").read_text().splitlines()[-1])["dynamic_subnets"]
    # The channel groups are named after their producer convolution (leancnn.methods.channels).
    width_producers = producers(model)
    names = [name for name, m in model.named_modules() if any(m is p for p in width_producers)]
    full_macs = count(select_subnet(model, None), shape).macs_effective
    rows = []
    for index in range(subnet_count(model)):
        widths = subnet_widths(model, index)
        select_subnet(model, index)
        dynamic_acc = clean_accuracy(model, dataset.test_images, dataset.test_labels)
        macs = count(model, shape).macs_effective
        full = widths == [conv.out_channels for conv in width_producers]
        spec = "+".join(f"{n}:{w}" for n, w in zip(names, widths))
        images = "" if alone_images == args.train_subset else f"-n{alone_images}"
        alone_dir = train(f"{args.model}-w{args.width}-dense{images}" if full else  # by its widths: reused only for them
                          f"{args.model}-w{args.width}-alone-{'-'.join(map(str, widths))}{images}",
                          [] if full else [f"l1prune:widths={spec}"], alone_images)
        alone = read_result(alone_dir)
        rows.append({"target": chosen[index]["target"], "widths": widths, "mac_fraction": macs / full_macs,
                     "macs": macs, "dynamic_test_acc": dynamic_acc, "holdout_acc": chosen[index]["holdout_acc"],
                     "latency_ms_b64": chosen[index]["latency_ms"], "alone_test_acc": alone.test_acc,
                     "alone_macs": alone.macs_effective, "alone_run": str(alone_dir),
                     "alone_train_seconds": alone.train_seconds})
    dynamic_seconds = read_result(dynamic_dir).train_seconds
    lines = [f"| sub-network (target) | widths per channel group | MACs | dynamic, switched to it | trained alone | "
             f"difference | held-out acc (search) | latency b64 in the search (ms) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        assert r["alone_macs"] == r["macs"], "the alone model has another architecture"
        lines.append(f"| {100 * r['target']:.0f}% | {' '.join(map(str, r['widths']))} | "
                     f"{r['macs'] / 1e6:.2f} M ({100 * r['mac_fraction']:.0f}%) | {100 * r['dynamic_test_acc']:.2f}% | "
                     f"{100 * r['alone_test_acc']:.2f}% | {100 * (r['dynamic_test_acc'] - r['alone_test_acc']):+.2f} | "
                     f"{100 * r['holdout_acc']:.2f}% | {r['latency_ms_b64']:.1f} |")
    alone_seconds = sum(r["alone_train_seconds"] for r in rows)
    summary = (f"{machine_line()}\n\n{args.model} (width {args.width}) on a {args.train_subset}-image subset of "
               f"Fashion-MNIST, {args.epochs} epochs, batch 128, SGD+Nesterov, one-cycle lr {args.lr}, seed {args.seed} "
               f"for every model. `{args.spec}`: the dynamic network trained once ({dynamic_seconds:.0f} s at "
               f"{args.threads} thread(s); the models alone took {alone_seconds:.0f} s together), holding out "
               f"{args.train_subset - dynamic_images} of its images for the search; each model alone trained on "
               f"{alone_images} images. Widths: the inner channels of each basic block, the only channels "
               f"leancnn's channel groups narrow in a ResNet (block outputs stay full: the additions need them).")
    block = f"{summary}\n\n" + "\n".join(lines)
    print(block)
    # benchmarks/dynamic_serve.py serves these runs
    write_json(Path(args.out) / "table.json", {"dynamic_run": str(dynamic_dir), "rows": rows})
    if not args.quick:
        publish("dynamic_table", block, rows, "docs/methods/dynamic.md")


if __name__ == "__main__":
    main()
