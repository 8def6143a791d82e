"""`leancnn export RUN --format pt2|onnx --out FILE`: a shippable file and its model card."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..export import FORMATS, export_run
from .base import Command, print_json, register_command


@register_command
class Export(Command):
    name = "export"
    help = "write a run's deployed model to a file you can ship (pt2 or onnx)"
    description = ("pt2: an AOTInductor package of the deployed model (sparse layers on the kernel their plans "
                   "chose on this machine, compiled ahead of time: 20-60 s), loadable with torch alone plus the "
                   "kernel library written beside it. "
                   "onnx: standard operators, checked against ONNX Runtime. Both get FILE.card.json (accuracy, "
                   "MACs, storage, methods, the machine planned on, how to load it).")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", help="run directory")
        parser.add_argument("--format", dest="fmt", required=True, metavar="|".join(FORMATS),
                            help="pt2 (AOTInductor package) or onnx")
        parser.add_argument("--out", required=True, help="file to write (its folder must exist)")
        parser.add_argument("--batch", type=int, default=1,
                            help="batch size the deploy plans are measured for (the file accepts any batch)")
        parser.add_argument("--json", action="store_true", help="print the model card as JSON")

    def run(self, args: argparse.Namespace) -> int:
        card = export_run(Path(args.run), args.fmt, Path(args.out), batch=args.batch,
                          log=(lambda line: None) if args.json else print)
        if args.json:
            print_json(card)
            return 0
        extra = f" and {card['kernel_library']}" if card["kernel_library"] else ""
        print(f"wrote {args.out}{extra} ({card['format']}; {100 * card['test_acc']:.2f}% test accuracy, "
              f"read back within {card['max_abs_difference']:.1e} of the run's logits); card: {args.out}.card.json")
        print(f"load: {card['load']}")
        return 0
