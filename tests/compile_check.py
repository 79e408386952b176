"""One check shared by the ops' torch.compile tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import fastvit

ON_GPU = torch.cuda.is_available()


def assert_compiled_matches_eager(
    block: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], route: str
) -> None:
    """``torch.compile(block, fullgraph=True)`` (inductor on a GPU, aot_eager with the CPU
    interpreter) gives the eager loss and the eager gradients of every input, on ``route``."""
    backend = "inductor" if ON_GPU else "aot_eager"
    inputs = tuple(inputs)
    with fastvit.backend(route):
        compiled = torch.compile(block, fullgraph=True, backend=backend)
        loss = compiled(*inputs)
        grads = torch.autograd.grad(loss, inputs)
        eager_loss = block(*inputs)
        eager_grads = torch.autograd.grad(eager_loss, inputs)
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
