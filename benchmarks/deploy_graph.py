"""The deployed model run eager or as a frozen TorchScript graph, against ONNX Runtime on the
same (dense) model: resnet20 (1x28x28, widths 1 and 0.5) and resnet18 (3x32x32, width 1), dense,
PS4_P4 and PS1_P9 (untrained weights: time does not depend on their values), batch 1 and 64, one
thread, both memory formats (the faster one is reported). All candidates of a row are timed in
alternating rounds in this process (medians). The last columns are the issue's figures: each
model against the faster dense (deployed PyTorch or ONNX Runtime), and against deployed dense.

    .venv/bin/python benchmarks/deploy_graph.py            # writes docs/deploy.md's table
    .venv/bin/python benchmarks/deploy_graph.py --models resnet18:1   # one model, one width
    .venv/bin/python benchmarks/deploy_graph.py --quick    # a toy run: width 0.25, few rounds
"""
from __future__ import annotations

import argparse

import torch

from common import kernel_machine_line, with_batch_norm_statistics, paired_seconds, pin_threads, print_and_publish

import leancnn
from leancnn.deploy import deploy
from leancnn.kernels.graph import plan_for
from leancnn.measure.onnx_latency import onnx_available, onnx_session

METHODS = ["dense", "PS4_P4", "PS1_P9"]
INPUTS = {"resnet20": (1, 28, 28), "resnet18": (3, 32, 32)}   # the input each model is timed at
DEFAULT_MODELS = ["resnet20:1", "resnet20:0.5", "resnet18:1"]


def parse_model(text: str) -> tuple[str, float]:
    name, _, width = text.partition(":")
    if name not in INPUTS:
        raise SystemExit(f"--models: unknown model {name!r}; one of {', '.join(INPUTS)} (as NAME:WIDTH)")
    try:
        return name, float(width or 1)
    except ValueError:
        raise SystemExit(f"--models: width in {text!r} is not a number (as NAME:WIDTH, e.g. resnet20:0.5)") from None


def build(name: str, method: str, width: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = leancnn.create_model(name, num_classes=10, in_channels=INPUTS[name][0], width=width)
    if method != "dense":
        model = leancnn.apply_method(model, method)
    return with_batch_norm_statistics(model.eval())


def row(name: str, method: str, width: float, batch: int, runs: int, ort) -> dict:
    model = build(name, method, width)
    shape = INPUTS[name]
    best: dict[str, float] = {}
    choices: dict[str, str] = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.rand(batch, *shape).contiguous(memory_format=fmt)
        eager = deploy(model, graph="eager", example_inputs=[x])
        graph = deploy(model, graph="torchscript", example_inputs=[x])
        auto = deploy(model, graph="auto", example_inputs=[x])
        fns = [lambda: eager(x), lambda: graph(x), lambda: auto(x)]
        names = ["eager", "torchscript", "auto"]
        if ort is not None:
            feed = {"images": x.contiguous().numpy()}
            fns.append(lambda: ort.run(None, feed))
            names.append("onnxruntime")
        seconds = paired_seconds(fns, runs)
        for candidate, value in zip(names, seconds):
            best[candidate] = min(best.get(candidate, float("inf")), value * 1e3)
        choices[str(fmt).split(".")[-1]] = plan_for(auto, x)["choice"]
    return {"model": name, "method": method, "width": width, "batch": batch, "ms": best, "auto_choice": choices}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | eager ms | TorchScript ms | deployed (auto) ms | auto chose | ONNX Runtime dense ms | "
             "auto vs eager | vs faster dense (vs deployed dense) |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    dense = {(r["model"], r["width"], r["batch"]): r["ms"] for r in rows if r["method"] == "dense"}
    for r in rows:
        ms, reference = r["ms"], dense.get((r["model"], r["width"], r["batch"]), {})
        ort, deployed_dense = reference.get("onnxruntime"), reference.get("auto")
        chose = ", ".join(f"{k}: {v}" for k, v in r["auto_choice"].items())
        ort_ms = "-" if ort is None else f"{ort:.2f}"
        baseline = min(v for v in (ort, deployed_dense) if v is not None) if deployed_dense is not None else None
        versus = "-" if baseline is None else f"{baseline / ms['auto']:.2f}x ({deployed_dense / ms['auto']:.2f}x)"
        lines.append(f"| {r['model']} w{r['width']:g} {r['method']} | {r['batch']} | {ms['eager']:.2f} | "
                     f"{ms['torchscript']:.2f} | {ms['auto']:.2f} | {chose} | {ort_ms} | "
                     f"{ms['eager'] / ms['auto']:.2f}x | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help=f"NAME:WIDTH, NAME one of {', '.join(INPUTS)} (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--runs", type=int, default=200, help="alternating rounds at batch 1 (batch 64: a tenth)")
    parser.add_argument("--quick", action="store_true", help="width 0.25, 20 rounds, nothing written")
    args = parser.parse_args()
    pin_threads(1)
    models, runs = ([("resnet20", 0.25)], 20) if args.quick else ([parse_model(m) for m in args.models], args.runs)
    header = kernel_machine_line(1)
    print(header, flush=True)
    rows = []
    for name, width in models:
        for batch in (1, 64):
            ort = (onnx_session(deploy(build(name, "dense", width), kernels=False), INPUTS[name])
                   if onnx_available() else None)
            for method in METHODS:
                rows.append(row(name, method, width, batch, runs if batch == 1 else max(runs // 10, 5), ort))
                print(rows[-1], flush=True)
    print_and_publish("deploy_graph", header, "1 thread, medians of alternating rounds, the faster memory format per "
                      "column; ONNX Runtime runs the dense model", markdown(rows), rows, args.quick, "docs/deploy.md")


if __name__ == "__main__":
    main()
