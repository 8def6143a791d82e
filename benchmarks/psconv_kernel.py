"""The compiled pSConv kernel against PyTorch's dense convolution.

Per layer: resnet18's 3x3 layer shapes at 32x32 input, PS4_P4 weights, the
kernel against the faster of PyTorch's dense convolutions (contiguous or
channels_last) on the same masked weights with bias, batch 64 and 1, 1 and 2
threads. Whole model: resnet18 (3x32x32, width 1) with PS4_P4, PSD1_P16 and
PS1_P9 deployed (batch norm folded, kernel) against dense resnet18 (batch norm
folded), batch 64 and 1, with glibc's allocator as it comes and then keeping
freed memory in the process (leancnn.allocator: no page faults on each pass's
fresh activations). Effective GFLOP/s count the dense work
(2 x MACs of the dense layer) per second; "kept" GFLOP/s the work the kernel
really does, next to the measured FMA peak of the same vector unit.

Timing: threads pinned, warm-up, then kernel and dense calls alternate, median of
--runs each (batch 64) or 5x that (batch 1). Run it on an idle machine.

    .venv/bin/python benchmarks/psconv_kernel.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn import functional as F

from common import fma_peak_gflops, RESNET18_LAYERS as LAYERS, machine_line, paired_seconds, pin_threads, publish

import leancnn
from leancnn.allocator import keep_freed_memory
from leancnn.deploy import deploy, fold_batchnorm
from leancnn.kernels import psconv_extension
from leancnn.kernels.psconv import PSConvInference
from leancnn.layers.psconv import PSConv2d

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["PS4_P4", "PSD1_P16", "PS1_P9"]


def layer_rows(threads: int, runs: int) -> list[dict]:
    pin_threads(threads)
    rows = []
    for c_in, c_out, size, stride in LAYERS:
        torch.manual_seed(0)
        conv = PSConv2d(c_in, c_out, 3, stride, 1, bias=True, k=4, period=4)
        weight, bias = (conv.weight * conv.mask).detach(), conv.bias.detach()
        kernel = PSConvInference(conv)
        out_size = (size - 1) // stride + 1
        kept = int(conv.mask.sum())
        for batch in (64, 1):
            x = torch.randn(batch, c_in, size, size)
            x_last = x.contiguous(memory_format=torch.channels_last)
            n = runs if batch > 1 else 5 * runs
            dense_nchw, dense_last, sparse = paired_seconds(
                [lambda: F.conv2d(x, weight, bias, stride, 1), lambda: F.conv2d(x_last, weight, bias, stride, 1),
                 lambda: kernel.kernel(x_last)], n)
            dense_flops = 2 * batch * c_out * c_in * 9 * out_size * out_size
            kept_flops = 2 * batch * kept * out_size * out_size
            best = min(dense_nchw, dense_last)
            rows.append({"layer": f"{c_in}->{c_out} @{size} s{stride}", "batch": batch, "threads": threads,
                         "dense_contiguous_ms": 1e3 * dense_nchw, "dense_channels_last_ms": 1e3 * dense_last,
                         "kernel_ms": 1e3 * sparse, "speedup": best / sparse,
                         "dense_gflops": dense_flops / best / 1e9, "kernel_effective_gflops": dense_flops / sparse / 1e9,
                         "kernel_kept_gflops": kept_flops / sparse / 1e9})
            print(f"  {rows[-1]['layer']:22s} b{batch:<3d} t{threads}: dense {1e3 * best:8.3f} ms, kernel "
                  f"{1e3 * sparse:8.3f} ms, {best / sparse:.2f}x", flush=True)
    return rows


def model_rows(threads: int, runs: int, allocator: str) -> list[dict]:
    pin_threads(threads)
    shape = (3, 32, 32)
    torch.manual_seed(0)
    dense = fold_batchnorm(leancnn.create_model("resnet18", in_channels=3)).to(memory_format=torch.channels_last)
    dense_macs = leancnn.profile(dense, shape).macs_effective
    rows = []
    for spec in MODELS:
        torch.manual_seed(0)
        model = leancnn.apply_method(leancnn.create_model("resnet18", in_channels=3), spec).eval()
        deployed = deploy(model).to(memory_format=torch.channels_last)
        macs = leancnn.profile(deployed, shape).macs_effective
        for batch in (64, 1):
            x = torch.rand(batch, *shape).contiguous(memory_format=torch.channels_last)
            n = runs if batch > 1 else 5 * runs
            with torch.no_grad():
                assert torch.allclose(deployed(x), model(x), rtol=1e-3, atol=1e-3)
            dense_s, sparse_s = paired_seconds([lambda: dense(x), lambda: deployed(x)], n)
            rows.append({"model": f"resnet18 {spec}", "batch": batch, "threads": threads, "allocator": allocator,
                         "dense_ms": 1e3 * dense_s,
                         "deployed_ms": 1e3 * sparse_s, "speedup": dense_s / sparse_s,
                         "mac_ratio": dense_macs / macs})
            print(f"  resnet18 {spec:9s} b{batch:<3d} t{threads} {allocator}: dense {1e3 * dense_s:8.2f} ms, deployed "
                  f"{1e3 * sparse_s:8.2f} ms, {dense_s / sparse_s:.2f}x (MAC ratio {dense_macs / macs:.2f})",
                  flush=True)
    return rows


def markdown(layers: list[dict], models: list[dict], peaks: dict[int, float]) -> str:
    lines = ["| layer (PS4_P4) | batch | threads | dense best (ms) | kernel (ms) | speed-up | dense GFLOP/s | "
             "kernel effective GFLOP/s | kernel kept GFLOP/s | kept / FMA peak |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in layers:
        peak = peaks[r["threads"]]
        lines.append(f"| {r['layer']} | {r['batch']} | {r['threads']} | "
                     f"{min(r['dense_contiguous_ms'], r['dense_channels_last_ms']):.3f} | {r['kernel_ms']:.3f} | "
                     f"**{r['speedup']:.2f}x** | {r['dense_gflops']:.0f} | {r['kernel_effective_gflops']:.0f} | "
                     f"{r['kernel_kept_gflops']:.0f} | {100 * r['kernel_kept_gflops'] / peak:.0f}% |")
    lines += ["", "| whole model (3x32x32) | batch | threads | malloc | dense, BN folded (ms) | deployed (ms) | "
              "speed-up | MAC ratio | speed-up / MAC ratio |",
              "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in models:
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['allocator']} | {r['dense_ms']:.2f} | "
                     f"{r['deployed_ms']:.2f} | "
                     f"**{r['speedup']:.2f}x** | {r['mac_ratio']:.2f}x | {r['speedup'] / r['mac_ratio']:.2f} |")
    return "\n".join(lines)


def contention_note(start: dict[int, float], end: dict[int, float]) -> str:
    """A warning when two threads did not get about twice one thread's FMA throughput, at the
    start or the end of the run: the host was using this VM's CPUs (seen here: 174 GFLOP/s on 2
    threads against 158 on 1), and every 2-thread figure of the run shifts with it."""
    if 1 not in start or 2 not in start:
        return ""
    scaling = [peaks[2] / peaks[1] for peaks in (start, end)]
    if min(scaling) >= 1.7:
        return ""
    return (f" **Warning: 2 threads reached only {scaling[0]:.2f}x one thread's FMA throughput at the start of "
            f"this run and {scaling[1]:.2f}x at its end (about 2x on an idle machine): the host was contending "
            f"for the CPUs; the 2-thread figures are unreliable.**")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="timed runs at batch 64 (5x at batch 1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    extension = psconv_extension()
    if extension is None:
        raise SystemExit("the pSConv kernel could not be built here: nothing to measure")
    peaks = {}
    for threads in args.threads:
        pin_threads(threads)
        peaks[threads] = fma_peak_gflops(extension.isa(), threads)
    print(machine_line())
    print(f"kernel instruction set: {extension.isa()}; FMA peak " +
          ", ".join(f"{peaks[t]:.0f} GFLOP/s on {t} thread(s)" for t in args.threads))
    layers, models = [], []
    for threads in args.threads:
        layers += layer_rows(threads, args.runs)
    if not args.skip_models:
        # glibc's default first; then freed blocks kept in the process (leancnn.allocator), which
        # cannot be undone within the process, so it comes second: both models are timed under each.
        for threads in args.threads:
            models += model_rows(threads, args.runs, "default")
        if keep_freed_memory():
            for threads in args.threads:
                models += model_rows(threads, args.runs, "keep freed")
    peaks_after = {}
    for threads in args.threads:
        pin_threads(threads)
        peaks_after[threads] = fma_peak_gflops(extension.isa(), threads)
    pin_threads(max(args.threads))
    header = (f"{machine_line()}; kernel instruction set {extension.isa()}; measured FMA peak "
              + ", ".join(f"{peaks[t]:.0f} GFLOP/s on {t} thread(s)" for t in args.threads)
              + " (at the end: " + ", ".join(f"{peaks_after[t]:.0f}" for t in args.threads) + ")"
              + f". Median of {args.runs} runs at batch 64, {5 * args.runs} at batch 1, kernel and dense calls alternating, after 0.3 s of warm-up."
              + contention_note(peaks, peaks_after))
    block = f"{header}\n\n{markdown(layers, models, peaks)}"
    print(block)
    publish("psconv_kernel", block, document="docs/kernels.md", data={"peaks": peaks, "peaks_after": peaks_after, "layers": layers,
                                     "models": models})


if __name__ == "__main__":
    main()
