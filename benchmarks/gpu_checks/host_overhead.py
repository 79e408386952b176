"""Host-side overhead of one fastvit.flash_attention call at a small shape (N=197): wall time per
call without synchronising (the host's cost) vs SDPA's, and the top of a cProfile of 200 calls."""
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import fastvit

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
profile = cProfile.Profile()
profile.enable()
for _ in range(200):
    fastvit.flash_attention(q, k, v)
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(22)
