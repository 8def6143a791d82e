"""The sparse kernel on irregular masks against PyTorch's dense convolution.

Per layer: resnet18's 3x3 layer shapes at 32x32 input, random irregular masks at
density 0.05, 0.1 and 0.3, batch 64 and 1, on each thread count; the kernel (the
fastest of its variants, as a deploy plan would pick) against the faster of
oneDNN's dense convolutions (contiguous or channels_last) on the same masked
weights with bias. Break-even: at batch 64, densities 0.2 .. 0.8 are swept and
the density where the speed-up crosses 1.0 is interpolated.

Whole model: resnet18 and vgg11 (3x32x32, width 1) with every layer but the stem
at density 0.05 (DNR's random initial masks), deployed (batch norm folded, every
pruned convolution on its measured plan) against the dense model with batch norm
folded, in the faster memory format; batch 64 and 1.

Timing: threads pinned, warm-up, the compared calls alternate, medians. Run it on
an idle machine. `--quick` runs a toy-size pass (a check that the script works).

    .venv/bin/python benchmarks/sparse_kernel.py
"""
from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from common import fma_peak_gflops, RESNET18_LAYERS, machine_line, paired_seconds, pin_threads, publish

import leancnn
from leancnn.deploy import deploy, deploy_plan, fold_batchnorm
from leancnn.kernels import psconv_extension
from leancnn.kernels.sparse import PASS_CHOICES, SparseConvInference

DENSITIES = [0.05, 0.1, 0.3]
SWEEP = [0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
MODELS = ["resnet18", "vgg11"]


def masked_layer(c_in, c_out, stride, density, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, 3, 3, generator=generator)
    weight = weight * (torch.rand(weight.shape, generator=generator) < density)
    bias = torch.randn(c_out, generator=generator)
    return weight, bias, SparseConvInference(weight, bias, stride)


def time_layer(c_in, c_out, size, stride, density, batch, runs):
    """(dense best ms, kernel best ms, which kernel variant) for one layer."""
    weight, bias, layer = masked_layer(c_in, c_out, stride, density)
    x = torch.randn(batch, c_in, size, size)
    x_last = x.contiguous(memory_format=torch.channels_last)
    variants = list(PASS_CHOICES.items())
    dense_nchw, dense_last, *kernels = paired_seconds(
        [lambda: F.conv2d(x, weight, bias, stride, 1), lambda: F.conv2d(x_last, weight, bias, stride, 1)]
        + [lambda options=options: layer.kernel(x_last, None, *options) for _, options in variants], runs)
    best = min(range(len(kernels)), key=kernels.__getitem__)
    return 1e3 * min(dense_nchw, dense_last), 1e3 * kernels[best], variants[best][0]


def layer_rows(threads: int, runs: int, layers, densities, batches) -> list[dict]:
    pin_threads(threads)
    rows = []
    for c_in, c_out, size, stride in layers:
        out_size = (size - 1) // stride + 1
        for density in densities:
            for batch in batches:
                dense, kernel, variant = time_layer(c_in, c_out, size, stride, density, batch,
                                                    runs if batch > 1 else 5 * runs)
                flops = 2 * batch * c_out * c_in * 9 * out_size * out_size
                rows.append({"layer": f"{c_in}->{c_out} @{size} s{stride}", "density": density, "batch": batch,
                             "threads": threads, "dense_ms": dense, "kernel_ms": kernel, "variant": variant,
                             "speedup": dense / kernel, "kept_gflops": flops * density / (kernel / 1e3) / 1e9})
                print(f"  {rows[-1]['layer']:20s} d={density:<5} b{batch:<3d} t{threads}: dense {dense:8.3f} ms, "
                      f"kernel {kernel:8.3f} ms ({variant}), {dense / kernel:.2f}x", flush=True)
    return rows


def break_even(threads: int, runs: int, layers, batch: int) -> list[dict]:
    """Per layer: the interpolated density where the kernel stops beating dense at `batch`."""
    pin_threads(threads)
    rows = []
    for c_in, c_out, size, stride in layers:
        points = []
        for density in SWEEP:
            dense, kernel, _ = time_layer(c_in, c_out, size, stride, density, batch, runs)
            points.append((density, dense / kernel))
            if dense / kernel < 1.0:
                break
        crossing = None
        for (d0, s0), (d1, s1) in zip(points, points[1:]):
            if s0 >= 1.0 > s1:
                crossing = d0 + (s0 - 1.0) * (d1 - d0) / (s0 - s1)
        if crossing is None:
            crossing = f"< {SWEEP[0]}" if points[0][1] < 1.0 else f"> {points[-1][0]}"
        rows.append({"layer": f"{c_in}->{c_out} @{size} s{stride}", "threads": threads, "batch": batch,
                     "break_even": crossing, "points": points})
        print(f"  {rows[-1]['layer']:20s} t{threads}: break-even density {crossing}", flush=True)
    return rows


def model_rows(threads: int, runs: int, models, batches, density: float, size: int) -> list[dict]:
    pin_threads(threads)
    shape = (3, size, size)
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = leancnn.create_model(name, in_channels=3)
        dense = fold_batchnorm(model)
        pruned = leancnn.apply_method(model, f"dnr:density={density},attack=none").eval()
        deployed = deploy(pruned)
        ratio = leancnn.profile(dense, shape).macs_effective / leancnn.profile(deployed, shape).macs_effective
        for batch in batches:
            x = torch.rand(batch, *shape)
            x_last = x.contiguous(memory_format=torch.channels_last)
            dense_last = fold_batchnorm(model).to(memory_format=torch.channels_last)
            with torch.no_grad():
                deployed(x_last)  # plans for this batch, threads and format (cached for later runs)
                assert torch.allclose(deployed(x_last), pruned(x), rtol=1e-3, atol=1e-3)
            n = runs if batch > 1 else 5 * runs
            nchw, last, sparse = paired_seconds([lambda: dense(x), lambda: dense_last(x_last),
                                                 lambda: deployed(x_last)], n)
            best = min(nchw, last)
            chosen = [row["choice"] for row in deploy_plan(deployed) 
                      if row["key"].endswith(f"batch={batch} threads={threads} channels_last")]
            kernel_layers = sum(choice.startswith("kernel") for choice in chosen)
            rows.append({"model": name, "density": density, "batch": batch, "threads": threads,
                         "dense_ms": 1e3 * best, "deployed_ms": 1e3 * sparse, "speedup": best / sparse,
                         "mac_ratio": ratio, "kernel_layers": kernel_layers, "planned_layers": len(chosen)})
            print(f"  {name:9s} b{batch:<3d} t{threads}: dense {1e3 * best:8.2f} ms, deployed {1e3 * sparse:8.2f} ms, "
                  f"{best / sparse:.2f}x (MAC ratio {ratio:.2f}; kernel in {kernel_layers} of {len(chosen)} layers)",
                  flush=True)
    return rows


def markdown(layers, evens, models, peaks) -> str:
    lines = ["| layer | density | batch | threads | dense best (ms) | kernel (ms) | speed-up | kept GFLOP/s | kept / FMA peak |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in layers:
        lines.append(f"| {r['layer']} | {r['density']} | {r['batch']} | {r['threads']} | {r['dense_ms']:.3f} | "
                     f"{r['kernel_ms']:.3f} | **{r['speedup']:.2f}x** | {r['kept_gflops']:.1f} | "
                     f"{100 * r['kept_gflops'] / peaks[r['threads']]:.0f}% |")
    lines += ["", "| layer | threads | batch | break-even density |", "| --- | ---: | ---: | ---: |"]
    for r in evens:
        value = r["break_even"]
        lines.append(f"| {r['layer']} | {r['threads']} | {r['batch']} | "
                     f"{value if isinstance(value, str) else f'{value:.2f}'} |")
    lines += ["", "| whole model (3x32x32), density 0.05 | batch | threads | dense, BN folded (ms) | deployed (ms) | "
              "speed-up | MAC ratio | layers on the kernel |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in models:
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['dense_ms']:.2f} | {r['deployed_ms']:.2f} | "
                     f"**{r['speedup']:.2f}x** | {r['mac_ratio']:.2f}x | {r['kernel_layers']} of {r['planned_layers']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="timed runs at batch 64 (5x at batch 1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--quick", action="store_true", help="toy sizes: check that the script runs")
    args = parser.parse_args()
    extension = psconv_extension()
    if extension is None:
        raise SystemExit("the sparse kernel could not be built here: nothing to measure")
    layers, batches, size = (RESNET18_LAYERS, (64, 1), 32) if not args.quick else ([(16, 16, 8, 1), (16, 32, 8, 2)], (4, 1), 8)
    runs = args.runs if not args.quick else 2
    peaks = {}
    for threads in args.threads:
        pin_threads(threads)
        peaks[threads] = fma_peak_gflops(extension.isa(), threads)
    print(machine_line())
    print(f"kernel instruction set: {extension.isa()}; FMA peak "
          + ", ".join(f"{peaks[t]:.0f} GFLOP/s on {t} thread(s)" for t in args.threads))
    rows, evens, models = [], [], []
    for threads in args.threads:
        rows += layer_rows(threads, runs, layers, DENSITIES, batches)
    for threads in args.threads:
        evens += break_even(threads, runs, layers, batches[0])
    for threads in args.threads:
        models += model_rows(threads, runs, MODELS if not args.quick else ["resnet20"], batches, 0.05, size)
    pin_threads(max(args.threads))
    header = (f"{machine_line()}; kernel instruction set {extension.isa()}; measured FMA peak "
              + ", ".join(f"{peaks[t]:.0f} GFLOP/s on {t} thread(s)" for t in args.threads)
              + f". Median of {runs} runs at batch 64, {5 * runs} at batch 1, the compared calls alternating, "
                "after 0.3 s of warm-up; random irregular masks; the kernel row is the fastest of its variants (pass size, threads), as a plan picks.")
    block = f"{header}\n\n{markdown(rows, evens, models, peaks)}"
    print(block)
    if not args.quick:
        publish("sparse_kernel", block, {"peaks": peaks, "layers": rows, "break_even": evens, "models": models},
                document="docs/sparse_kernel.md")


if __name__ == "__main__":
    main()
