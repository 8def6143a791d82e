"""ViP models deployed, against the dense model they came from: resnet20 and vgg16 (width 0.5,
1x28x28, untrained weights: time does not depend on their values), batch 1 and 64, one thread.
Per model: dense deployed, ViP deployed as planned (the fused upsample where it measured faster),
ViP deployed with the upsample forced onto the reference path (F.interpolate and a replicate pad),
and ONNX Runtime on the dense model, timed in alternating rounds in this process (medians), the
faster memory format per column. "Realized" is the speed-up over the faster dense (deployed
PyTorch or ONNX Runtime) divided by the MAC ratio; deployed dense's in brackets.

Blocks: vgg16 takes the three the ViP table's auto selection kept on the dense model
(benchmarks/results/vip_table.md); resnet20 its 28x28 and first 14x14 convolutions (1.5x fewer MACs).

    .venv/bin/python benchmarks/vip_deploy.py            # writes docs/deploy.md's table
    .venv/bin/python benchmarks/vip_deploy.py --quick    # a toy run: width 0.25, few rounds
"""
from __future__ import annotations

import argparse

import torch

from common import kernel_machine_line, with_batch_norm_statistics, paired_seconds, pin_threads, print_and_publish

import leancnn
from leancnn.deploy import deploy
from leancnn.kernels.virtual_pool import VirtualPoolInference
from leancnn.measure.onnx_latency import onnx_available, onnx_session
from leancnn.methods.vip import wrap

SHAPE = (1, 28, 28)
BLOCKS = {
    "vgg16": ["features.4", "features.15", "features.16"],
    "resnet20": ["features.0", "features.1.conv1", "features.1.conv2", "features.2.conv1", "features.2.conv2",
                 "features.3.conv1", "features.3.conv2", "features.5.conv1", "features.5.conv2"],
}


def build(name: str, width: float, vip: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = leancnn.create_model(name, num_classes=10, in_channels=SHAPE[0], width=width)
    if vip:
        model = wrap(model, BLOCKS[name])
    return with_batch_norm_statistics(model.eval())


def reference_upsample(deployed: torch.nn.Module) -> torch.nn.Module:
    """The deployed ViP model with every block's upsample on F.interpolate + pad (the path before the
    fused operator), the rest as planned."""
    for pool in deployed.modules():
        if isinstance(pool, VirtualPoolInference):   # forced, not planned: the plan cache stays as it is
            pool.forward = lambda x, pool=pool: pool.run("interpolate", pool.block(x), *x.shape[-2:])
    return deployed


def row(name: str, width: float, batch: int, runs: int) -> dict:
    dense_model, vip_model = build(name, width, False), build(name, width, True)
    macs = {label: leancnn.profile(m, SHAPE).macs_effective for label, m in (("dense", dense_model), ("vip", vip_model))}
    ort = onnx_session(deploy(dense_model, kernels=False), SHAPE) if onnx_available() else None
    best: dict[str, float] = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.rand(batch, *SHAPE).contiguous(memory_format=fmt)
        candidates = {"dense": deploy(dense_model, example_inputs=[x]),
                      "vip": deploy(vip_model, example_inputs=[x]),
                      "vip, interpolate": reference_upsample(deploy(vip_model, graph="auto"))}
        with torch.no_grad():
            candidates["vip, interpolate"](x)
            assert torch.allclose(candidates["vip"](x), vip_model(x), atol=1e-4, rtol=1e-4)
        fns = [lambda m=m: m(x) for m in candidates.values()]
        names = list(candidates)
        if ort is not None:
            feed = {"images": x.contiguous().numpy()}
            fns.append(lambda: ort.run(None, feed))
            names.append("onnxruntime dense")
        for candidate, seconds in zip(names, paired_seconds(fns, runs)):
            best[candidate] = min(best.get(candidate, float("inf")), seconds * 1e3)
    return {"model": name, "width": width, "batch": batch, "ms": best, "mac_ratio": macs["dense"] / macs["vip"],
            "blocks": BLOCKS[name]}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | MAC ratio | dense deployed ms | ONNX Runtime dense ms | ViP, interpolate ms | "
             "ViP deployed ms | speed-up vs faster dense (vs deployed dense) | realized / MAC ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ms = r["ms"]
        ort = ms.get("onnxruntime dense")
        baseline = min(ms["dense"], ort) if ort is not None else ms["dense"]
        speedup, versus_deployed = baseline / ms["vip"], ms["dense"] / ms["vip"]
        lines.append(f"| {r['model']} w{r['width']:g} | {r['batch']} | {r['mac_ratio']:.2f}x | {ms['dense']:.2f} | "
                     f"{'-' if ort is None else f'{ort:.2f}'} | {ms['vip, interpolate']:.2f} | {ms['vip']:.2f} | "
                     f"**{speedup:.2f}x** ({versus_deployed:.2f}x) | {speedup / r['mac_ratio']:.2f} "
                     f"({versus_deployed / r['mac_ratio']:.2f}) |")
    blocks = "; ".join(f"{r['model']}: {', '.join(r['blocks'])}" for r in rows if r["batch"] == rows[0]["batch"])
    return "\n".join(lines) + f"\n\nViP blocks: {blocks}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    parser.add_argument("--runs", type=int, default=200, help="alternating rounds at batch 1 (batch 64: a tenth)")
    parser.add_argument("--quick", action="store_true", help="width 0.25, 10 rounds, nothing written")
    args = parser.parse_args()
    pin_threads(1)
    width, runs = (0.25, 10) if args.quick else (0.5, args.runs)
    header = kernel_machine_line(1)
    print(header, flush=True)
    rows = []
    for name in args.models:
        for batch in (1, 64):
            rows.append(row(name, width, batch, runs if batch == 1 else max(runs // 10, 5)))
            print(rows[-1], flush=True)
    print_and_publish("vip_deploy", header, "1 thread, medians of alternating rounds, the faster memory format per "
                      "column", markdown(rows), rows, args.quick, "docs/deploy.md")


if __name__ == "__main__":
    main()
