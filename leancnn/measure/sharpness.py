"""Sharpness of a loss: the largest eigenvalue of its Hessian with respect to the weights, by power
iteration on Hessian-vector products (Pearlmutter, "Fast Exact Multiplication by the Hessian",
Neural Computation 1994; as used for adversarial loss landscapes by H-SAT).

Each iteration costs one double backward pass; no Hessian is ever formed.
"""
from __future__ import annotations

from typing import Callable

import torch


def hessian_top_eigenvalue(loss_of: Callable[[], torch.Tensor], params: list[torch.Tensor], *,
                           iterations: int = 10, generator: torch.Generator | None = None) -> float:
    """The eigenvalue of largest magnitude of d2 loss / d params2, by `iterations` steps of power
    iteration from a random unit vector (drawn from `generator`). `loss_of()` builds the loss
    (a graph that depends on `params`); it is called once."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    with torch.enable_grad():
        loss = loss_of()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vector = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]
        eigenvalue = 0.0
        for _ in range(iterations):
            norm = torch.sqrt(sum((v * v).sum() for v in vector)).clamp_min(1e-12)
            vector = [v / norm for v in vector]
            product = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True)
            # Rayleigh quotient v'Hv of the unit vector v: the estimate after this step.
            eigenvalue = float(sum((h * v).sum() for h, v in zip(product, vector)))
            vector = [h.detach() for h in product]
    return eigenvalue
