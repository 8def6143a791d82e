"""`leancnn profile`: per-layer counts of a run or of a registered model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LeancnnError
from ..measure import count, latency_table
from ..measure.counting import parse_input_shape
from ..measure.latency import machine


def run_profile(args: argparse.Namespace) -> int:
    from ..methods import apply_methods
    from ..models import create_model
    from ..report.table import print_profile
    from ..runs import load_run

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
    profile = count(model, input_shape)
    totals = profile.totals()
    output = {"input_shape": list(input_shape), "methods": args.methods, **totals,
              "layers": [row.as_dict() for row in profile.layers]}
    if args.latency:
        output["latency_ms"] = latency_table(model, input_shape)
        output["machine"] = machine()
    if args.json:
        print(json.dumps(output, indent=2))
    else:
        print_profile(title, output["layers"], totals)
        for key, value in output.get("latency_ms", {}).items():
            print(f"latency {key}: {value:.3f} ms (median)")
    return 0
