"""The one training loop every trainable method uses.

A method supplies only its loss step, ``step(batch) -> loss`` (or ``(loss, logs)``
with a dict of extra numbers to show), and the parameters to optimise. The loop
does the rest, the same way for everyone:

* seeded shuffling (a ``torch.Generator``), so two CPU runs with one seed match;
* Adam/AdamW/SGD with an optional cosine schedule;
* ``tqdm.auto`` progress over epochs with the running loss;
* bf16 autocast on CUDA (off on CPU and MPS, where it is slower or unsupported);
* checkpoint-or-train: with ``checkpoint=path``, load the weights if the file
  exists, else train and write it (the d2l habit for long chapters).

Usage inside a Detector's ``_fit``::

    self.history_ = fit_loop(self.net_, lambda b: F.mse_loss(self.net_(b), b), x,
                             epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             device=self.device_, seed=self.seed, desc=self.name)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .utils import AnomalyZooError, env_flag


def _optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise AnomalyZooError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def fit_loop(
    module: nn.Module,
    step: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, dict]],
    data: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device | str = "cpu",
    params: Iterable[nn.Parameter] | None = None,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    cosine: bool = False,
    seed: int = 0,
    desc: str = "train",
    checkpoint: str | Path | None = None,
    amp: bool = True,
    progress: bool | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``module`` by minimising ``step(batch)`` over ``data``; returns the mean loss per epoch.

    ``data`` is a tensor (or a tuple of tensors with one length) kept on the CPU;
    each batch is moved to ``device`` before ``step`` sees it (a tuple stays a tuple).
    """
    device = torch.device(device)
    if checkpoint is not None and Path(checkpoint).is_file():
        blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
        module.load_state_dict(blob["state_dict"])
        module.to(device)
        return [float(v) for v in blob["history"]]

    tensors = data if isinstance(data, tuple) else (data,)
    n = len(tensors[0])
    if n == 0:
        raise AnomalyZooError("no training data")
    module.to(device).train()
    params = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    opt = _optimizer(optimizer, params, lr, weight_decay)
    # batch boundaries; a trailing batch of one image joins the one before (batch norm needs two)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    steps_per_epoch = len(starts)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch) if cosine else None
    gen = torch.Generator().manual_seed(seed)
    use_amp = amp and device.type == "cuda"
    show = (not env_flag("AZOO_NO_PROGRESS")) if progress is None else progress

    history: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not show, leave=False)
    for epoch in bar:
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i, j in zip(starts, [*starts[1:], n]):
            idx = order[i:j]
            batch = tuple(t[idx].to(device, non_blocking=True) for t in tensors)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                out = step(batch if isinstance(data, tuple) else batch[0])
            loss, logs = out if isinstance(out, tuple) else (out, {})
            if not torch.isfinite(loss):
                raise AnomalyZooError(f"{desc}: the loss became {loss.item()} at epoch {epoch}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.4g}", **{k: f"{float(v):.3g}" for k, v in logs.items()})
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    module.eval()
    if checkpoint is not None:
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": module.state_dict(), "history": history}, checkpoint)
    return history
