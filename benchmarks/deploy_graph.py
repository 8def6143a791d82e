"""The deployed model run eager or as a frozen TorchScript graph, against ONNX Runtime on the
same (dense) model: resnet20 dense, PS4_P4 and PS1_P9 (untrained weights: time does not depend
on their values), batch 1 and 64, one thread, both memory formats (the faster one is reported).
All candidates of a row are timed in alternating rounds in this process (medians).

    .venv/bin/python benchmarks/deploy_graph.py            # writes docs/deploy.md's table
    .venv/bin/python benchmarks/deploy_graph.py --quick    # a toy run: width 0.25, few rounds
"""
from __future__ import annotations

import argparse

import torch

from common import fma_peak_gflops, machine_line, paired_seconds, pin_threads, publish

import leancnn
from leancnn.deploy import deploy
from leancnn.kernels import psconv_extension
from leancnn.kernels.graph import graph_plan
from leancnn.measure.onnx_latency import onnx_available, onnx_session

METHODS = ["dense", "PS4_P4", "PS1_P9"]


def build(method: str, width: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = leancnn.create_model("resnet20", num_classes=10, in_channels=1, width=width)
    if method != "dense":
        model = leancnn.apply_method(model, method)
    model.eval()
    with torch.no_grad():   # non-trivial batch-norm statistics, so folding is not the identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def row(method: str, width: float, batch: int, runs: int, ort) -> dict:
    model = build(method, width)
    shape = (1, 28, 28)
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
        for name, value in zip(names, seconds):
            best[name] = min(best.get(name, float("inf")), value * 1e3)
        choices[str(fmt).split(".")[-1]] = graph_plan(auto)[0]["choice"]
    return {"method": method, "width": width, "batch": batch, "ms": best, "auto_choice": choices}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | eager ms | TorchScript ms | deployed (auto) ms | auto chose | ONNX Runtime dense ms | "
             "auto vs eager | auto vs ORT dense |", "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    dense_ort = {(r["width"], r["batch"]): r["ms"].get("onnxruntime") for r in rows if r["method"] == "dense"}
    for r in rows:
        ms, ort = r["ms"], dense_ort.get((r["width"], r["batch"]))
        chose = ", ".join(f"{k}: {v}" for k, v in r["auto_choice"].items())
        ort_ms = "-" if ort is None else f"{ort:.2f}"
        versus_ort = "-" if ort is None else f"{ort / ms['auto']:.2f}x"
        lines.append(f"| resnet20 w{r['width']:g} {r['method']} | {r['batch']} | {ms['eager']:.2f} | "
                     f"{ms['torchscript']:.2f} | {ms['auto']:.2f} | {chose} | {ort_ms} | "
                     f"{ms['eager'] / ms['auto']:.2f}x | {versus_ort} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--runs", type=int, default=200, help="alternating rounds at batch 1 (batch 64: a tenth)")
    parser.add_argument("--quick", action="store_true", help="width 0.25, 20 rounds, nothing written")
    args = parser.parse_args()
    pin_threads(1)
    widths, runs = ([0.25], 20) if args.quick else (args.widths, args.runs)
    extension = psconv_extension()
    isa = extension.isa() if extension is not None else "avx2"
    header = f"{machine_line()}; kernel ISA {isa}, measured FMA peak {fma_peak_gflops(isa, 1):.0f} GFLOP/s (1 thread)"
    print(header, flush=True)
    rows = []
    for width in widths:
        for batch in (1, 64):
            ort = onnx_session(deploy(build("dense", width), kernels=False), (1, 28, 28)) if onnx_available() else None
            for method in METHODS:
                rows.append(row(method, width, batch, runs if batch == 1 else max(runs // 10, 5), ort))
                print(rows[-1], flush=True)
    block = (f"{header}\n\n`.venv/bin/python benchmarks/deploy_graph.py` (1 thread, medians of alternating "
             f"rounds, the faster memory format per column; ONNX Runtime runs the dense model)\n\n{markdown(rows)}")
    print(block)
    if not args.quick:
        publish("deploy_graph", block, rows, "docs/deploy.md")


if __name__ == "__main__":
    main()
