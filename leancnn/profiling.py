"""`leancnn profile` as a library call: a model's per-layer and total counts, and on request its
latency (PyTorch, and ONNX Runtime when installed) and, deployed, what each sparse layer runs."""
from __future__ import annotations

from typing import Any

from torch import nn

from .deploy import deploy, deploy_plan
from .measure import count, latency_table
from .measure.latency import machine
from .measure.onnx_latency import measure_onnx_latency, onnx_available


def profile_model(model: nn.Module, input_shape: tuple[int, ...], *, deployed: bool = False,
                  latency: bool = False) -> dict[str, Any]:
    """Totals and per-layer rows (`layers`); with `deployed`, of the deployed copy (batch norm
    folded, sparse layers on their measured plans), each kernel layer's row saying what it runs
    at batch 1 (`runs`, `runs_ms`, `dense_ms`), and the plans (`deploy_plan`); with `latency`,
    the median latency at batch 1 and 64 (`latency_ms`, and `latency_ms_onnxruntime`)."""
    if deployed:
        model = deploy(model)
    profile = count(model, input_shape)  # its batch-1 pass makes the deployed layers' batch-1 plans
    output: dict[str, Any] = {"input_shape": list(input_shape), **profile.totals(),
                              "layers": [row.as_dict() for row in profile.layers]}
    if latency:
        output["latency_ms"] = latency_table(model, input_shape)
        output["machine"] = machine()
        if onnx_available():  # the deployed figure, when the onnx extra is installed
            output["latency_ms_onnxruntime"] = {
                f"batch{b}_threads{t}": round(measure_onnx_latency(model, input_shape, batch_size=b, threads=t).median_ms, 4)
                for t in sorted({1, machine()["threads_default"]}) for b in (1, 64)}
    if deployed:
        output["deploy_plan"] = deploy_plan(model)
        first_plan = {}  # layer -> its first plan (batch 1, this thread count)
        for row in output["deploy_plan"]:
            first_plan.setdefault(row["layer"], row)
        for layer in output["layers"]:
            plan = first_plan.get(layer["name"])
            if plan is not None and "dense" in plan["times_ms"]:   # a convolution's plan (not a ViP upsample's)
                layer["runs"] = plan["choice"]
                layer["runs_ms"] = plan["times_ms"][plan["choice"]]
                layer["dense_ms"] = plan["times_ms"]["dense"]
    return output
