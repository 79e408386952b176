"""One rank of the DDP test (``test_ddp.py``): a patched and an unpatched copy of one tiny timm
ViT, each wrapped in DistributedDataParallel over gloo, one step on this rank's images; the
all-reduced gradients are saved for the test to compare."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastvit
from tests.patching.helpers import images, timm_vit


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same weights on every rank
        reference = timm_vit(reg_tokens=1, init_values=0.5, drop_path_rate=0.0).train()
        patched = copy.deepcopy(reference)
        report = fastvit.patch(patched)
        grads = {}
        for name, model in (("reference", reference), ("patched", patched)):
            ddp = DistributedDataParallel(model)
            ddp(images(seed=100 + rank)).square().mean().backward()  # each rank its own batch
            grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save(
            {"grads": grads, "replaced": len(report.replaced)}, os.path.join(out_dir, f"rank{rank}.pt")
        )
    finally:
        dist.destroy_process_group()
