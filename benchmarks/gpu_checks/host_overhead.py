"""Host-side overhead of one fastvit.flash_attention call at a small shape (N=197): wall time per
call without synchronising (the host's cost) vs SDPA's, forward and forward+backward, the GPU time
of each (do_bench medians) and of the same calls replayed from a CUDA graph (do_bench medians of
the replay: no host work between launches), and the top of a cProfile of 200 forward+backward steps."""
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from triton.testing import do_bench

sys.path.insert(0, ".")
import fastvit
from fastvit.benchmarks.measure import capture_graphs

q, k, v = (torch.randn(8, 12, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(20):
    fastvit.flash_attention(q, k, v)
    F.scaled_dot_product_attention(q, k, v)
torch.cuda.synchronize()
CALLS = (
    ("fastvit", lambda: fastvit.flash_attention(q, k, v)),
    ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v)),
)
for name, fn in CALLS:
    t0 = time.perf_counter()
    for _ in range(200):
        fn()
    host = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    print(f"{name}: host {host:.1f} us per call (not synchronised)")
qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
grad = torch.randn_like(q)


def step(attention):
    attention(qg, kg, vg).backward(grad)


STEPS = (
    ("fastvit", lambda: step(fastvit.flash_attention)),
    ("sdpa", lambda: step(F.scaled_dot_product_attention)),
)
for name, fn in STEPS:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        fn()
    host = (time.perf_counter() - t0) / 200 * 1e6
    torch.cuda.synchronize()
    print(f"{name} fwd+bwd: host {host:.1f} us per step (not synchronised)")

for name, fn in (*CALLS, *((f"{n} fwd+bwd", f) for n, f in STEPS)):
    print(f"{name}: {do_bench(fn, warmup=25, rep=200, return_mode='median') * 1e3:.1f} us per call (GPU, do_bench)")
# the same calls replayed from CUDA graphs, as under torch.cuda.graph or
# torch.compile(mode="reduce-overhead"): what the kernels cost once the host is out of the way.
# Timed by do_bench like the rows above (L2 flushed before each call; the backward accumulates into
# the same .grad tensors in both)
for name, fn in (*CALLS, *((f"{n} fwd+bwd", f) for n, f in STEPS)):
    try:
        replay = capture_graphs(lambda i, fn=fn: fn(), 1, torch.device("cuda"))
        us = do_bench(lambda replay=replay: replay(0), warmup=25, rep=200, return_mode="median") * 1e3
        print(f"{name}: {us:.1f} us per call (GPU, CUDA graph replay, do_bench)")
    except Exception as exc:  # a failed capture is a finding, not the end of the script
        print(f"{name}: not capturable as a CUDA graph: {type(exc).__name__}: {str(exc)[:200]}")
profile = cProfile.Profile()
profile.enable()
for _ in range(200):
    STEPS[0][1]()
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(30)

# where the forward+backward step's time goes, host and device side (the ~1 ms fixed cost of
# fastvit's backward seen on the H200, 2026-12-04, is not in the Python frames above): torch.profiler
# over 20 steps, the table sorted by self CPU time, and a Chrome trace when an output folder is given

for name, fn in STEPS:
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    print(f"--- torch.profiler, {name} forward+backward, 20 steps ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if len(sys.argv) > 1:
        prof.export_chrome_trace(f"{sys.argv[1]}/host-overhead-{name}.trace.json")
