"""The few-step QAT loop the host-integration tests share (sklearn digits batches)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


def train_steps(p: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, search: Any = None,
                lr: float = 1e-2, opt: Optional[torch.optim.Optimizer] = None,
                set_train_mode: bool = False) -> torch.optim.Optimizer:
    """``steps`` Adam steps on seeded random batches of 64, adding the search penalty and
    stepping the search when given. PT2E graphs refuse ``.train()``: leave ``set_train_mode`` off."""
    opt = opt or torch.optim.Adam([q for q in p.parameters() if q.requires_grad], lr)
    g = torch.Generator().manual_seed(0)
    if set_train_mode:
        p.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(p(x[idx]), y[idx])
        if search is not None:
            loss = loss + search.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if search is not None:
            search.step()
    return opt
