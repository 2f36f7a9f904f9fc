#!/usr/bin/env python3
"""Writes what `torch.optim.AdamW` (PyTorch's own implementation, the single-tensor path it uses by default on CPU)
does to a few parameters over several steps, so the project's AdamW (src/train/optim.rs) can be checked against it
bit for bit. Run at test time on the machine under test: libtorch picks its vector kernels by CPU (AVX2, AVX-512),
so a bit-exact comparison is only meaningful against torch on the same machine.

Two parameter groups as the trainer forms them: weight decay on matrices (dim > 1), none on vectors. Every step
has its own learning rate (as a schedule gives) and its own random gradients spanning several magnitudes.

Tensors written (float32 unless noted):
  init.<name>                  starting values
  grad.<step>.<name>           gradient used at step <step> (0-based)
  lr                           float64 [steps], learning rate per step
  hyper                        float64 [beta1, beta2, eps, weight_decay]
  param.<name>, m.<name>, v.<name>   values after the last step (exp_avg, exp_avg_sq)

Usage (the project's venv): scripts/with-torch python3 tests/oracles/adamw_oracle.py OUT.safetensors
"""
import os
import sys

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
torch.set_num_threads(1)
beta1, beta2, eps, wd = 0.9, 0.999, 1e-8, 0.05
shapes = {"a.weight": (17, 40), "a.bias": (40,), "b.weight": (3, 5, 7), "norm.weight": (40,)}
steps = 6
lrs = [1e-3, 3e-3, 2.5e-3, 1e-4, 5e-7, 1e-2]

init = {k: torch.randn(s) * 0.1 for k, s in shapes.items()}
params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
decay = [p for k, p in params.items() if p.dim() > 1]
no_decay = [p for k, p in params.items() if p.dim() <= 1]
opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
    lr=lrs[0], betas=(beta1, beta2), eps=eps)
assert opt.defaults["foreach"] is None and opt.defaults["fused"] is None
out = {f"init.{k}": v.clone() for k, v in init.items()}
for step in range(steps):
    for g in opt.param_groups:
        g["lr"] = lrs[step]
    for k, p in params.items():
        scale = 10.0 ** torch.randint(-4, 2, p.shape).float()
        grad = torch.randn(p.shape) * scale
        p.grad = grad
        out[f"grad.{step}.{k}"] = grad.clone()
    opt.step()
for k, p in params.items():
    st = opt.state[p]
    out[f"param.{k}"] = p.detach().clone()
    out[f"m.{k}"] = st["exp_avg"].clone()
    out[f"v.{k}"] = st["exp_avg_sq"].clone()
out["lr"] = torch.tensor(lrs, dtype=torch.float64)
out["hyper"] = torch.tensor([beta1, beta2, eps, wd], dtype=torch.float64)
path = sys.argv[1]
save_file(out, path, metadata={"torch": torch.__version__})
print(f"wrote {path} (torch {torch.__version__}, {steps} steps)")
