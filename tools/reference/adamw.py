"""torch.optim.AdamW on a matrix (decayed) and a vector (not decayed), with a
changing learning rate, for the optimizer's parity test.

  python tools/reference/adamw.py
"""
import json
import os

import torch

torch.manual_seed(0)
w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
b = torch.randn(4, dtype=torch.float64, requires_grad=True)
start = {"w": w.detach().tolist(), "b": b.detach().tolist()}
opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                        lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
steps = []
for i, lr in enumerate([1e-2, 5e-3, 2e-2, 1e-3]):
    gw, gb = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for g in opt.param_groups:
        g["lr"] = lr
    w.grad, b.grad = gw, gb
    opt.step()
    steps.append({"lr": lr, "gw": gw.tolist(), "gb": gb.tolist(), "w": w.detach().tolist(), "b": b.detach().tolist()})
out = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "adamw.json")
json.dump({"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "start": start, "steps": steps}, open(out, "w"))
print("ok")
