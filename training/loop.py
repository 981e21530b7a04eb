"""The skeleton every training phase runs in (`steps`: global steps over epochs of batches, a
progress bar, checkpoints where the phase asks), and on it the resumable loop and checkpoint
shape of the supervised phases (`train`); the searches plug their steps into `steps` too.

A checkpoint holds `model`, `optimizer`, `epoch` (epochs finished), `step` (batches of
the current epoch finished), `elapsed` (training seconds so far), `curve` (every finished
epoch's figures), `done`, and whatever the phase adds. It is written every
`checkpoint_steps` steps and after each epoch; everything random in a step comes from
`Batches.epoch` and the step's own generator, both derived from (seed, epoch, step), so a
run killed at any step and resumed by a new process ends bit-identical to one never
interrupted. A finished phase keeps its weights and figures, not its optimizer; given more
epochs later (`--reconfigure --set <phase>.epochs=N`), it goes on from its weights with a fresh
optimizer, the learning-rate schedule recomputed over the new total.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import distributed
from training.context import Context
from training.data import derive_seed
from training.optim import set_lr
from training.phases import ORDER, PHASE_FILES
from training.rundir import RunError

# (x, y, generator, global step, forward) -> (loss, logits): one optimizer step's forward pass, where
# `forward(x, [policy, ...])` returns the logits of each path (one call, so DDP can average gradients).
# A step whose model does not classify returns None for logits, and the epoch logs no train_top1.
StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def train(ctx: Context, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, epochs: int,
          lr: Callable[[int, int], float], step: StepFn, validate: Callable[[], dict],
          grad_clip: float | None = None, batch_size: int | None = None, seed: int = 0,
          cutout_epochs: int | None = None, extra: dict | None = None) -> dict:
    """Train `model` for `epochs` epochs of `ctx`'s training batches, resuming from the phase's
    checkpoint. `lr(step, total_steps)` sets the learning rate of every step (`cutout_epochs`: the
    epochs whose batches get cutout, None: all, as `Context.batches`); `validate()`
    returns the figures logged after each epoch; `extra` goes into every checkpoint (what the
    phase needs to rebuild its model before resuming). Returns the finished checkpoint."""
    state = ctx.run.load(phase)
    if state is not None and state.get("done"):
        model.load_state_dict(state["model"])
        if state["epoch"] >= epochs:
            return state
        later = _later_phases_done(ctx, phase)
        if later:
            raise RunError(f"{phase} finished after {state['epoch']} epochs and {', '.join(later)} "
                           f"were built on it; remove their checkpoints to go on to {epochs} epochs")
        print(f"{phase}: finished after {state['epoch']} epochs; going on to {epochs}", flush=True)
    batches = ctx.batches("train", batch_size, seed=seed, cutout_epochs=cutout_epochs)
    steps_per_epoch = len(batches)
    total = epochs * steps_per_epoch
    epoch, first, elapsed, curve = 0, 0, 0.0, []
    sums = (0, 0.0, 0)  # images, loss sum, correct of the epoch in progress
    if state is not None:
        model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:  # None: a finished phase going on (above)
            optimizer.load_state_dict(state["optimizer"])
        epoch, first, elapsed, curve = state["epoch"], state["step"], state["elapsed"], state["curve"]
        sums = state.get("sums", (0, 0.0, 0))
        print(f"{phase}: resuming at epoch {epoch + 1}, step {first}", flush=True)
    forward = distributed.wrap(model)
    t0 = time.time()
    classifies = True

    def tick() -> None:  # training time only: validation is not counted
        nonlocal elapsed, t0
        elapsed, t0 = elapsed + time.time() - t0, time.time()

    def save(done: bool = False) -> None:
        ctx.run.save(phase, {"model": model.state_dict(), "optimizer": None if done else optimizer.state_dict(),
                             "epoch": epoch, "step": first, "elapsed": elapsed, "curve": curve, "done": done,
                             "steps_per_epoch": steps_per_epoch, "sums": sums, **(extra or {})})

    def one(s: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        nonlocal sums, classifies
        e, f = divmod(s, steps_per_epoch)
        set_lr(optimizer, lr(s, total))
        generator = torch.Generator().manual_seed(derive_seed(ctx.config.seed, seed, e, f))
        x, y = ctx.to_device(x), y.to(ctx.device)
        loss, logits = step(x, y, generator, s, forward)
        if not distributed.all_finite(loss):  # before any update, on every rank at once
            raise FloatingPointError(f"{phase}: loss is not finite (here {loss.item()}) at epoch {e + 1}, step {f}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        seen, loss_sum, correct = sums
        classifies = logits is not None
        if classifies:
            correct += (logits.argmax(1) == y).sum().item()
        sums = (seen + len(y), loss_sum + loss.item() * len(y), correct)
        return {"loss": f"{sums[1] / sums[0]:.3f}", **({"acc": f"{correct / sums[0]:.3f}"} if classifies else {})}

    def at(s: int) -> None:
        """After step `s`: the end of an epoch (validate, log, save) or a checkpoint within one."""
        nonlocal epoch, first, sums, t0
        epoch, first = divmod(s, steps_per_epoch)
        tick()
        if first:
            save()
            return
        seen, loss_sum, correct = sums
        figures = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
                   **({"train_top1": correct / max(seen, 1)} if classifies else {}),
                   **validate(), "elapsed_s": round(elapsed, 1)}
        t0 = time.time()
        curve.append(figures)
        ctx.run.log(phase, **figures)
        if ctx.run.main:
            print(f"{phase} epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
        sums = (0, 0.0, 0)
        save()

    def train_mode() -> None:
        model.train()  # again after every epoch's validation

    steps(ctx, batches, epoch * steps_per_epoch + first, total, one, desc=phase, checkpoint=at,
          every=lambda s: s % steps_per_epoch == 0 or s % max(1, ctx.config.checkpoint_steps) == 0,
          before=train_mode)
    save(done=True)
    distributed.barrier()  # every rank reads back what rank 0 wrote
    return ctx.run.require(phase)


def steps(ctx: Context, batches, start: int, total: int, step: Callable[[int, torch.Tensor, torch.Tensor], dict | None],
          *, desc: str, checkpoint: Callable[[int], None] | None = None, every: Callable[[int], bool] | None = None,
          before: Callable[[], None] | None = None) -> None:
    """The skeleton every training phase runs in: global steps `start` .. `total` - 1 over `batches`,
    epoch after epoch (each epoch's order from `Batches.epoch`, so a run resumed at any step sees
    what an uninterrupted one would), one progress bar (the step's returned dict as its postfix),
    and `checkpoint(s)` after step s - 1 wherever `every(s)` holds (by default every
    `checkpoint_steps` steps and at the end). `before()` runs before the first step and after
    each checkpoint."""
    per_epoch = len(batches)
    every = every or (lambda s: s % max(1, ctx.config.checkpoint_steps) == 0 or s == total)
    bar = tqdm(total=total, initial=start, disable=not ctx.run.main, desc=desc, unit="step", mininterval=5)
    s = start
    if before:
        before()
    while s < total:
        epoch, first = divmod(s, per_epoch)
        for x, y in batches.epoch(epoch, first):
            postfix = step(s, x, y)
            s += 1
            bar.update()
            if postfix:
                bar.set_postfix(postfix, refresh=False)
            if checkpoint and every(s):
                checkpoint(s)
                if before:
                    before()
            if s >= total:
                break
    bar.close()


def _later_phases_done(ctx: Context, phase: str) -> list[str]:
    """The phases after `phase` (in `instanas-train all` order) whose checkpoint exists."""
    return [p for p in ORDER[ORDER.index(phase) + 1:] if p in PHASE_FILES and ctx.run.checkpoint(p).exists()]


def converged(curve: list[dict], key: str = "val_top1", share: float = 0.1) -> float:
    """How much `key` gained over the last `share` of the epochs (the last epoch minus the best
    before that window); a run has converged when this is small."""
    values = np.array([c[key] for c in curve])
    window = max(1, int(round(len(values) * share)))
    if len(values) <= window:
        return float("nan")
    return float(values[-1] - values[:-window].max())
