"""`leancnn profile`: per-layer counts of a run or of a registered model."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LeancnnError
from ..measure.counting import TOTAL_KEYS, parse_input_shape
from ..methods import apply_methods
from ..models import create_model
from ..report.table import print_profile
from ..profiling import profile_model
from ..runs import load_run
from .base import Command, print_json, register_command


@register_command
class Profile(Command):
    name = "profile"
    help = "params, MACs, storage and latency, per layer"
    description = ("Per-layer table and totals of parameters, MACs (dense and effective) and storage; of a run, "
                   "or of a registered model with --model.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", nargs="?", help="run directory")
        parser.add_argument("--model", help="registered model name, instead of a run")
        parser.add_argument("--input", default=None, help="input shape CxHxW (default: the run's, or 3x32x32)")
        parser.add_argument("--classes", type=int, default=10, help="classes for --model (default 10)")
        parser.add_argument("--width", type=float, default=1.0, help="width multiplier for --model")
        parser.add_argument("--method", dest="methods", action="append", default=[], help="method spec, repeatable")
        parser.add_argument("--deploy", action="store_true",
                            help="profile and time the deployed model (batch norm folded, sparse layers on their "
                                 "measured plans); adds what each layer runs")
        parser.add_argument("--latency", action="store_true", help="also measure CPU latency (batch 1 and 64)")
        parser.add_argument("--json", action="store_true", help="print figures as JSON")

    def run(self, args: argparse.Namespace) -> int:
        if bool(args.run) == bool(args.model):
            raise LeancnnError("give either a run directory or --model NAME, not both and not neither")
        if args.run:
            model, architecture = load_run(Path(args.run))
            input_shape = parse_input_shape(args.input) if args.input else tuple(architecture["input_shape"])
            model, _ = apply_methods(model, args.methods)
            title = f"{args.run} ({architecture['model']})"
        else:
            input_shape = parse_input_shape(args.input or "3x32x32")
            model = create_model(args.model, num_classes=args.classes, in_channels=input_shape[0], width=args.width)
            model, _ = apply_methods(model, args.methods)
            title = f"{args.model} at {'x'.join(map(str, input_shape))}" + (f" with {', '.join(args.methods)}" if args.methods else "")
        if args.deploy:
            title += ", deployed"
        output = {"methods": args.methods, **profile_model(model, input_shape, deployed=args.deploy, latency=args.latency)}
        totals = {key: output[key] for key in TOTAL_KEYS}
        if args.json:
            print_json(output)
        else:
            print_profile(title, output["layers"], totals)
            for key, value in output.get("latency_ms", {}).items():
                print(f"latency {key}: {value:.3f} ms (median, PyTorch)")
            for key, value in output.get("latency_ms_onnxruntime", {}).items():
                print(f"latency {key}: {value:.3f} ms (median, ONNX Runtime)")
        return 0
