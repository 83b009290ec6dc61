"""The one training loop every trainable method uses.

A method supplies only its loss step, ``step(batch, ctx) -> loss`` (or ``(loss, logs)``
with a dict of extra numbers to show), and what to optimise. ``ctx`` is a
:class:`Context`: the epoch, the global step, the loop's seeded ``torch.Generator``
(for any randomness of the step: masks, synthetic anomalies, sampled positions) and
the device. The loop does the rest, the same way for everyone:

* seeded shuffling, so two CPU runs with one seed match exactly;
* Adam/AdamW/SGD (``betas``, ``eps``, ``momentum``, parameter groups), a learning-rate
  ``schedule`` (``"cosine"`` per step, ``"multistep"`` at epoch ``milestones``,
  ``"exponential"`` per epoch, each by ``gamma``) and gradient-norm clipping;
* several players updated in turn: pass a list of :class:`Player` instead of one step
  (a GAN's discriminator then generator, each with its own optimiser; ``every=k``
  updates a player on every k-th batch only, as WGAN's critic schedule);
* ``tqdm.auto`` progress over epochs with the running loss, quiet when nobody watches;
* bf16 autocast on CUDA (off on CPU and MPS, where it is slower or unsupported);
* no batch of one image: a trailing single image joins the batch before it (batch norm).

A detector calls it through ``Detector._train`` (which fills in its own epochs,
batch size, learning rate, device and seed)::

    def _fit(self, x):
        self._train(lambda b, ctx: F.mse_loss(self.net_(b), b), x)

    def _fit(self, x):                               # two players, in turn
        self._train([Player("discriminator", self._d_step, self.disc_.parameters()),
                     Player("generator", self._g_step, self.gen_.parameters())], x)

Checkpoint-or-train is the detector's (``det.fit(images, checkpoint=path)``), where the
parameters and the training data are known; the loop itself never reads a file.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .utils import AnomalyZooError, progress_enabled

SCHEDULES = (None, "cosine", "multistep", "exponential")


@dataclass
class Context:
    """What a loss step may need besides its batch."""

    epoch: int
    step: int  # batches seen so far, over all epochs
    generator: torch.Generator  # seeded by the loop: draw any randomness of the step from it
    device: torch.device


@dataclass
class Player:
    """One optimiser of the loop and the loss it minimises (``None`` fields: the loop's settings)."""

    name: str
    step: Callable
    params: Iterable
    lr: float | None = None
    optimizer: str | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    every: int = 1


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                   momentum: float = 0.9, eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) over ``params`` (tensors or torch parameter groups)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    if not params:
        raise AnomalyZooError("nothing to train: no parameter requires a gradient")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise AnomalyZooError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def _scheduler(opt, schedule, epochs: int, steps_per_epoch: int, milestones, gamma: float):
    """(scheduler, steps per call): cosine steps every batch, the others every epoch."""
    if schedule is None:
        return None, 0
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps_per_epoch)), 1
    if schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma), steps_per_epoch
    if schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma), steps_per_epoch
    raise AnomalyZooError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")


def batch_starts(n: int, batch_size: int) -> list[int]:
    """Batch boundaries; a trailing batch of one image joins the one before (batch norm needs two)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return starts


def fit_loop(
    module: nn.Module,
    step: Callable | Sequence[Player],
    data: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device | str = "cpu",
    params: Iterable | None = None,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    eps: float = 1e-8,
    schedule: str | None = None,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    clip_grad: float | None = None,
    seed: int = 0,
    desc: str = "train",
    amp: bool = True,
    progress: bool | None = None,
    on_epoch_end: Callable[[Context], None] | None = None,
) -> list[float] | dict[str, list[float]]:
    """Train by minimising ``step(batch, ctx)`` over ``data``; returns the mean loss per epoch
    (a dict ``{player: [...]}`` when ``step`` is a list of players).

    ``data`` is a tensor (or a tuple of tensors with one length) kept on the CPU;
    each batch is moved to ``device`` before a step sees it (a tuple stays a tuple).
    ``module`` is put in train mode during the loop and in eval mode after it.
    """
    device = torch.device(device)
    tensors = data if isinstance(data, tuple) else (data,)
    n = len(tensors[0])
    if n == 0:
        raise AnomalyZooError("no training data")
    single = callable(step)
    players = [Player("loss", step, params if params is not None else module.parameters())] if single else list(step)
    opts, scheds = [], []
    starts = batch_starts(n, batch_size)
    for p in players:
        opt = make_optimizer(p.optimizer or optimizer, p.params, p.lr or lr,
                             weight_decay if p.weight_decay is None else p.weight_decay, p.betas or betas, momentum,
                             eps)
        opts.append(opt)
        scheds.append(_scheduler(opt, schedule, epochs, len(starts) // max(1, p.every) or 1, milestones, gamma))
    module.to(device).train()
    ctx = Context(0, 0, torch.Generator().manual_seed(seed), device)
    use_amp = amp and device.type == "cuda"
    history: dict[str, list[float]] = {p.name: [] for p in players}
    bar = tqdm(range(epochs), desc=desc, disable=not (progress_enabled() if progress is None else progress),
               leave=False)
    for epoch in bar:
        ctx.epoch = epoch
        order = torch.randperm(n, generator=ctx.generator)
        totals = {p.name: [0.0, 0] for p in players}
        logs: dict = {}
        for i, j in zip(starts, [*starts[1:], n]):
            idx = order[i:j]
            batch = tuple(t[idx].to(device, non_blocking=True) for t in tensors)
            batch = batch if isinstance(data, tuple) else batch[0]
            for p, opt, (sched, per) in zip(players, opts, scheds):
                if ctx.step % p.every:
                    continue
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    out = p.step(batch, ctx)
                loss, extra = out if isinstance(out, tuple) else (out, {})
                if not torch.isfinite(loss):
                    raise AnomalyZooError(f"{desc}: the {p.name} became {loss.item()} at epoch {epoch}; "
                                          "lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad is not None:
                    nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], clip_grad)
                opt.step()
                if sched is not None and per == 1:
                    sched.step()
                totals[p.name][0] += float(loss.detach()) * len(idx)
                totals[p.name][1] += len(idx)
                logs.update(extra)
            ctx.step += 1
        for p, (sched, per) in zip(players, scheds):
            history[p.name].append(totals[p.name][0] / max(1, totals[p.name][1]))
            if sched is not None and per != 1:
                sched.step()
        bar.set_postfix(**{k: f"{v[-1]:.4g}" for k, v in history.items()},
                        **{k: f"{float(v):.3g}" for k, v in logs.items()})
        if on_epoch_end is not None:
            on_epoch_end(ctx)
    module.eval()
    return history["loss"] if single else history
