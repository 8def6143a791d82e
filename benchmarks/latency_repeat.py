"""Latency repeatability and the per-layer profile docs/results.md quotes.

Measures the same model twice in one run (interleaved), for batch 1 and 64 on
1 and all threads, in both memory formats, and checks the two medians agree
within 10%; otherwise it says the machine was too noisy. With --method it also
measures the converted model and prints the realized speed-up next to the
dense/effective MAC ratio.

    .venv/bin/python benchmarks/latency_repeat.py --model resnet18 --input 3x32x32 --method PS4_P4
"""
from __future__ import annotations

import argparse

import torch

from common import machine_line, pin_threads

from leancnn.measure import count, measure_latency
from leancnn.measure.counting import parse_input_shape
from leancnn.methods import apply_methods
from leancnn.models import create_model

TOLERANCE = 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--input", default="3x32x32")
    parser.add_argument("--method", action="append", default=[])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    all_threads = torch.get_num_threads()
    pin_threads(all_threads)
    shape = parse_input_shape(args.input)
    torch.manual_seed(0)
    dense = create_model(args.model, in_channels=shape[0]).eval()
    print(machine_line())
    print(f"{args.model} at {args.input}, {args.runs} timed runs after 5 warm-up, medians in ms")
    noisy = False
    best: dict[tuple[int, int], float] = {}
    for threads in sorted({1, all_threads}):
        for batch in (1, 64):
            for channels_last in (True, False):
                first, second = (measure_latency(dense, shape, batch_size=batch, threads=threads,
                                                 channels_last=channels_last, runs=args.runs) for _ in range(2))
                spread = abs(first.median_ms - second.median_ms) / min(first.median_ms, second.median_ms)
                verdict = "ok" if spread <= TOLERANCE else "TOO NOISY"
                noisy |= spread > TOLERANCE
                fmt = "channels_last" if channels_last else "contiguous"
                print(f"batch {batch:3d}, {threads} thread(s), {fmt:13s}: {first.median_ms:9.3f} then "
                      f"{second.median_ms:9.3f} (p90 {first.p90_ms:.3f}), spread {100 * spread:.1f}% {verdict}")
                key = (batch, threads)
                best[key] = min(best.get(key, float("inf")), first.median_ms, second.median_ms)
    print("repeatability:", "the machine was too noisy for 10% agreement" if noisy else "all pairs within 10%")
    if args.method:
        converted, _ = apply_methods(create_model(args.model, in_channels=shape[0]), args.method)
        converted.eval()
        dense_profile, method_profile = count(dense, shape), count(converted, shape)
        mac_ratio = dense_profile.macs_dense / method_profile.macs_effective
        print(f"\n{' + '.join(args.method)}: effective MACs {method_profile.macs_effective:,} vs dense "
              f"{dense_profile.macs_dense:,} ({mac_ratio:.2f}x fewer)")
        for (batch, threads), dense_ms in sorted(best.items()):
            method_ms = min(measure_latency(converted, shape, batch_size=batch, threads=threads, channels_last=cl,
                                            runs=args.runs).median_ms for cl in (True, False))
            print(f"batch {batch:3d}, {threads} thread(s): dense {dense_ms:.3f} ms, {args.method[0]} {method_ms:.3f} ms, "
                  f"realized speed-up {dense_ms / method_ms:.2f}x (MAC ratio {mac_ratio:.2f}x)")


if __name__ == "__main__":
    main()
