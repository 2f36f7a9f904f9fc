#!/usr/bin/env python3
"""Times PyTorch's scaled_dot_product_attention forward + backward on sequence lengths it has not seen before and
on lengths it has, per backend, in fp32 and bf16 (4 x 8 heads x L x 64, a causal boolean mask as ddpo passes).
This is the probe behind BENCHMARKS.md's cuDNN finding: run it on a GPU machine, plain and with
TORCH_CUDNN_SDPA_DEPRIORITIZED=1, e.g.
    python3 scripts/gpu-sdpa-probe.py; TORCH_CUDNN_SDPA_DEPRIORITIZED=1 python3 scripts/gpu-sdpa-probe.py
"""
import random
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def run(dtype, lengths, label, backends=None):
    times = []
    for L in lengths:
        q, k, v = (torch.randn(4, 8, L, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        m = torch.ones(L, L, device="cuda", dtype=torch.bool).tril().expand(4, 1, L, L)
        torch.cuda.synchronize()
        t = time.perf_counter()
        if backends is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:
            with sdpa_kernel(backends):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        y.sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    half = len(lengths) // 2  # each length appears twice: first-seen, then repeated
    new, rep = times[:half], times[half:]
    print(f"{label:28s} first-seen shapes: mean {1e3 * sum(new) / len(new):7.2f} ms   "
          f"repeated shapes: mean {1e3 * sum(rep) / len(rep):6.2f} ms")


random.seed(0)
Ls = random.sample(range(600, 760), 12)
seq = Ls + Ls
# Each run gets lengths no earlier run used, so every backend starts cold.
run(torch.float32, [L + 1000 for L in seq], "fp32 default")
run(torch.bfloat16, seq, "bf16 default")
run(torch.bfloat16, [L + 200 for L in seq], "bf16 efficient only", [SDPBackend.EFFICIENT_ATTENTION])
run(torch.bfloat16, [L + 400 for L in seq], "bf16 math only", [SDPBackend.MATH])
run(torch.bfloat16, [L + 600 for L in seq], "bf16 cudnn only", [SDPBackend.CUDNN_ATTENTION])
print("cudnn sdp enabled:", torch.backends.cuda.cudnn_sdp_enabled(), "cudnn", torch.backends.cudnn.version())
