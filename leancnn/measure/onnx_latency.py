"""Optional ONNX Runtime latency: the figure a user sees after deploying with
ONNX. Needs the `onnx` extra (`pip install leancnn[onnx]`); leancnn works
without it."""
from __future__ import annotations

import io
import statistics
import time
import warnings

import torch
from torch import nn

from ..errors import LeancnnError
from .latency import Latency, quantile


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """ONNX bytes with a dynamic batch dimension (TorchScript exporter: no onnxscript needed)."""
    model = model.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, *input_shape),), buffer, dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def onnx_session(model: nn.Module, input_shape: tuple[int, ...], threads: int = 1):
    """An ONNX Runtime CPU session of `model` (standard operators: a deployed model's sparse
    layers export as the convolutions they equal), `threads` intra-op threads."""
    if not onnx_available():
        raise LeancnnError("ONNX Runtime latency needs the onnx extra: pip install 'leancnn[onnx]'")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(export_onnx(model, input_shape), options, providers=["CPUExecutionProvider"])


def session_latency(session, input_shape: tuple[int, ...], *, batch_size: int = 1, threads: int = 1,
                    warmup: int = 5, runs: int = 20) -> Latency:
    """Time an ONNX Runtime session (onnx_session) on one random batch: median and p90 of `runs`."""
    feed = {"images": torch.rand(batch_size, *input_shape).numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1000.0)
    return Latency(batch_size, threads, "contiguous", statistics.median(times), quantile(times, 0.9), runs,
                   backend="onnxruntime")


def measure_onnx_latency(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 1, threads: int = 1,
                         warmup: int = 5, runs: int = 20) -> Latency:
    return session_latency(onnx_session(model, input_shape, threads), input_shape, batch_size=batch_size,
                           threads=threads, warmup=warmup, runs=runs)
