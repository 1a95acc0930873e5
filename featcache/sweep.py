"""A grid of linear heads (lr x weight decay x seed) trained as ONE vmapped, jit-compiled program.

Every cell follows the plan that `featcache head-train --lr LR --weight-decay WD --seed SEED`
follows (same init, batch order and lr per epoch). The program is head.training_program with the
H (lr, wd) pairs of a seed as H heads side by side (they share the seed's batches, so they take
one matrix product per step instead of H matrix-vector products), vmapped over the seeds (each
seed has its own init and batch order). Each cell's outputs then go through
head.fit_from_outputs: a cell reports what fit_head reports for it.

Selection: the (lr, wd) pair with the best mean val accuracy over the seeds (a seed's val
accuracy is that of its selected epoch); ties go to the lower mean val loss, then to the earlier
pair in grid order. Test data never takes part. The run directory (featcache.head_runs.train_grid)
keeps the selected pair trained with the FIRST seed (head.npz, history.csv, summary): exactly the head
that `featcache head-train --lr LR --weight-decay WD --seed FIRST` writes.

L = lrs, W = weight decays, H = L*W pairs (lr-major), R = seeds; E, B, S, N, D, K as in head.py.
Never imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import numpy as np

from featcache.config import TrainConfig
from featcache.errors import UserError
from featcache.head import HeadFit, fit_from_outputs, padded_batches, params_from_linear, prepare_data, training_program
from featcache.metrics import Interval, mean_interval
from featcache.plan import TrainPlan, class_weights, make_plan, num_outputs_for
from featcache.standardize import Arrays, HeadData


@dataclass(frozen=True)
class GridCell:
    """One (lr, weight decay) pair: its fit for every seed and the intervals over the seeds."""

    lr: float
    weight_decay: float
    fits: tuple[HeadFit, ...]  # one per seed, in GridFit.seeds order
    val_acc: Interval  # of each seed's selected epoch
    val_loss: Interval
    test_acc: Interval

    def to_dict(self, seeds: Sequence[int]) -> dict:
        """JSON-safe: the pair, its intervals and one row per seed."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "val_acc": self.val_acc.to_dict(),
                "val_loss": self.val_loss.to_dict(), "test_acc": self.test_acc.to_dict(),
                "seeds": [{"seed": int(seed), "best_val_acc": _json_float(f.summary.best_val_acc),
                           "best_val_loss": _json_float(f.summary.best_val_loss),
                           "test_acc": _json_float(f.summary.test_acc),
                           "selected_epoch": f.summary.selected_epoch, "diverged": f.summary.diverged}
                          for seed, f in zip(seeds, self.fits)]}


@dataclass(frozen=True)
class GridFit:
    """Everything a grid training produced; cells are lr-major: cells[i * W + j] = (lrs[i], weight_decays[j])."""

    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    seeds: tuple[int, ...]
    cells: list[GridCell]
    selected: int  # index into cells
    timings: dict[str, float]  # compile_s, train_s of the one program (all G heads)

    @property
    def selected_cell(self) -> GridCell:
        return self.cells[self.selected]

    @property
    def num_heads(self) -> int:
        return len(self.cells) * len(self.seeds)

    def to_dict(self) -> dict:
        """The grid as metrics.json stores it under extra["grid"]."""
        cell = self.selected_cell
        return {"lrs": list(self.lrs), "weight_decays": list(self.weight_decays), "seeds": list(self.seeds),
                "heads": self.num_heads,
                "rule": "best mean val acc over seeds; ties: lower mean val loss, then grid order",
                "selected": {"lr": cell.lr, "weight_decay": cell.weight_decay, "saved_seed": self.seeds[0]},
                "cells": [c.to_dict(self.seeds) for c in self.cells]}


def grid_edge_note(grid: GridFit) -> str | None:
    """What to say when the selected lr or weight decay lies on the edge of its axis of the grid (each axis
    sorted; metrics.edge_note), else None."""
    from featcache.metrics import edge_note

    cell = grid.selected_cell
    notes = []
    for name, values, chosen, option in (("lr", grid.lrs, cell.lr, "--lr"),
                                         ("weight decay", grid.weight_decays, cell.weight_decay, "--weight-decay")):
        ordered = sorted(values)
        if name == "weight decay" and ordered[0] == 0 and chosen == 0:  # no decay is the natural floor
            continue
        note = edge_note(name, ordered, ordered.index(chosen), option=option)
        if note:
            notes.append(note)
    return " ".join(n[0].upper() + n[1:] for n in notes) or None


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _unique(name: str, values: Sequence) -> tuple:
    values = tuple(values)
    if not values:
        raise UserError(f"{name} is empty; give at least one value.")
    if len(set(values)) != len(values):
        raise UserError(f"{name} lists a value twice ({', '.join(map(str, values))}); give each once.")
    return values


def grid_program(*, num_outputs: int, num_pairs: int, config: TrainConfig,
                 class_weights: np.ndarray | None = None) -> Callable:
    """jit(vmap over seeds (head.training_program with the H (lr, wd) pairs as heads side by side)).

    Returns:
        program(params: kernel (R, D, H*K), bias (R, H*K), x_train (N, D) f32, y_train (N,) i32,
        x_val (Nv, D) f32, idx (R, E, B, S) i32, mask (E, B, S) f32, lrs (E, H) f32,
        weight_decays (H,) f32) -> the multi-head outputs of training_program with a leading R axis.
        class_weights: (C,) of plan.class_weights or None, for every head (head.masked_loss).
    """
    heads = training_program(num_outputs=num_outputs, config=config, heads=num_pairs, class_weights=class_weights)
    return jax.jit(jax.vmap(heads, in_axes=(0, None, None, None, 0, None, None, None)))


def _cell_outputs(outs: tuple, r: int, h: int, k: int) -> tuple:
    """The train_program outputs of head h of seed r, cut from the grid program's outputs (numpy)."""
    batch_loss, batch_correct, val_logits, params = outs
    lin = params["params"]["linear"]  # kernel (R, E, D, H*K), bias (R, E, H*K)
    cols = slice(h * k, (h + 1) * k)
    return (batch_loss[r, :, :, h], batch_correct[r, :, :, h], val_logits[r, :, :, h],
            {"params": {"linear": {"kernel": lin["kernel"][r, :, :, cols], "bias": lin["bias"][r, :, cols]}}})


def grid_arguments(data: HeadData, *, num_outputs: int, config: TrainConfig, pairs: Sequence[tuple[float, float]],
                   seeds: Sequence[int]) -> tuple[list[list[TrainPlan]], tuple]:
    """The plan of every cell, plans[r][h] (seed r, pair h), and the arguments of grid_program."""
    plans = [[make_plan(n_train=len(data.y_train), feature_dim=data.x_train.shape[1], num_outputs=num_outputs,
                        config=dataclasses.replace(config, lr=lr, weight_decay=wd, seed=seed))
              for lr, wd in pairs] for seed in seeds]
    firsts = [row[0] for row in plans]  # init and batch order depend on the seed only
    _, mask = padded_batches(firsts[0])
    # every head of a seed starts from the seed's init: its (K, D) weight repeated for the H pairs
    params = jax.tree.map(lambda *p: np.stack(p), *[params_from_linear(np.tile(p.weight, (len(pairs), 1)),
                                                                       np.tile(p.bias, len(pairs))) for p in firsts])
    idx = np.stack([padded_batches(p)[0] for p in firsts])  # (R, E, B, S)
    lr_table = np.stack([p.lrs for p in plans[0]], axis=1).astype(np.float32)  # (E, H)
    wd_table = np.asarray([wd for _, wd in pairs], dtype=np.float32)  # (H,)
    return plans, (params, data.x_train, data.y_train.astype(np.int32), data.x_val, idx, mask, lr_table, wd_table)


def select_cell(cells: Sequence[GridCell]) -> int:
    """Index of the selected cell: best mean val acc over seeds, then lower mean val loss, then earliest."""
    def key(i: int):
        acc, loss = cells[i].val_acc.mean, cells[i].val_loss.mean
        return (-(acc if math.isfinite(acc) else -math.inf), loss if math.isfinite(loss) else math.inf, i)

    return min(range(len(cells)), key=key)


def fit_grid(train: Arrays, val: Arrays, test: Arrays, *, num_classes: int, config: TrainConfig,
             lrs: Sequence[float], weight_decays: Sequence[float], seeds: Sequence[int],
             class_names: Sequence[str] | None = None) -> GridFit:
    """Train every (lr, weight decay, seed) head in one compiled program and select a pair on val.

    Args:
        train, val, test: (features (N, D) float32|float16, labels (N,)), as for head.fit_head.
        num_classes: C >= 2.
        config: everything else (optimizer, momentum, epochs, batch size, scheduler, standardize);
            its lr, weight_decay and seed are replaced by the grid's.
        lrs, weight_decays, seeds: the grid axes, each value once.
        class_names: C names for the summaries.

    Returns:
        GridFit; every cell's HeadFit carries the timings of the whole program.
    """
    lrs = tuple(float(v) for v in _unique("The lr list", lrs))
    weight_decays = tuple(float(v) for v in _unique("The weight-decay list", weight_decays))
    seeds = tuple(int(v) for v in _unique("The seed list", seeds))
    data: HeadData = prepare_data(train, val, test, num_classes=num_classes, config=config, class_names=class_names)
    num_outputs = num_outputs_for(num_classes)
    pairs = [(lr, wd) for lr in lrs for wd in weight_decays]
    plans, args = grid_arguments(data, num_outputs=num_outputs, config=config, pairs=pairs, seeds=seeds)

    t0 = time.perf_counter()
    weights = class_weights(labels=data.y_train, num_classes=num_classes, spec=config.class_weight)
    compiled = grid_program(num_outputs=num_outputs, num_pairs=len(pairs), config=config,
                            class_weights=weights).lower(*args).compile()
    t1 = time.perf_counter()
    outs = jax.tree.map(np.asarray, jax.block_until_ready(compiled(*args)))
    t2 = time.perf_counter()
    timings = {"compile_s": t1 - t0, "train_s": t2 - t1}

    cells = []
    for h, (lr, wd) in enumerate(pairs):
        fits = tuple(fit_from_outputs(_cell_outputs(outs, r, h, num_outputs), plan=plans[r][h], data=data,
                                      timings=timings) for r in range(len(seeds)))
        cells.append(GridCell(lr=lr, weight_decay=wd, fits=fits,
                              val_acc=mean_interval([f.summary.best_val_acc for f in fits]),
                              val_loss=mean_interval([f.summary.best_val_loss for f in fits]),
                              test_acc=mean_interval([f.summary.test_acc for f in fits])))
    return GridFit(lrs=lrs, weight_decays=weight_decays, seeds=seeds, cells=cells, selected=select_cell(cells),
                   timings=timings)


def seed_stats(fits: Sequence[HeadFit]) -> dict:
    """Intervals over seeds of the study's columns, as metrics.json stores them under extra["seed_stats"]."""
    return {"n": len(fits), **{k: mean_interval([getattr(f.summary, k) for f in fits]).to_dict()
                               for k in ("train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc")}}
