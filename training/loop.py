"""One resumable training loop, and one checkpoint shape, for the supervised phases.

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
          extra: dict | None = None) -> dict:
    """Train `model` for `epochs` epochs of `ctx`'s training batches, resuming from the phase's
    checkpoint. `lr(step, total_steps)` sets the learning rate of every step; `validate()`
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
    batches = ctx.batches("train", batch_size, seed=seed)
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
    every = max(1, ctx.config.checkpoint_steps)
    forward = distributed.wrap(model)

    def save(done: bool = False, **more) -> None:
        ctx.run.save(phase, {"model": model.state_dict(), "optimizer": None if done else optimizer.state_dict(),
                             "epoch": epoch, "step": first, "elapsed": elapsed, "curve": curve, "done": done,
                             "steps_per_epoch": steps_per_epoch, "sums": sums, **(extra or {}), **more})

    classifies = True
    while epoch < epochs:
        model.train()
        t0 = time.time()
        seen, loss_sum, correct = sums
        bar = tqdm(batches.epoch(epoch, first), total=steps_per_epoch, initial=first, disable=not ctx.run.main,
                   desc=f"{phase} {epoch + 1}/{epochs}", unit="batch", mininterval=5)
        for x, y in bar:
            global_step = epoch * steps_per_epoch + first
            set_lr(optimizer, lr(global_step, total))
            generator = torch.Generator().manual_seed(derive_seed(ctx.config.seed, seed, epoch, first))
            x, y = ctx.to_device(x), y.to(ctx.device)
            loss, logits = step(x, y, generator, global_step, forward)
            if not distributed.all_finite(loss):  # before any update, on every rank at once
                raise FloatingPointError(f"{phase}: loss is not finite (here {loss.item()}) at epoch {epoch + 1}, "
                                         f"step {first}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            first += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            classifies = logits is not None
            if classifies:
                correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", **({"acc": f"{correct / seen:.3f}"} if classifies else {}),
                            refresh=False)
            if first % every == 0 and first < steps_per_epoch:
                elapsed += time.time() - t0
                t0 = time.time()
                sums = (seen, loss_sum, correct)
                save()
        elapsed += time.time() - t0
        epoch, first, sums = epoch + 1, 0, (0, 0.0, 0)
        figures = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
                   **({"train_top1": correct / max(seen, 1)} if classifies else {}),
                   **validate(), "elapsed_s": round(elapsed, 1)}
        curve.append(figures)
        ctx.run.log(phase, **figures)
        if ctx.run.main:
            print(f"{phase} epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
        save()
    save(done=True)
    distributed.barrier()  # every rank reads back what rank 0 wrote
    return ctx.run.require(phase)


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
