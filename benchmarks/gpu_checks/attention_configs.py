"""Sweep of the attention kernels' block configurations on a GPU (fits a few device minutes).

For each head dim and candidate configuration: the forward kernel and the backward's dK/dV and dQ
kernels are checked against SDPA (relative error, bf16) and their device times read from the
PyTorch profiler (CUDA kernel durations, mean of REPS launches; host overhead excluded), at a ViT-B
training batch and two long sequences. The candidates are tried in order, current configuration
first, and the sweep stops at its time budget; each result is appended to OUT/attention_configs.jsonl
as it is measured, and a table is printed last.

    python benchmarks/gpu_checks/attention_configs.py OUT_DIR [TIME_BUDGET_S]

Off a GPU it runs one tiny shape in Triton's interpreter (wall-clock times; a check of the script).
"""

import functools
import os
import sys
import time

import torch
import torch.nn.functional as F
from sweep import DEVICE, DTYPE, GPU, REPS, kernel_times, record, rel_error, sweep_args

sys.path.insert(0, ".")
from fastvit.kernels import flash_attention as kernels
from fastvit.kernels.flash_attention import AttentionConfig

OUT, BUDGET_S = sweep_args(180.0)
# (batch, heads, tokens): a ViT-B/16 training batch, ViT at 512 px, a 64 x 64 grid
SHAPES = [(64, 12, 197), (8, 12, 1025), (2, 12, 4097)] if GPU else [(1, 2, 37)]
C = AttentionConfig
# forward candidates per padded head dim; the first is the launcher's default on Hopper
FWD = {
    64: [C(128, 64, 8, 3, max_registers=120), C(128, 64, 8, 3), C(128, 128, 8, 2), C(128, 128, 8, 3),
         C(64, 64, 4, 3), C(128, 64, 4, 3), C(128, 64, 8, 2, tma=True), C(128, 128, 8, 2, tma=True),
         C(64, 128, 4, 2, tma=True, max_registers=160)],
    128: [C(128, 32, 8, 3, key_tail=16, max_registers=128), C(128, 64, 8, 2), C(128, 64, 8, 3),
          C(128, 128, 8, 2), C(64, 64, 4, 3), C(128, 32, 8, 3), C(128, 64, 8, 2, tma=True, max_registers=128),
          C(128, 64, 8, 2, tma=True), C(128, 128, 8, 2, tma=True)],
}  # fmt: skip
# (at D = 128 the first is the launcher's default on Hopper since 2026-12-05, two programs per SM,
# and the second the one-program tiles it replaced)
# backward candidates (block_m: the step of each pass, block_n: the rows a program keeps), each
# taken by both dK/dV and dQ; at D = 64 the first is the launcher's default on Hopper and the
# second the 8-warp tiles it replaced; at D = 128 the first is the launcher's non-causal dK/dV and
# its dQ (one warpgroup each, since 2026-12-05), the second its causal dK/dV and the non-causal one
# it replaced, and the third a one-warpgroup dK/dV without causal spills
BWD = {
    64: [C(32, 64, 4, 2), C(64, 128, 8, 2), C(64, 64, 4, 2), C(32, 64, 4, 3), C(64, 64, 4, 3),
         C(32, 128, 8, 2), C(64, 128, 8, 3), C(128, 128, 8, 2)],
    128: [C(32, 64, 4, 2), C(32, 128, 8, 2, row_split=True), C(16, 64, 4, 2), C(32, 64, 4, 1), C(32, 128, 8, 1),
          C(64, 128, 8, 2), C(64, 64, 4, 2), C(16, 128, 8, 2)],
}  # fmt: skip
# the backward's two kernels (dQ writes delta: no pre-pass kernel since 2026-12-05)
KERNELS = {"fwd": "flash_attention_fwd_kernel", "dkdv": "flash_attention_bwd_dkdv_kernel",
           "dq": "flash_attention_bwd_dq_kernel"}  # fmt: skip


def label(cfg: AttentionConfig) -> str:
    text = f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
    text += f" tail={cfg.key_tail}" if cfg.key_tail else ""
    text += " split" if cfg.row_split else ""
    return text + (" tma" if cfg.tma else "") + (f" maxnreg={cfg.max_registers}" if cfg.max_registers else "")


def measure(kind: str, tensors: tuple, scale: float) -> dict:
    """Check one candidate (relative error to SDPA of out, or of out, dq, dk and dv) and time its
    kernels."""
    q, k, v, grad, ref, dq_ref, dk_ref, dv_ref = tensors
    out, lse = kernels.flash_attention_forward(q, k, v, scale, False)
    err = rel_error(out, ref)
    if kind == "fwd":
        times = kernel_times(lambda: kernels.flash_attention_forward(q, k, v, scale, False), KERNELS, REPS)
    else:
        grads = kernels.flash_attention_backward(grad, q, k, v, out, lse, scale, False)
        err = max(err, *(rel_error(a, r) for a, r in zip(grads[:3], (dq_ref, dk_ref, dv_ref), strict=True)))
        times = kernel_times(lambda: kernels.flash_attention_backward(grad, q, k, v, out, lse, scale, False), KERNELS,
                             REPS)
    return {"rel_err": err, "ok": err < 2e-2, "us": times}


def main() -> None:
    start = time.time()
    os.makedirs(OUT, exist_ok=True)
    log = open(os.path.join(OUT, "attention_configs.jsonl"), "a")  # noqa: SIM115
    meta = {"device": torch.cuda.get_device_name() if GPU else "cpu (interpreter)", "torch": torch.__version__,
            "dtype": str(DTYPE).removeprefix("torch.")}  # fmt: skip
    print(meta, flush=True)
    inputs = {}
    for d in FWD:
        for b, h, n in SHAPES:
            g = torch.Generator(device=DEVICE).manual_seed(n + d)
            q, k, v, grad = (torch.randn(b, h, n, d, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(4))
            qs, ks, vs = (t.detach().requires_grad_(True) for t in (q, k, v))
            ref = F.scaled_dot_product_attention(qs, ks, vs)
            ref.backward(grad)
            inputs[(d, b, h, n)] = (q, k, v, grad, ref.detach(), qs.grad, ks.grad, vs.grad)
    rows = []
    original_fwd, original_bwd, original_dq = kernels._hardware_fwd_config, kernels.bwd_config, kernels.bwd_dq_config
    os.environ["FASTVIT_TMA"] = "1"  # descriptors qualify; each candidate's own tma field decides
    arch = kernels.arch_of(torch.device(DEVICE)) if GPU else 90
    try:
        # the passes alternate per head dim, so a short budget still sees both
        plan = [(kind, d, cfg) for d in FWD for kind, table in (("fwd", FWD), ("bwd", BWD)) for cfg in table[d]]
        plan.sort(key=lambda item: (FWD if item[0] == "fwd" else BWD)[item[1]].index(item[2]))
        for kind, d, cfg in plan:
            if time.time() - start > BUDGET_S:
                print(f"budget reached: {kind} D={d} {label(cfg)} and later candidates not run", flush=True)
                break
            if kind == "fwd":
                # (a candidate naming its key tail keeps it; the others take the launcher's rule)
                kernels._hardware_fwd_config = lambda *a, _c=cfg: _c if _c.key_tail else kernels._with_key_tail(_c)
                kernels.bwd_config, kernels.bwd_dq_config = original_bwd, original_dq
            else:
                kernels._hardware_fwd_config = original_fwd
                # both passes take the candidate (the profiler times dK/dV and dQ separately)
                kernels.bwd_config = kernels.bwd_dq_config = lambda *a, _c=cfg: _c
            for b, h, n in SHAPES:
                row = {"pass": kind, "D": d, "B": b, "H": h, "N": n, "config": label(cfg),
                       "arch": arch, **meta}  # fmt: skip
                run = functools.partial(measure, kind, inputs[(d, b, h, n)], d**-0.5)
                rows.append(record(row, run, log, f"{kind:3s} D={d:3d} B={b:2d} N={n:5d} {label(cfg):28s}"))
    finally:
        kernels._hardware_fwd_config = original_fwd
        kernels.bwd_config, kernels.bwd_dq_config = original_bwd, original_dq
        del os.environ["FASTVIT_TMA"]
    print(f"{len(rows)} rows in {time.time() - start:.0f} s -> {OUT}/attention_configs.jsonl")


if __name__ == "__main__":
    main()
