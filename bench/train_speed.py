"""Training throughput (images/s, forward + backward + step, with augmentation) per architecture and size.

    .venv/bin/python bench/train_speed.py [--steps 6]

Uses random images: this measures compute, not data loading (training reads a decoded cache).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import peak_rss_mb, save
from covidxray.presets import AUGMENTS
from covidxray.models import build_model, get_spec

CASES = [  # (arch, size, freeze, augment): the default recipe, its neighbours, and the reference
    ("tf_efficientnet_lite0", 128, True, "cxr"), ("tf_efficientnet_lite0", 160, True, "cxr"),
    ("tf_efficientnet_lite0", 192, True, "cxr"), ("tf_efficientnet_lite0", 160, False, "cxr"),
    ("cxrnet", 128, False, "cxr"), ("mobilenet_v3_large", 160, False, "cxr"), ("resnet18", 224, False, "reference"),
]


def measure(arch: str, size: int, freeze: bool, augment: str, steps: int, batch: int = 32) -> float:
    model = build_model(arch).to(memory_format=torch.channels_last)
    frozen = get_spec(arch).freezable if freeze else ()
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    model.train()
    for name in frozen:
        model.get_submodule(name).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    y = torch.randint(0, 2, (batch,))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        x = AUGMENTS[augment](x_u8.float() / 255, g)
        loss = F.cross_entropy(model(((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch * steps / sum(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    rows = []
    table = ["| Architecture | Size | Frozen early layers | Augmentation | Train images/s |", "|---|---:|---|---|---:|"]
    for arch, size, freeze, augment in CASES:
        ips = measure(arch, size, freeze, augment, args.steps)
        rows.append({"arch": arch, "size": size, "freeze": freeze, "augment": augment, "img_per_s": ips})
        table.append(f"| {arch} | {size} | {'yes' if freeze else 'no'} | {augment} | {ips:.1f} |")
        print(table[-1], flush=True)
    table.append(f"\nBatch 32, CPU, channels_last; peak RSS {peak_rss_mb():.0f} MB.")
    save("train_speed", {"title": "Training throughput", "rows": rows, "table": table, "command": "python bench/train_speed.py"})


if __name__ == "__main__":
    main()
