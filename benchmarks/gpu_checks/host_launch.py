"""Where the host time of one attention call goes, on a GPU machine (a few seconds).

Host microseconds per call (perf_counter over ITERS calls, synchronised once at the end; the GPU
work of B=8, H=12, N=197, D=64 bf16 is shorter than the host work, so the host sets the pace) of:
PyTorch allocations, an empty Triton kernel with few and with many arguments, the forward and
backward launchers (``fastvit.kernels.flash_attention``), the op with and without autograd, SDPA.

    python benchmarks/gpu_checks/host_launch.py [OUT_DIR]
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, ".")
import fastvit
from fastvit.kernels import flash_attention as kernels

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
ITERS = 400


@triton.jit
def empty_kernel_4(a, b, n, m, BLOCK: tl.constexpr):
    pass


@triton.jit
def empty_kernel_40(a, b, c, d, e, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17,
                    s18, s19, s20, s21, s22, s23, s24, s25, s26, s27, s28, s29, s30, s31, s32, s33, s34,
                    BLOCK: tl.constexpr):  # fmt: skip
    pass


def host_us(fn) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(ITERS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / ITERS * 1e6


def main() -> None:
    b, h, n, d = 8, 12, 197, 64
    q, k, v, grad = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = kernels.flash_attention_forward(q, k, v, d**-0.5, False)
    ql, kl, vl = (t.detach().requires_grad_(True) for t in (q, k, v))
    strides = list(range(1, 36))

    def op_autograd():
        with fastvit.backend("triton"):
            fastvit.flash_attention(ql, kl, vl).backward(grad)

    def op_no_grad():
        with fastvit.backend("triton"):
            fastvit.flash_attention(q, k, v)

    def sdpa_autograd():
        F.scaled_dot_product_attention(ql, kl, vl).backward(grad)

    cases = {
        "torch.empty x2 (out, lse)": lambda: (torch.empty(b, n, h, d, device="cuda", dtype=q.dtype),
                                              torch.empty(b, h, n, device="cuda")),
        "empty triton kernel, 4 args": lambda: empty_kernel_4[(1,)](q, k, 3, 5, BLOCK=16),
        "empty triton kernel, 40 args": lambda: empty_kernel_40[(1,)](q, k, v, out, lse, *strides, BLOCK=16),
        "forward launcher (kernels.flash_attention_forward)": lambda: kernels.flash_attention_forward(
            q, k, v, d**-0.5, False),
        "backward launcher (kernels.flash_attention_backward)": lambda: kernels.flash_attention_backward(
            grad, q, k, v, out, lse, d**-0.5, False),
        "fastvit.flash_attention, no grad": op_no_grad,
        "fastvit.flash_attention forward + backward": op_autograd,
        "sdpa, no grad": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa forward + backward": sdpa_autograd,
    }  # fmt: skip
    results = {}
    for name, fn in cases.items():
        results[name] = host_us(fn)
        print(f"{results[name]:8.1f} us  {name}", flush=True)
    with open(os.path.join(OUT, "host_launch.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "shape": [b, h, n, d], "host_us": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
