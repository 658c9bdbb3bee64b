"""PyTorch/cuDNN reference for experiments/pallas_probe.py: one layer's forward+backward
at the long shape (T=1024, B=32, I=28, H=128)."""

import json
import time

import numpy as np
import torch

dev = "cuda" if torch.cuda.is_available() else "cpu"
for name, mod in [("lstm", torch.nn.LSTM), ("gru_ra", torch.nn.GRU)]:
    net = mod(28, 128).to(dev)
    xs = torch.randn(1024, 32, 28, device=dev)
    w = (torch.arange(1024 * 32 * 128, device=dev).reshape(1024, 32, 128) % 7) * 0.1

    def step(net=net, xs=xs, w=w):
        net.zero_grad(set_to_none=True)
        ys, _ = net(xs)
        (ys * w).sum().backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(15):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(json.dumps({"bench": name, "variant": "torch", "ms": 1e3 * float(np.median(times))}))
