"""The deployed-model check shared by the method contract and the every-model test: the
deployed model against the model it came from, on fresh random inputs, eager on every
implementation a sparse layer can choose and as the frozen TorchScript graph."""
from __future__ import annotations

import copy

import torch

from leancnn.deploy import deploy
from leancnn.kernels.graph import graph_plan
from leancnn.kernels.sparse import SparseConvInference
from leancnn.kernels.virtual_pool import VirtualPoolInference


def assert_deploy_matches(model: torch.nn.Module, shape: tuple[int, ...], graph_on_kernel: bool = True,
                          eager_choices: tuple[str, ...] | None = None) -> None:
    """The deployed model against the model itself: run eager with every sparse layer forced onto
    each implementation it can run (dense, the other memory format, each kernel pass plan), and as
    the frozen TorchScript graph on the layers' plans and (`graph_on_kernel`) with every layer on
    the kernel (each graph is a trace: seconds on a deep model). `eager_choices`: only these
    implementations eager (default: all). ViP blocks run each upsample they can choose, eager, with
    the sparse layers as planned."""
    model.eval()
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = model(x)
    for mode in ("eager", "torchscript"):
        deployed = deploy(model, graph=mode)
        layers = [m for m in deployed.modules() if isinstance(m, SparseConvInference)]
        everything = sorted({c for layer in layers for c in layer.choices()})
        if mode == "eager":
            choices = [c for c in everything if eager_choices is None or c in eager_choices]
        else:
            choices = [c for c in everything if c == "kernel" and graph_on_kernel] + ["as planned"]
        for number, choice in enumerate(choices or ["as planned"]):
            if choice != "as planned":
                for layer in layers:
                    forced = choice if choice in layer.choices() else "dense"
                    layer.forward = (lambda layer, forced: lambda x, residual=None: layer.run(forced, x, residual))(
                        layer, forced)
            else:
                for layer in layers:
                    layer.__dict__.pop("forward", None)
            with torch.no_grad():
                # The first graph is traced from `deployed` itself; later ones from a copy.
                got = (deploy_copy_run(deployed, x) if number else graph_run(deployed, x)) if mode == "torchscript" \
                    else deployed(x)
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), \
                f"{mode}, {choice}: deployed differs by {(got - expected).abs().max():.2e}"
        pools = [m for m in deployed.modules() if isinstance(m, VirtualPoolInference)]
        for upsample in (sorted({c for pool in pools for c in pool.choices()}) if mode == "eager" else []):
            for pool in pools:
                pool.forward = (lambda pool: lambda x: pool.run(upsample, pool.block(x), *x.shape[-2:]))(pool)
            with torch.no_grad():
                got = deployed(x)
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), \
                f"eager, ViP upsample {upsample}: deployed differs by {(got - expected).abs().max():.2e}"


def deploy_copy_run(deployed: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fresh graph for the layers as they are now (a copy re-traces), checked to be a graph."""
    return graph_run(copy.deepcopy(deployed), x)


def graph_run(deployed: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = deployed(x)
    assert [plan["choice"] for plan in graph_plan(deployed)] == ["torchscript"]
    return out
