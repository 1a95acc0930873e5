"""The workers of `featcache bench` (paths 4 and 5), each run in its own process, and the head loops they time.

`python -m featcache.bench forward|torch-head|jax-head --option value ...` runs one worker; its last
stdout line is RESULT_MARK followed by one JSON object. `torch_head_loop` and `jax_head_program` are
also what benchmarks/head_bench.py times. torch and jax are imported inside the functions: each
worker pays only its own side's imports, and the torch side never imports jax.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import sys
import time
from typing import Sequence

from featcache.errors import UserError

RESULT_MARK = "BENCH-RESULT "  # a worker's last stdout line: this mark, then one JSON object
HEAD_RUNS = 3  # path 4 times each head (PyTorch loop, JAX program) this many times in its process


def torch_head_loop(train, val, *, num_classes: int, config, device: str = "cpu") -> float:
    """Seconds of a plain PyTorch loop training the linear head on in-memory features.

    The loop as a tutorial writes it, on the same plan as head-train (init, batch order, lr per
    epoch): per batch zero_grad, forward, loss, backward, step, loss.item(); per epoch one val pass;
    metrics from featcache.metrics. train, val: (features (N, D) float32, labels (N,) int64).
    """
    import torch

    from featcache import metrics
    from featcache.finetuning import classification_loss
    from featcache.plan import make_plan, num_outputs_for

    dev = torch.device(device)
    x, y = torch.from_numpy(train[0]).to(dev), torch.from_numpy(train[1]).to(dev)
    xv, yv = torch.from_numpy(val[0]).to(dev), val[1]
    k = num_outputs_for(num_classes)
    plan = make_plan(n_train=len(y), feature_dim=x.shape[1], num_outputs=k, config=config)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    lin = torch.nn.Linear(x.shape[1], k).to(dev)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(plan.weight))
        lin.bias.copy_(torch.tensor(plan.bias))
    opt = torch.optim.SGD(lin.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                          weight_decay=config.weight_decay)

    for epoch in range(plan.epochs):
        for group in opt.param_groups:
            group["lr"] = float(plan.lrs[epoch])
        loss_sums, correct, sizes = [], [], []
        for rows in plan.batches(epoch):
            rows = torch.from_numpy(rows).to(dev)
            xb, yb = x[rows], y[rows]
            opt.zero_grad()
            logits = lin(xb)
            loss = classification_loss(logits, yb)
            loss.backward()
            opt.step()
            loss_sums.append(loss.item() * len(rows))
            pred = metrics.predict(logits.detach().cpu().numpy(), num_classes)
            correct.append(int((pred == yb.cpu().numpy()).sum()))
            sizes.append(len(rows))
        metrics.epoch_train_metrics(loss_sums, correct, sizes)
        with torch.no_grad():
            metrics.evaluate(lin(xv).cpu().numpy(), yv, num_classes)
    sync()
    return time.perf_counter() - t0


def _torch_head_worker(cache: str, epochs: int, batch_size: int, device: str) -> dict:
    """Path 4: load the cached train/val features, warm up one epoch, time E epochs of torch_head_loop.

    The loop is timed HEAD_RUNS times in this process and the median kept: PyTorch's intra-op
    threads on a small shared CPU stall erratically, and one such stall should not be the result.
    """
    t0 = time.perf_counter()
    import torch

    import_s = time.perf_counter() - t0
    from featcache.backbones import pick_device
    from featcache.cache import load_features
    from featcache.config import TrainConfig

    pick_device(device)
    t0 = time.perf_counter()
    (xt, yt, meta), (xv, yv, _) = load_features(cache, "train"), load_features(cache, "val")
    train, val = (xt.astype("float32"), yt), (xv.astype("float32"), yv)
    load_s = time.perf_counter() - t0
    num_classes = len(meta["class_names"])
    config = TrainConfig(epochs=epochs, batch_size=batch_size)
    warmup_s = torch_head_loop(train, val, num_classes=num_classes, config=dataclasses.replace(config, epochs=1),
                               device=device)
    runs = [torch_head_loop(train, val, num_classes=num_classes, config=config, device=device)
            for _ in range(HEAD_RUNS)]
    return {"seconds": statistics.median(runs), "runs_s": runs, "warmup_s": warmup_s, "import_s": import_s,
            "load_s": load_s,
            "feature_dim": int(xt.shape[1]), "torch_threads": torch.get_num_threads()}


def jax_head_program(train, val, *, num_classes: int, config, runs: int) -> dict:
    """Seconds of head-train's compiled program (featcache.head.train_program) on in-memory features.

    Returns compile_s (lower + compile), first_s (the first call) and runs_s (`runs` further calls,
    inputs already on the device). train, val: (features (N, D) float32, labels (N,) int64).
    """
    import jax
    import numpy as np

    from featcache.head import padded_batches, params_from_linear, train_program
    from featcache.plan import make_plan, num_outputs_for

    k = num_outputs_for(num_classes)
    plan = make_plan(n_train=len(train[1]), feature_dim=train[0].shape[1], num_outputs=k, config=config)
    idx, mask = padded_batches(plan)
    args = jax.device_put((params_from_linear(plan.weight, plan.bias), train[0], train[1].astype(np.int32),
                           val[0], idx, mask, plan.lrs.astype(np.float32)))
    t0 = time.perf_counter()
    compiled = train_program(num_outputs=k, config=config).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "first_s": times[0], "runs_s": times[1:]}


def _jax_head_worker(cache: str, epochs: int, batch_size: int) -> dict:
    """Path 4's JAX side: head-train's program on the cached features, compiled, called once, timed HEAD_RUNS times."""
    t0 = time.perf_counter()
    import jax  # noqa: F401

    import_s = time.perf_counter() - t0
    from featcache.cache import load_features
    from featcache.config import TrainConfig

    t0 = time.perf_counter()
    (xt, yt, meta), (xv, yv, _) = load_features(cache, "train"), load_features(cache, "val")
    load_s = time.perf_counter() - t0
    times = jax_head_program((xt.astype("float32"), yt), (xv.astype("float32"), yv),
                             num_classes=len(meta["class_names"]),
                             config=TrainConfig(epochs=epochs, batch_size=batch_size), runs=HEAD_RUNS)
    return {"seconds": statistics.median(times["runs_s"]), **times, "import_s": import_s, "load_s": load_s}


def _forward_worker(model: str, weights: str, image_size: int, batch_size: int, device: str,
                    counts: str, precision: str = "fp32") -> dict:
    """Path 5: the backbone over in-memory tensors in extract's batches (per split, the short rest last).

    Timed once per arithmetic ("limits"): fp32_nchw (eager float32 in NCHW layout, the reference of issue 6),
    fp32 (channels_last) and, when `precision` resolves to it, bf16; "seconds" is the resolved precision's,
    the forward extract runs (featcache.precision.features).
    """
    t0 = time.perf_counter()
    import torch
    import torchvision  # noqa: F401  (counted in import_s, as extract pays it)

    import_s = time.perf_counter() - t0
    from featcache import precision as arithmetic
    from featcache.backbones import build_backbone, pick_device

    dev = pick_device(device)
    resolved = arithmetic.resolve(precision, str(dev))
    t0 = time.perf_counter()
    backbone = build_backbone(model, weights=weights, image_size=image_size or None)
    net = backbone.net.to(dev).eval()
    build_s = time.perf_counter() - t0
    crop = int(backbone.transform_desc["crop"])
    sizes = [min(batch_size, n - a) for n in map(int, counts.split(",")) for a in range(0, n, batch_size)]
    inputs = {b: torch.randn(b, 3, crop, crop) for b in set(sizes)}

    def nchw(images):  # issue 6's forward limit: eager float32, NCHW
        with torch.inference_mode():
            return net(images.to(dev)).float()

    limits = {"fp32_nchw": _time_forward(nchw, inputs, sizes, dev)}
    net = arithmetic.prepare(net, dev, "fp32")  # channels_last from here on
    for name in ("fp32", "bf16") if resolved == "bf16" else ("fp32",):
        limits[name] = _time_forward(functools.partial(arithmetic.features, net, device=dev, precision=name),
                                     inputs, sizes, dev)
    return {"seconds": limits[resolved], "limits": limits, "precision": resolved, "images": sum(sizes),
            "import_s": import_s, "build_s": build_s, "crop": crop,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def _time_forward(forward, inputs: dict, sizes: list[int], dev) -> float:
    """Seconds of forward(images) over batches of `sizes` (from `inputs`), to numpy, after two warm-up batches."""
    import torch

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: allocator, kernel selection
        forward(inputs[sizes[0]])
    sync()
    t0 = time.perf_counter()
    for b in sizes:
        forward(inputs[b]).cpu().numpy()  # the hand-off to numpy that extract does
    sync()
    return time.perf_counter() - t0


def main(argv: Sequence[str]) -> None:
    """`python -m featcache.bench forward|torch-head|jax-head --option value ...`: print one RESULT_MARK line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m featcache.bench")
    sub = parser.add_subparsers(dest="worker", required=True)
    fw = sub.add_parser("forward")
    for name, kind in (("model", str), ("weights", str), ("image-size", int), ("batch-size", int),
                       ("device", str), ("counts", str), ("precision", str)):
        fw.add_argument(f"--{name}", type=kind, required=True)
    th = sub.add_parser("torch-head")
    for name, kind in (("cache", str), ("epochs", int), ("batch-size", int), ("device", str)):
        th.add_argument(f"--{name}", type=kind, required=True)
    jh = sub.add_parser("jax-head")
    for name, kind in (("cache", str), ("epochs", int), ("batch-size", int)):
        jh.add_argument(f"--{name}", type=kind, required=True)
    args = vars(parser.parse_args(argv))
    worker = {"forward": _forward_worker, "torch-head": _torch_head_worker,
              "jax-head": _jax_head_worker}[args.pop("worker")]
    try:
        result = worker(**args)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(RESULT_MARK + json.dumps(result), flush=True)
