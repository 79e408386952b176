"""Sweep of the layernorm_mlp GEMM tiles on a GPU (fits a device minute): FC1 and the backward's dA
GEMM (fc2_bwd), whose tiles the static report chose for several programs per SM (one's activation
epilogue overlapping another's main loop) at the price of less operand reuse from L2. A GPU decides.

For each shape (ViT-B and ViT-L training batches, erf GELU; a SwiGLU MLP with a separate gate
projection) and candidate tiles of one GEMM kind (the launcher's own first, then the tiles it
replaced, then others), ``fastvit.layernorm_mlp`` forward+backward runs on the Triton route with the
candidate in place of the launcher's choice for that kind; the output and every gradient are checked
against the float32 composite (relative error) and the kernel's device time is read from the PyTorch
profiler. Candidates run in order until the time budget; each result is appended to
OUT/mlp_configs.jsonl as it is measured.

    python benchmarks/gpu_checks/mlp_configs.py OUT_DIR [TIME_BUDGET_S]

Off a GPU it runs one tiny shape in Triton's interpreter (fp32, wall-clock times; a check of the script).
"""

import functools
import math
import os
import sys
import time

import torch
from sweep import DEVICE, DTYPE, GPU, REPS, kernel_times, record, rel_error, sweep_args

sys.path.insert(0, ".")
import fastvit
from fastvit import reference
from fastvit.kernels import layernorm_mlp as forward_kernels
from fastvit.kernels import layernorm_mlp_bwd as backward_kernels
from fastvit.kernels.runtime import GemmConfig, arch_of

OUT, BUDGET_S = sweep_args(60.0)
# (name, batch, tokens, D, hidden, gating, activation)
SHAPES = [
    ("vit_b", 32, 197, 768, 3072, None, "gelu"),
    ("vit_l", 16, 197, 1024, 4096, None, "gelu"),
    ("swiglu_l", 16, 197, 1024, 2816, "split", "silu"),  # AIMv2-L's gate_proj / up_proj
] if GPU else [("tiny", 2, 37, 64, 96, None, "gelu"), ("tiny_swiglu", 2, 37, 64, 96, "split", "silu")]
KERNELS = {"fc1": "_fc1_kernel", "fc2_bwd": "_fc2_bwd_kernel"}


def candidates(kind: str, arch: int, gated: bool, activation: str) -> list[GemmConfig]:
    """The launcher's tiles first, then the ones they replaced (2026-12-05), then others; a gated
    FC1 halves each block_n in the launcher itself."""
    own = forward_kernels.hardware_gemm_config(arch, torch.bfloat16, kind, gated, activation)
    bk, stages = (64, 3) if arch >= 90 else (32, 4 if arch == 80 else 3)
    G = GemmConfig
    if kind == "fc1":
        others = [G(128, 128, bk, 8, stages), G(128, 64, bk, 8, stages), G(64, 128, bk, 4, stages),
                  G(64, 64, bk, 4, stages)]  # fmt: skip
    else:
        others = [G(128, 64, bk, 8, stages), G(64, 64, bk, 4, stages), G(64, 64, bk, 4, stages + 1),
                  G(128, 128, bk, 8, stages), G(64, 128, bk, 4, stages)]  # fmt: skip
    return [own, *(c for c in others if c != own)]


def label(cfg: GemmConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def make_inputs(batch: int, tokens: int, dim: int, hidden: int, gated: str | None, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE, DTYPE).requires_grad_(True)

    return {
        "x": randn(batch, tokens, dim), "norm_weight": randn(dim, scale=0.2), "norm_bias": randn(dim, scale=0.2),
        "fc1_weight": randn(hidden, dim, scale=1 / math.sqrt(dim)), "fc1_bias": randn(hidden, scale=0.2),
        "fc2_weight": randn(dim, hidden, scale=1 / math.sqrt(hidden)), "fc2_bias": randn(dim, scale=0.2),
        **({"fc1_gate_weight": randn(hidden, dim, scale=1 / math.sqrt(dim))} if gated else {}),
    }  # fmt: skip


def forward_backward(op, inputs: dict, grad_out: torch.Tensor, activation: str) -> list[torch.Tensor]:
    """[out, *gradients of every input] of ``op`` (fastvit.layernorm_mlp or the reference)."""
    names = list(inputs)
    gate = {"fc1_gate_weight": inputs["fc1_gate_weight"]} if "fc1_gate_weight" in inputs else {}
    out = op(*(inputs[n] for n in names[:7]), activation=activation, **gate)
    return [out, *torch.autograd.grad(out, [inputs[n] for n in names], grad_out)]


def measure(kind: str, inputs: dict, grad_out: torch.Tensor, activation: str, want: list[torch.Tensor]) -> dict:
    """Check the Triton route's output and gradients against ``want`` (the float32 composite's) and
    time ``kind``'s kernel, with whatever tiles ``gemm_config`` gives now."""

    def run() -> list[torch.Tensor]:
        with fastvit.backend("triton"):
            return forward_backward(fastvit.layernorm_mlp, inputs, grad_out, activation)

    err = max(rel_error(a, b) for a, b in zip(run(), want, strict=True))
    return {"rel_err": err, "ok": err < 3e-2, "us": kernel_times(run, {kind: KERNELS[kind]}, REPS)}


def main() -> None:
    start = time.time()
    os.makedirs(OUT, exist_ok=True)
    log = open(os.path.join(OUT, "mlp_configs.jsonl"), "a")  # noqa: SIM115
    arch = arch_of(torch.device(DEVICE)) if GPU else 90
    meta = {"device": torch.cuda.get_device_name() if GPU else "cpu (interpreter)", "torch": torch.__version__,
            "dtype": str(DTYPE).removeprefix("torch."), "arch": arch}  # fmt: skip
    print(meta, flush=True)
    real_forward, real_backward = forward_kernels.gemm_config, backward_kernels.gemm_config
    rows = []
    try:
        for name, batch, tokens, dim, hidden, gated, activation in SHAPES:
            inputs = make_inputs(batch, tokens, dim, hidden, gated, seed=dim + hidden)
            grad_out = torch.randn_like(inputs["x"])
            f32 = {k: v.detach().float().requires_grad_(True) for k, v in inputs.items()}
            want = forward_backward(reference.layernorm_mlp, f32, grad_out.float(), activation)
            for kind in KERNELS:
                for cfg in candidates(kind, arch, gated is not None, activation):
                    if time.time() - start > BUDGET_S:
                        print(f"budget reached: {name} {kind} {label(cfg)} and later candidates not run", flush=True)
                        return

                    def swept(arch_, dtype, kind_, gated_=False, activation_="gelu", _cfg=cfg, _kind=kind):
                        return _cfg if kind_ == _kind else real_forward(arch_, dtype, kind_, gated_, activation_)

                    forward_kernels.gemm_config = backward_kernels.gemm_config = swept
                    row = {"shape": name, "B": batch, "N": tokens, "D": dim, "hidden": hidden, "gated": gated,
                           "activation": activation, "kind": kind, "config": label(cfg), **meta}  # fmt: skip
                    run = functools.partial(measure, kind, inputs, grad_out, activation, want)
                    rows.append(record(row, run, log, f"{name:11s} {kind:7s} {label(cfg):20s}"))
    finally:
        forward_kernels.gemm_config, backward_kernels.gemm_config = real_forward, real_backward
        print(f"{len(rows)} rows in {time.time() - start:.0f} s -> {OUT}/mlp_configs.jsonl")


if __name__ == "__main__":
    main()
