"""Capturing a call as a CUDA graph in the GPU tests (``tests/ops/test_cuda_graphs.py``, the varlen
and patched-model capture tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` called once on a side stream (compiles, sets up autograd and libraries per stream, as
    PyTorch's CUDA graph notes ask before a capture), then captured: the graph and what the captured
    call returned, whose tensors each replay of the graph refills."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    return graph, captured
