"""The training plan, decided once in numpy from the seed and followed by both modes.

head-train (JAX) and finetune (PyTorch) take from one `TrainPlan`: the linear head's initial
weight and bias (drawn by PyTorch's `nn.Linear` rule), the permutation of the training rows of
every epoch (cut into batches in order, the last short batch kept as a `DataLoader` with
`drop_last=False` does), and the learning rate of every epoch. Neither mode draws a random
number of its own for the head, so for the same seed they start from the same point and take
the same steps.

Shapes: N = training rows, D = feature dimension, K = number of outputs (1 for two classes,
C for C > 2 classes), E = epochs. Epochs are indexed from 0 here (`plan.lrs[e]`,
`plan.batches(e)`); records shown to users number them from 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from featcache.config import TrainConfig
from featcache.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "none")


def num_outputs_for(num_classes: int) -> int:
    """Logits of the head: one (BCE) for two classes, one per class (softmax CE) for more."""
    if num_classes < 2:
        raise UserError(f"Training needs at least two classes, this data has {num_classes}; add a class folder.")
    return 1 if num_classes == 2 else num_classes


@dataclass(frozen=True, eq=False)
class TrainPlan:
    """Everything random or scheduled about one training run (see the module docstring)."""

    weight: np.ndarray  # (K, D) float32, as nn.Linear.weight
    bias: np.ndarray  # (K,) float32
    perms: np.ndarray  # (E, N) int64: row order of each epoch
    lrs: np.ndarray  # (E,) float64: learning rate used throughout epoch e
    batch_size: int

    @property
    def epochs(self) -> int:
        return int(self.perms.shape[0])

    @property
    def n_train(self) -> int:
        return int(self.perms.shape[1])

    @property
    def num_batches(self) -> int:
        """Batches per epoch, the last one short when batch_size does not divide N."""
        return -(-self.n_train // self.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Row indices (int64, writable copies) of each mini-batch of epoch `epoch` (0-based), in order."""
        perm = self.perms[epoch]
        return [perm[i:i + self.batch_size].copy() for i in range(0, self.n_train, self.batch_size)]

    def batch_sizes(self) -> np.ndarray:
        """(num_batches,) int64: rows of each batch (the same every epoch)."""
        sizes = np.full(self.num_batches, self.batch_size, dtype=np.int64)
        sizes[-1] = self.n_train - self.batch_size * (self.num_batches - 1)
        return sizes


def check_config(config: TrainConfig) -> None:
    """Raise UserError for settings neither mode can train with."""
    if config.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {config.epochs}.")
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}.")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}.")
    if config.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {config.scheduler!r}.")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise UserError(f"--lr must be a positive number, got {config.lr}.")
    if config.weight_decay < 0 or not math.isfinite(config.weight_decay):
        raise UserError(f"--weight-decay must be zero or positive, got {config.weight_decay}.")
    if config.momentum < 0 or not math.isfinite(config.momentum):
        raise UserError(f"--momentum must be zero or positive, got {config.momentum}.")
    if config.optimizer == "sgd" and config.nesterov and config.momentum == 0:
        raise UserError("--nesterov needs a momentum above 0 (as torch.optim.SGD); set --momentum.")


def cosine_lrs(base_lr: float, epochs: int) -> np.ndarray:
    """(epochs,) float64: the lr of each epoch under CosineAnnealingLR(T_max=epochs, eta_min=0).

    The scheduler is stepped once per epoch, so epoch e trains with the lr after e steps. This
    is torch's recursive ("chainable") formula, evaluated in the same order, so the values are
    the floats `scheduler.get_last_lr()` returns, not just close to them.
    """
    lrs = np.empty(epochs, dtype=np.float64)
    lr = float(base_lr)
    for e in range(epochs):
        if e > 0:
            lr = (1 + math.cos(math.pi * e / epochs)) / (1 + math.cos(math.pi * (e - 1) / epochs)) * (lr - 0.0) + 0.0
        lrs[e] = lr
    return lrs


def make_plan(*, n_train: int, feature_dim: int, num_outputs: int, config: TrainConfig) -> TrainPlan:
    """Decide the head init, the batch order of every epoch and the lr of every epoch from config.seed.

    Args:
        n_train: training rows N (>= 1).
        feature_dim: feature dimension D.
        num_outputs: K, from `num_outputs_for(num_classes)`.
        config: epochs, batch_size, lr, scheduler and seed are read here.

    Returns:
        The TrainPlan. Random draws come from two independent numpy streams spawned from the
        seed, so the init does not depend on the number of epochs or rows and the order of
        epoch e does not depend on the epochs after it.
    """
    check_config(config)
    if n_train < 1:
        raise UserError("The training split is empty; nothing to train on.")
    init_seq, order_seq = np.random.SeedSequence(config.seed).spawn(2)

    # nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)) gives bound = gain * sqrt(3 / fan_in)
    # with gain = sqrt(2 / (1 + 5)), i.e. 1 / sqrt(fan_in); the bias uses the same bound.
    bound = 1.0 / math.sqrt(feature_dim) if feature_dim > 0 else 0.0
    init = np.random.default_rng(init_seq)
    weight = init.uniform(-bound, bound, size=(num_outputs, feature_dim)).astype(np.float32)
    bias = init.uniform(-bound, bound, size=(num_outputs,)).astype(np.float32)

    order = np.random.default_rng(order_seq)
    perms = np.stack([order.permutation(n_train) for _ in range(config.epochs)]).astype(np.int64)

    if config.scheduler == "cosine":
        lrs = cosine_lrs(config.lr, config.epochs)
    else:
        lrs = np.full(config.epochs, float(config.lr), dtype=np.float64)

    for a in (weight, bias, perms, lrs):
        a.setflags(write=False)
    return TrainPlan(weight=weight, bias=bias, perms=perms, lrs=lrs, batch_size=int(config.batch_size))


# --------------------------------------------------------------------------- class weights

CLASS_WEIGHT_RULES = "none, balanced or W1,W2,... (one positive weight per class, in class order)"


def parse_class_weight(spec: str) -> str | tuple[float, ...]:
    """"none", "balanced" or the weights (W1, W2, ...) of --class-weight; UserError for anything else.

    Checks the syntax only (each weight a finite number > 0); `class_weights` checks the count.
    """
    text = str(spec).strip().lower()
    if text in ("none", "balanced"):
        return text
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        weights = ()
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"--class-weight must be {CLASS_WEIGHT_RULES}, got {spec!r}.")
    return weights


def class_weights(*, labels: np.ndarray, num_classes: int, spec: str) -> np.ndarray | None:
    """(C,) float64 loss weight of each class for --class-weight `spec`, or None for "none".

    "balanced" is scikit-learn's compute_class_weight("balanced"): N / (C * count of class c) over
    the TRAINING labels; "W1,W2,..." gives the weights as listed. How the losses apply them:
    metrics.weighted_loss_from_logits.

    Args:
        labels: (N,) int training labels in [0, C).
        num_classes: C.
        spec: "none" | "balanced" | "W1,W2,...".
    """
    rule = parse_class_weight(spec)
    if rule == "none":
        return None
    if rule == "balanced":
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        counts = np.bincount(y, minlength=num_classes)[:num_classes]
        if (counts == 0).any():
            missing = int(np.flatnonzero(counts == 0)[0])
            raise UserError(f"--class-weight balanced needs training rows of every class but class {missing} "
                            f"has none; give explicit weights W1,W2,... instead.")
        return len(y) / (num_classes * counts.astype(np.float64))
    if len(rule) != num_classes:
        raise UserError(f"--class-weight lists {len(rule)} weights but the data has {num_classes} classes; "
                        f"give one positive weight per class, in class order.")
    return np.asarray(rule, dtype=np.float64)
