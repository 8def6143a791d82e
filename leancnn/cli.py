"""The one entry point: `leancnn <command>`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Literal, Sequence, get_args, get_origin

from . import __version__
from .errors import LeancnnError

HELP_KEYS = {
    "data": "dataset name (see `leancnn datasets`)", "data_dir": "folder holding the dataset files",
    "model": "model name (see `leancnn models`)", "width": "channel width multiplier",
    "epochs": "training epochs", "batch_size": "images per step", "lr": "peak learning rate",
    "schedule": "learning-rate schedule", "seed": "random seed (data order, init, augmentation)",
    "train_subset": "train on this many images (seeded subset)", "test_subset": "evaluate on this many images",
    "threads": "CPU threads (0 = all)", "out": "run directory", "device": "auto, cpu or cuda",
    "latency": "measure CPU latency (batch 1 and 64) into result.json",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"leancnn: error: {message} (see `{self.prog} --help`)\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .config import TrainConfig, config_fields

    defaults = TrainConfig()
    for name, hint in config_fields().items():
        if name == "methods":
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        text = f"{HELP_KEYS.get(name, name.replace('_', ' '))} (default: {default})"
        base = hint
        if get_origin(hint) not in (list, Literal):  # Optional[X] -> X
            base = next((a for a in get_args(hint) if a is not type(None)), hint)
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif get_origin(base) is list:
            parser.add_argument(flag, dest=name, type=int, nargs="+", default=argparse.SUPPRESS, help=text)
        elif get_origin(base) is Literal:
            parser.add_argument(flag, dest=name, choices=get_args(base), default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, dest=name, type=base if base in (int, float) else str,
                                default=argparse.SUPPRESS, help=text)
    parser.add_argument("--method", dest="methods", action="append", default=argparse.SUPPRESS,
                        help="method spec, repeatable, applied in order: name:key=value,... (see `leancnn methods`)")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _config_from_args(args: argparse.Namespace):
    from .config import config_fields, load_config

    overrides = {k: v for k, v in vars(args).items() if k in config_fields()}
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .experiment import train_run
    from .report.table import print_result

    config = _config_from_args(args)

    def report_epoch(entry: dict[str, Any]) -> None:
        if not args.json:
            print(f"epoch {entry['epoch']}/{config.epochs}: train loss {entry['train_loss']:.4f}, "
                  f"test acc {100 * entry['test_acc']:.2f}%, {entry['images_per_second']:.0f} img/s, "
                  f"{entry['seconds']:.1f} s", flush=True)

    outcome = train_run(config, resume=args.resume, progress=not args.no_progress, on_epoch=report_epoch)
    if args.json:
        _print_json({"run_dir": str(outcome.run_dir), **outcome.result})
    else:
        print_result(outcome.run_dir, outcome.result)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .report.table import print_runs
    from .runs import list_runs

    runs = list_runs(Path(args.root), dataset=args.data, model=args.model)
    if args.json:
        _print_json(runs)
    else:
        print_runs(runs, Path(args.root))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS

    print("\n".join(MODELS.names()))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data import DATASETS

    for name in DATASETS.names():
        doc = (DATASETS.get(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:15s} {doc}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    names = METHODS.names()
    if not names:
        print("no methods registered yet")
    for name in names:
        cls = METHODS.get(name)
        fields = ", ".join(f.name for f in dataclasses.fields(cls.Options))
        aliases = f"  aliases: {', '.join(cls.aliases)}" if cls.aliases else ""
        print(f"{name:10s} options: {fields or '-'}{aliases}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .commands.profile import run_profile

    return run_profile(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .commands.evaluate import run_eval

    return run_eval(args)


def cmd_compress(args: argparse.Namespace) -> int:
    from .compress import compress_run
    from .report.table import print_result

    out = Path(args.out) if args.out else None
    result = compress_run(Path(args.run), args.methods, epochs=args.epochs, out=out, lr=args.lr,
                          progress=not args.no_progress, latency=not args.no_latency)
    if result is None:
        return 0
    if args.json:
        _print_json({"run_dir": str(out), **result})
    else:
        notes = result["compress"]
        print(f"test accuracy: {100 * notes['test_acc_original']:.2f}% original, "
              f"{100 * notes['test_acc_before_finetune']:.2f}% compressed, {100 * result['test_acc']:.2f}% "
              f"after {args.epochs} fine-tuning epoch(s)")
        print_result(out, result)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .commands.bench import run_bench_command

    return run_bench_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from .commands.bench import run_report_command

    return run_report_command(args)


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from .commands.zoo import run_zoo_build

    return run_zoo_build(args)


def cmd_zoo_show(args: argparse.Namespace) -> int:
    from .commands.zoo import run_zoo_show

    return run_zoo_show(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from .commands.zoo import run_serve

    return run_serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="leancnn", description="Make CNNs cheaper to run, and measure it honestly.")
    parser.add_argument("--version", action="version", version=f"leancnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    train = sub.add_parser("train", help="train a model (optionally with methods) into a run directory",
                           description="Train a model into a run directory (config.toml, model.safetensors, "
                                       "model.json, result.json, log.jsonl). Flags override --config.")
    train.add_argument("--config", help="TOML file of config keys (flags override it)")
    _add_config_flags(train)
    train.add_argument("--resume", action="store_true", help="continue the unfinished run in --out from its last epoch")
    train.add_argument("--json", action="store_true", help="print result.json's figures as JSON")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="list recorded runs", description="List the runs recorded in ROOT/runs.db.")
    runs.add_argument("--root", default="runs", help="output root holding runs.db (default: runs)")
    runs.add_argument("--data", help="only runs on this dataset")
    runs.add_argument("--model", help="only runs of this model")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    for name, func, text in (("models", cmd_models, "list registered models"),
                             ("datasets", cmd_datasets, "list registered datasets"),
                             ("methods", cmd_methods, "list registered methods and their options")):
        sub.add_parser(name, help=text, description=text).set_defaults(func=func)

    profile = sub.add_parser("profile", help="params, MACs, storage and latency, per layer",
                             description="Per-layer table and totals of parameters, MACs (dense and effective) "
                                         "and storage; of a run, or of a registered model with --model.")
    profile.add_argument("run", nargs="?", help="run directory")
    profile.add_argument("--model", help="registered model name, instead of a run")
    profile.add_argument("--input", default=None, help="input shape CxHxW (default: the run's, or 3x32x32)")
    profile.add_argument("--classes", type=int, default=10, help="classes for --model (default 10)")
    profile.add_argument("--width", type=float, default=1.0, help="width multiplier for --model")
    profile.add_argument("--method", dest="methods", action="append", default=[], help="method spec, repeatable")
    profile.add_argument("--deploy", action="store_true",
                         help="profile and time the deployed model (batch norm folded, pSConv on the compiled kernel)")
    profile.add_argument("--latency", action="store_true", help="also measure CPU latency (batch 1 and 64)")
    profile.add_argument("--json", action="store_true", help="print figures as JSON")
    profile.set_defaults(func=cmd_profile)

    evaluate = sub.add_parser("eval", help="accuracy, and with --attack robust accuracy",
                              description="Evaluate a run on its dataset's test split; --attack adds accuracy "
                                          "under attack and records it in result.json's `robust`.")
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--attack", action="append", default=[],
                          help="attack spec, repeatable: fgsm:eps=0.1 or pgd:eps=0.1,steps=20,step=0.025,random_start=false,norm=linf")
    evaluate.add_argument("--test-subset", type=int, default=None, help="evaluate on this many test images")
    evaluate.add_argument("--data-dir", default=None, help="dataset folder, if not the run's")
    evaluate.add_argument("--batch-size", type=int, default=250)
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    compress = sub.add_parser("compress", help="apply post-training methods to a trained run, fine-tune, new run",
                              description="Apply post-training methods (vip, ...) to a trained run, fine-tune, and "
                                          "write a new run directory. Methods that only analyse (vip:sensitivity) "
                                          "print their table and write nothing.")
    compress.add_argument("run", help="trained run directory")
    compress.add_argument("--method", dest="methods", action="append", default=[], required=True,
                          help="method spec, repeatable, e.g. vip:sensitivity or vip:layers=auto,max_drop=0.01")
    compress.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after the methods (default 1)")
    compress.add_argument("--lr", type=float, default=None, help="fine-tuning peak lr (default: the run's lr / 10)")
    compress.add_argument("--out", default=None, help="new run directory")
    compress.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    compress.add_argument("--json", action="store_true")
    compress.add_argument("--no-progress", action="store_true")
    compress.set_defaults(func=cmd_compress)

    bench = sub.add_parser("bench", help="the main job: compare methods on one dataset (table, Pareto plots, report)",
                           description="Train a dense baseline and every registered method at a few strengths, "
                                       "measure them the same way, and write OUT/results.{md,csv}, OUT/pareto_*.png "
                                       "and OUT/report.html. Finished candidates are skipped on a second run.")
    bench.add_argument("--data", default="fashion-mnist", help="dataset (default fashion-mnist)")
    bench.add_argument("--data-dir", default=None)
    bench.add_argument("--model", default=None, help="model (default resnet20)")
    bench.add_argument("--width", type=float, default=None, help="width multiplier (default 1.0; --quick: 0.5)")
    bench.add_argument("--methods", nargs="+", default=None,
                       help="methods or specs to compare (default: every registered method at its bench strengths)")
    bench.add_argument("--epochs", type=int, default=None, help="epochs per candidate (default 5; --quick: 2)")
    bench.add_argument("--train-subset", type=int, default=None, help="training images (default all; --quick: 8000)")
    bench.add_argument("--test-subset", type=int, default=None, help="test images (default all; --quick: 2000)")
    bench.add_argument("--budget-minutes", type=float, default=None,
                       help="cut epochs, then training images, so the bench fits; says what it cut")
    bench.add_argument("--attack", action="append", default=[], help="also measure accuracy under this attack (repeatable)")
    bench.add_argument("--quick", action="store_true", help="a small real bench for a first look: resnet20 width 0.5, 2 epochs on 8000 images, each method at its first strength (about 3 minutes on 2 cores)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--threads", type=int, default=0, help="CPU threads for training and latency (0 = all)")
    bench.add_argument("--out", default="bench", help="output folder (default bench/)")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("report", help="HTML report, table and plots of chosen runs",
                            description="Build the bench report (table, Pareto plots, report.html) from run directories.")
    report.add_argument("runs", nargs="+", help="run directories")
    report.add_argument("--out", default="report", help="output folder (default report/)")
    report.set_defaults(func=cmd_report)

    zoo = sub.add_parser("zoo", help="a model zoo on the accuracy/time front, for the deadline-aware runtime",
                         description="Build or show a zoo: the runs' models re-timed at batch 1 on this machine, "
                                     "only those on the accuracy/time front, thinned so accuracy rises with time.")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", parser_class=Parser, required=True)
    build = zoo_sub.add_parser("build", help="runs -> zoo directory with manifest.json",
                               description="Runs -> a zoo directory (manifest.json, models/, front.png).")
    build.add_argument("--from", dest="sources", nargs="+", metavar="SOURCE",
                       help="run directories, bench directories, or runs.db files / their directories")
    build.add_argument("--family", metavar="MODELS",
                       help="also train a generated family first: these models (depths, e.g. "
                            "'resnet20,resnet32,resnet56') at each of --widths, into OUT/family/")
    build.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5], help="family widths (default 0.25 0.5)")
    build.add_argument("--data", default="fashion-mnist", help="family dataset (default fashion-mnist)")
    build.add_argument("--epochs", type=int, default=5, help="family training epochs (default 5)")
    build.add_argument("--train-subset", type=int, default=None, help="family training images (default all)")
    build.add_argument("--no-progress", action="store_true", help="no progress bars while training the family")
    build.add_argument("--out", required=True, help="zoo directory to write")
    build.add_argument("--quantile", default="p90", choices=["median", "p90"],
                       help="latency the selector plans with (default p90)")
    build.add_argument("--epsilon", type=float, default=0.002,
                       help="smallest accuracy gain (fraction) a slower model must bring (default 0.002)")
    build.add_argument("--runs", type=int, default=50, help="timed batch-1 runs per model (default 50)")
    build.add_argument("--threads", type=int, default=1, help="threads to time (and serve) with (default 1)")
    build.set_defaults(func=cmd_zoo_build)
    show_zoo = zoo_sub.add_parser("show", help="print a zoo's table and plot its front")
    show_zoo.add_argument("zoo", help="zoo directory")
    show_zoo.set_defaults(func=cmd_zoo_show)

    serve = sub.add_parser("serve", help="serve a zoo over HTTP, picking per request the best model for its deadline",
                           description="POST /predict (PNG, JPEG, .npy or raw uint8 body, or JSON with base64 "
                                       "'image' and 'deadline_ms'; deadline in X-Deadline-Ms or ?deadline_ms=), "
                                       "GET /health, GET /metrics.")
    serve.add_argument("zoo", help="zoo directory (leancnn zoo build)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--when-nothing-fits", default="fastest", choices=["fastest", "refuse"],
                       help="answer with the fastest model and mark the deadline missed, or refuse (default fastest)")
    serve.add_argument("--static", choices=["fastest", "most-accurate"], default=None,
                       help="always use one model (the baselines the adaptive policy is compared with)")
    serve.add_argument("--max-pending", type=int, default=32, help="requests allowed to wait; more get 503")
    serve.add_argument("--max-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    serve.add_argument("--threads", type=int, default=1, help="torch threads for inference (default 1)")
    serve.add_argument("--quantile", type=float, default=0.99,
                       help="quantile of each model's measured times the plan uses: about the share of deadlines "
                            "it aims to meet (default 0.99)")
    serve.add_argument("--blocking-risk", type=float, default=0.02,
                       help="longest model run allowed: the one expected to make at most this many later requests "
                            "late, from the recent arrival rate and deadlines (default 0.02; 0 turns it off)")
    serve.add_argument("--inference-cpus", default=None, metavar="LIST",
                       help="CPU ids for the inference process, e.g. '1' or '2,3'; the event loop keeps to the "
                            "others (default: no pinning)")
    serve.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except LeancnnError as exc:
        print(f"leancnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leancnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
