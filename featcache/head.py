"""The linear head on cached features, trained in JAX as ONE jit-compiled program.

All epochs and all mini-batches run inside nested `lax.scan`s (epochs outside, batches
inside); the program returns, per epoch, each batch's mean loss and correct count, the val
logits and the parameters, so Python only turns those into metrics afterwards. The plan
(featcache.plan) fixes init, batch order and lr per epoch, and the optax chains reproduce
torch.optim's arithmetic, so `featcache finetune --freeze-backbone` follows the same steps.

Pure fitting on arrays: no cache file, no run directory, no printing (featcache.head_runs does those).

N = training rows, D = feature dim, C = classes, K = logits (plan.num_outputs_for(C)),
E = epochs, B = batches per epoch, S = batch size.

Never imports torch (tests check `sys.modules`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from featcache import metrics
from featcache.config import TrainConfig
from featcache.metrics import EpochRecord, RunSummary
from featcache.plan import TrainPlan, check_config, class_weights, make_plan, num_outputs_for
from featcache.runs import HeadWeights
from featcache.standardize import Arrays, HeadData, prepare_splits

# torch.optim.Adam / AdamW defaults
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class LinearHead(NamedTuple):
    """logits = x @ kernel + bias, kernel (D, K) = nn.Linear.weight.T; `apply(params, x)` as a Flax Dense layer
    named "linear" computes it (the same params tree), without importing Flax (0.4 s of every head-train start)."""

    num_outputs: int

    def apply(self, params: dict, x: jax.Array) -> jax.Array:  # (N, D) -> (N, K)
        linear = params["params"]["linear"]
        # HIGHEST: full float32 matmuls on GPUs too (torch does not use TF32 for matmuls by default)
        return jnp.dot(x, linear["kernel"], precision=jax.lax.Precision.HIGHEST) + linear["bias"]


def enable_compilation_cache(directory: str | Path) -> None:
    """Keep JAX's compiled programs in `directory` (its persistent compilation cache, keyed by the program and its
    shapes): a second head-train of the same shapes loads its program instead of compiling it (~0.7 s). A
    JAX_COMPILATION_CACHE_DIR set by the user wins; every program is kept, however fast it compiled."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def params_from_linear(weight: np.ndarray, bias: np.ndarray) -> dict:
    """Flax params of LinearHead from nn.Linear-layout weight (K, D) and bias (K,)."""
    return {"params": {"linear": {"kernel": jnp.asarray(np.asarray(weight, np.float32).T),
                                  "bias": jnp.asarray(np.asarray(bias, np.float32))}}}


def linear_from_params(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """nn.Linear-layout (weight (..., K, D), bias (..., K)) as numpy; leading axes (epochs) kept."""
    p = params["params"]["linear"]
    return np.swapaxes(np.asarray(p["kernel"]), -1, -2), np.asarray(p["bias"])


def masked_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                class_weights: jax.Array | None = None) -> jax.Array:
    """Mean loss over the rows with mask 1 (torch's BCEWithLogitsLoss / CrossEntropyLoss, reduction="mean").

    logits (S, K); labels (S,) int32; mask (S,) float32. K == 1: BCE on the one logit, class 1
    positive; K > 1: softmax cross-entropy. Padded rows (mask 0) contribute neither loss nor gradient.
    class_weights (C,) float32 (plan.class_weights) or None: the class-weighted mean
    sum(w[y] * l) / sum(w[y]) over the masked rows, as metrics.weighted_loss_from_logits defines it.
    """
    if logits.shape[-1] == 1:
        per_row = optax.losses.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
    else:
        per_row = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    weight = mask if class_weights is None else mask * class_weights[labels]  # (S,)
    return jnp.sum(per_row * weight) / jnp.sum(weight)


def predictions(logits: jax.Array) -> jax.Array:
    """(S,) predicted classes, the rule of metrics.predict: logit > 0 for K == 1, first argmax otherwise."""
    if logits.shape[-1] == 1:
        return (logits[:, 0] > 0).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class TorchAdamState(NamedTuple):
    count: jax.Array  # () int32: steps taken
    mu: optax.Updates  # first moment (torch exp_avg)
    nu: optax.Updates  # second moment (torch exp_avg_sq)


def scale_by_torch_adam(b1: float = ADAM_BETAS[0], b2: float = ADAM_BETAS[1],
                        eps: float = ADAM_EPS) -> optax.GradientTransformation:
    """Adam's direction m_hat / (sqrt(v_hat) + eps) evaluated as torch.optim.Adam does.

    Same algorithm as optax.scale_by_adam, but optax computes the bias correction 1 - b**t in
    float32 from b rounded to float32 (1 - 0.999 -> 0.000999987: 1.3e-5 relative error at step
    1), which torch computes in float64. Here 1 - b**t = -expm1(t * log b) with log b taken in
    float64, exact to float32 rounding; moments update as torch's lerp_/addcmul_.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TorchAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * (g * g), state.nu, updates)
        count = state.count + 1
        t = count.astype(jnp.float32)
        bias_correction1 = -jnp.expm1(t * log_b1)
        bias_correction2_sqrt = jnp.sqrt(-jnp.expm1(t * log_b2))
        direction = jax.tree.map(lambda m, v: (m / bias_correction1) / (jnp.sqrt(v) / bias_correction2_sqrt + eps),
                                 mu, nu)
        return direction, TorchAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def update_direction(config: TrainConfig, *, weight_decay: float | jax.Array | None = None
                     ) -> optax.GradientTransformation:
    """The optax chain whose output d gives torch.optim's step as p <- p - lr * d.

    weight_decay: None = config.weight_decay; otherwise it replaces it and may be traced: a scalar or
    an array broadcast against every parameter (one value per output, for the heads side by side of
    training_program), so the wd term is then always in the chain (adding 0 * p).

    The epoch's lr is applied by the caller (it changes per epoch), so every term torch scales
    by lr sits inside d:
    * sgd: d = g + wd*p; with momentum, buf = momentum*buf + d (buf = d at the first step,
      as torch: optax.trace starts from zeros) and d = buf, or d + momentum*buf with nesterov.
    * adam: g + wd*p (L2, as torch.optim.Adam), then m_hat / (sqrt(v_hat) + eps).
    * adamw: m_hat / (sqrt(v_hat) + eps) + wd*p, wd*p taken before the step: torch's decoupled
      p <- p - lr*wd*p followed by the Adam step.
    """
    wd = float(config.weight_decay) if weight_decay is None else weight_decay
    decay = weight_decay is not None or bool(wd)
    parts: list[optax.GradientTransformation] = []
    if config.optimizer == "sgd":
        if decay:
            parts.append(optax.add_decayed_weights(wd))
        if config.momentum:
            parts.append(optax.trace(decay=float(config.momentum), nesterov=bool(config.nesterov)))
    elif config.optimizer == "adam":
        if decay:
            parts.append(optax.add_decayed_weights(wd))
        parts.append(scale_by_torch_adam())
    elif config.optimizer == "adamw":
        parts.append(scale_by_torch_adam())
        if decay:
            parts.append(optax.add_decayed_weights(wd))
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    return optax.chain(*parts) if parts else optax.identity()


def padded_batches(plan: TrainPlan) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (E, B, S) int32 and mask (E, B, S) float32 of every batch; the short last batch
    is padded with row 0 under mask 0."""
    e, n, s, b = plan.epochs, plan.n_train, plan.batch_size, plan.num_batches
    idx = np.zeros((e, b * s), dtype=np.int32)
    idx[:, :n] = plan.perms
    mask = np.zeros((e, b * s), dtype=np.float32)
    mask[:, :n] = 1.0
    return idx.reshape(e, b, s), mask.reshape(e, b, s)


def train_program(*, num_outputs: int, config: TrainConfig, class_weights: np.ndarray | None = None) -> Callable:
    """The whole training as one jitted function.

    Returns:
        program(params, x_train (N, D) f32, y_train (N,) i32, x_val (Nv, D) f32, idx (E, B, S) i32,
        mask (E, B, S) f32, lrs (E,) f32) -> (batch_loss (E, B) f32 mean loss of each batch,
        batch_correct (E, B) i32, val_logits (E, Nv, K) f32, epoch_params: params stacked (E, ...)
        as they are at the end of each epoch). class_weights: see masked_loss.
    """
    return jax.jit(training_program(num_outputs=num_outputs, config=config, class_weights=class_weights))


# train_program compiled for given shapes, newest last: a second fit of the same program in one process (the
# seeds of a study row, a notebook's reruns) skips the trace and the compile. Bounded: each holds an executable.
_COMPILED: "collections.OrderedDict[tuple, Callable]" = collections.OrderedDict()
COMPILED_KEEP = 16


def compiled_program(*, num_outputs: int, config: TrainConfig, class_weights: np.ndarray | None,
                     args: tuple) -> Callable:
    """train_program(...).lower(*args).compile(), reused within this process for the same program and shapes.

    The key holds everything the program is built from: num_outputs, the config (its seed and runs_dir set
    aside: the seed only makes the params and batches, which are arguments), the class weights, and the shape,
    dtype and weak type of every argument.
    """
    key = (num_outputs, dataclasses.replace(config, seed=0, runs_dir=""),
           None if class_weights is None else tuple(np.asarray(class_weights, np.float64).tolist()),
           tuple(str(jax.typeof(a)) for a in jax.tree.leaves(args)))  # shape, dtype and weak type
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    compiled = train_program(num_outputs=num_outputs, config=config, class_weights=class_weights).lower(*args).compile()
    _COMPILED[key] = compiled
    while len(_COMPILED) > COMPILED_KEEP:
        _COMPILED.popitem(last=False)
    return compiled


def training_program(*, num_outputs: int, config: TrainConfig, heads: int | None = None,
                     class_weights: np.ndarray | None = None) -> Callable:
    """The un-jitted training program: one head (what `train_program` compiles) or H heads side by side.

    heads=None: program(params, x_train, y_train, x_val, idx, mask, lrs (E,)), as train_program.
    heads=H: H independent heads share the batches as one Dense of H*K outputs (head h owns outputs
    h*K .. h*K+K-1), each with its own lr and weight decay (config.lr and config.weight_decay are
    then ignored): program(params: kernel (D, H*K), bias (H*K,), x_train, y_train, x_val, idx, mask,
    lrs (E, H) f32, weight_decays (H,) f32) -> (batch_loss (E, B, H), batch_correct (E, B, H),
    val_logits (E, Nv, H, K), epoch_params). The loss is the sum of the heads' losses, whose gradient
    for head h is head h's own gradient, and the optimizer is elementwise, so every head takes the
    steps it takes alone; but the H heads cost one matrix product per step instead of H
    matrix-vector products (featcache.sweep runs its grid this way).
    class_weights: (C,) of plan.class_weights or None, the same for every head (see masked_loss).
    """
    multi = heads is not None

    def program(params, x_train, y_train, x_val, idx, mask, lrs, *weight_decays):
        steps = head_steps(num_outputs=num_outputs, config=config, heads=heads,
                           weight_decays=weight_decays[0] if multi else None, class_weights=class_weights)

        def epoch_step(carry, epoch):
            idx_e, mask_e, lr = epoch  # (B, S), (B, S), () or (H,)

            def batch_step(carry, batch):
                rows, m = batch  # (S,), (S,)
                return steps.batch(carry, x_train[rows], y_train[rows], m, lr)

            carry, (losses, correct) = jax.lax.scan(batch_step, carry, (idx_e, mask_e))
            return carry, (losses, correct, steps.logits(carry, x_val), steps.params(carry))

        _, (losses, correct, val_logits, epoch_params) = jax.lax.scan(epoch_step, steps.init(params),
                                                                      (idx, mask, lrs))
        if multi:
            return losses, correct, val_logits, epoch_params
        return losses[..., 0], correct[..., 0], val_logits[:, :, 0], epoch_params

    return program


class HeadSteps(NamedTuple):
    """The one training step and its companions, as pure functions over a carry (params, optimizer state).

    training_program scans `batch` over all epochs in one program; featcache.stream calls it block by
    block on rows read from disk. The same function, so both take the same steps.
    """

    init: Callable  # params (flax, as params_from_linear) -> carry
    batch: Callable  # (carry, xb (S, D), yb (S,) i32, mask (S,) f32, lr () or (H,)) -> (carry, (loss (H,), correct (H,)))
    logits: Callable  # (carry, x (M, D)) -> (M, H, K)
    params: Callable  # carry -> flax params, as params_from_linear gives them


def head_steps(*, num_outputs: int, config: TrainConfig, heads: int | None = None,
               weight_decays: jax.Array | None = None, class_weights: np.ndarray | None = None) -> HeadSteps:
    """The HeadSteps of one head (heads=None) or H heads side by side (see training_program).

    weight_decays: (H,) per head with heads=H (may be traced), else None for config.weight_decay.
    class_weights: (C,) loss weight per class (plan.class_weights of the train labels) or None.
    """
    multi, num_heads = heads is not None, heads or 1
    cw = None if class_weights is None else jnp.asarray(np.asarray(class_weights, np.float32))  # (C,)
    model = LinearHead(num_outputs * num_heads)

    def per_head(logits):  # (M, H*K) -> (M, H, K)
        return logits.reshape(logits.shape[0], num_heads, num_outputs)

    def per_output(values):  # (H,) per head -> (H*K, 1) per output
        return jnp.repeat(values, num_outputs)[:, None]

    # The parameters are carried with the output axis first: kernel (H*K, D) as nn.Linear.weight, bias
    # (H*K, 1). The step's products then take the forms XLA's CPU matmul kernels accept as they are
    # (x @ W' and dlogits' @ x), with no transposed copy of the kernel in every step, and a per-output
    # value (H*K, 1) broadcasts against both leaves. Exact: transposes and reshapes compute nothing.
    def to_carried(params):
        linear = params["params"]["linear"]
        return {"params": {"linear": {"kernel": jnp.swapaxes(linear["kernel"], -1, -2),
                                      "bias": linear["bias"][..., None]}}}

    def from_carried(carried):
        linear = carried["params"]["linear"]
        return {"params": {"linear": {"kernel": jnp.swapaxes(linear["kernel"], -1, -2),
                                      "bias": linear["bias"][..., 0]}}}

    # per output column: head h's lr and weight decay repeated over its K outputs
    tx = update_direction(config, weight_decay=per_output(weight_decays) if multi else None)

    def init(params):
        carried = to_carried(params)
        return carried, tx.init(carried)

    def batch(carry, xb, yb, m, lr):
        params, opt_state = carry
        step_lr = per_output(lr) if multi else lr

        def loss_fn(p):
            logits = per_head(model.apply(from_carried(p), xb))  # (S, H, K)
            losses = jax.vmap(lambda x: masked_loss(x, yb, m, cw), in_axes=1)(logits)  # (H,)
            return jnp.sum(losses), (losses, logits)

        (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        direction, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda d: -step_lr * d, direction))
        correct = jnp.sum((jax.vmap(predictions, in_axes=1)(logits) == yb) & (m > 0), axis=1)  # (H,)
        return (params, opt_state), (loss, correct)

    def logits(carry, x):
        return per_head(model.apply(from_carried(carry[0]), x))

    def params(carry):
        return from_carried(carry[0])

    return HeadSteps(init=init, batch=batch, logits=logits, params=params)


@dataclass(frozen=True)
class HeadFit:
    """Everything one training of the head produced (arrays in numpy)."""

    history: list[EpochRecord]
    selected: int  # index into history (selected epoch = history[selected].epoch)
    summary: RunSummary
    epoch_weights: np.ndarray  # (E, K, D) float32, end of each epoch
    epoch_biases: np.ndarray  # (E, K) float32
    weight: np.ndarray  # (K, D) of the selected epoch, nn.Linear layout
    bias: np.ndarray  # (K,)
    mean: np.ndarray | None  # (D,) float32 with --standardize, else None
    std: np.ndarray | None  # (D,)
    test_logits: np.ndarray  # (N_test, K) float32 of the selected epoch
    timings: dict[str, float]  # compile_s, train_s
    plan: TrainPlan

    @property
    def diverged(self) -> bool:
        return self.summary.diverged

    @property
    def head_weights(self) -> HeadWeights:
        """The selected epoch's head, as head.npz stores it."""
        return HeadWeights(weight=self.weight, bias=self.bias, mean=self.mean, std=self.std)


def prepare_data(train: Arrays, val: Arrays, test: Arrays, *, num_classes: int, config: TrainConfig,
                 class_names: Sequence[str] | None = None) -> HeadData:
    """Check the config and the splits and standardize them under config.standardize (standardize.prepare_splits)."""
    check_config(config)
    return prepare_splits(train, val, test, num_classes=num_classes, standardize=config.standardize,
                          class_names=class_names)


def program_args(plan: TrainPlan, data: HeadData) -> tuple:
    """The arguments of `train_program` for one plan: (params, x_train, y_train, x_val, idx, mask, lrs)."""
    idx, mask = padded_batches(plan)
    return (params_from_linear(plan.weight, plan.bias), data.x_train, data.y_train.astype(np.int32), data.x_val,
            idx, mask, plan.lrs.astype(np.float32))


def fit_head(train: Arrays, val: Arrays, test: Arrays, *, num_classes: int, config: TrainConfig,
             class_names: Sequence[str] | None = None) -> HeadFit:
    """Train the linear head on in-memory features and score it.

    Args:
        train, val, test: (features (N, D) float32|float16, labels (N,) int in [0, num_classes)).
        num_classes: C >= 2; the head has plan.num_outputs_for(C) logits (BCE on one, or softmax CE).
        config: the TrainConfig (runs_dir is not used here).
        class_names: C names for the summary; default "0", "1", ...

    Returns:
        HeadFit. Timings: compile_s (lower + compile) and train_s (the compiled program, data
        transfer included). Each history record's seconds = train_s / epochs (the epochs run
        in one program); summary.training_time = compile_s + train_s.
    """
    data = prepare_data(train, val, test, num_classes=num_classes, config=config, class_names=class_names)
    num_outputs = num_outputs_for(num_classes)
    plan = make_plan(n_train=len(data.y_train), feature_dim=data.x_train.shape[1], num_outputs=num_outputs,
                     config=config)
    args = program_args(plan, data)

    t0 = time.perf_counter()
    weights = class_weights(labels=data.y_train, num_classes=num_classes, spec=config.class_weight)
    compiled = compiled_program(num_outputs=num_outputs, config=config, class_weights=weights, args=args)
    t1 = time.perf_counter()
    outs = jax.block_until_ready(compiled(*args))
    t2 = time.perf_counter()
    return fit_from_outputs(jax.tree.map(np.asarray, outs), plan=plan, data=data,
                            timings={"compile_s": t1 - t0, "train_s": t2 - t1})


def fit_from_outputs(outs: tuple, *, plan: TrainPlan, data: HeadData, timings: dict[str, float]) -> HeadFit:
    """One training's HeadFit from the outputs of its program (as numpy): history, selected epoch, test scores.

    Args:
        outs: (batch_loss (E, B), batch_correct (E, B), val_logits (E, Nv, K), epoch_params), see train_program.
        plan: the plan the program followed.
        data: the splits it trained on.
        timings: compile_s and train_s of the program; history seconds = train_s / E,
            summary.training_time = compile_s + train_s.
    """
    batch_loss, batch_correct, val_logits, epoch_params = outs
    history = [epoch_record(plan, e, batch_loss=batch_loss[e], batch_correct=batch_correct[e],
                            val_logits=val_logits[e], y_val=data.y_val, num_classes=data.num_classes,
                            seconds=timings["train_s"] / plan.epochs)
               for e in range(plan.epochs)]
    epoch_weights, epoch_biases = linear_from_params(epoch_params)
    # numpy, so no second compile
    return finish_fit(history, plan=plan, epoch_weights=epoch_weights, epoch_biases=epoch_biases,
                      test_logits=lambda w, b: data.x_test @ w.T + b, y_test=data.y_test,
                      class_names=data.class_names, mean=data.mean, std=data.std, timings=timings)


def epoch_record(plan: TrainPlan, epoch: int, *, batch_loss: np.ndarray, batch_correct: np.ndarray,
                 val_logits: np.ndarray, y_val: np.ndarray, num_classes: int, seconds: float) -> EpochRecord:
    """The record of epoch `epoch` (0-based) from its batches' mean losses (B,) and correct counts (B,) and
    its end-of-epoch val logits (Nv, K): what every head-train path keeps of an epoch."""
    sizes = plan.batch_sizes()
    # loss of each batch * its size, in float64: what `running_loss += loss.item() * bs` sums
    train_loss, train_acc = metrics.epoch_train_metrics(np.asarray(batch_loss, np.float64) * sizes,
                                                        np.asarray(batch_correct), sizes)
    val_loss, val_acc = metrics.evaluate(val_logits, y_val, num_classes)
    return EpochRecord(epoch=epoch + 1, lr=float(plan.lrs[epoch]), train_loss=train_loss, train_acc=train_acc,
                       val_loss=val_loss, val_acc=val_acc, seconds=seconds)


def finish_fit(history: list[EpochRecord], *, plan: TrainPlan, epoch_weights: np.ndarray, epoch_biases: np.ndarray,
               test_logits: Callable[[np.ndarray, np.ndarray], np.ndarray], y_test: np.ndarray,
               class_names: Sequence[str], mean: np.ndarray | None, std: np.ndarray | None,
               timings: dict[str, float]) -> HeadFit:
    """Select the epoch, score the test split with its parameters and gather the HeadFit.

    epoch_weights (E, K, D) / epoch_biases (E, K): the head at the end of each epoch; test_logits(weight (K, D),
    bias (K,)) -> (N_test, K) float32 of the test split; timings: compile_s and train_s at least
    (summary.training_time = compile_s + train_s).
    """
    selected = metrics.select_epoch(history)
    weight, bias = epoch_weights[selected], epoch_biases[selected]
    logits = test_logits(weight, bias)
    summary = metrics.summarize(history, selected, test_logits=logits, test_labels=y_test,
                                class_names=list(class_names), train_seconds=timings["compile_s"] + timings["train_s"])
    return HeadFit(history=history, selected=selected, summary=summary, epoch_weights=epoch_weights,
                   epoch_biases=epoch_biases, weight=weight, bias=bias, mean=mean, std=std,
                   test_logits=logits, timings=dict(timings), plan=plan)
