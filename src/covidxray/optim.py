"""The optimiser, its learning-rate schedule and the weights' moving average of a training run (`covidxray.engine`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .errors import DataError

__all__ = ["ema_update", "make_optimizer"]


def ema_update(decay: float):
    """EMA step for `AveragedModel` whose decay warms up as (1 + n) / (10 + n): short runs average recent weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1 - d)
            else:  # integer buffers (BatchNorm's batch counter) just follow the model
                a.copy_(c)

    return update


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int,
                    extra: nn.Module | None = None) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        raise DataError(f"unknown optimizer {cfg.optimizer!r} (adamw, adam or sgd)")
    if extra is not None:  # a second parameter group (the origin adversary, the finding task), on the same schedule
        opt.add_param_group({"params": list(extra.parameters())})
    if cfg.scheduler == "step":
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler != "cosine":
        raise DataError(f"unknown scheduler {cfg.scheduler!r} (cosine or step)")
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
