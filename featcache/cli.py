"""The `featcache` command line: options -> config -> one library call -> report.

Nothing heavy is imported at module level: `featcache --help` must not start torch or jax.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import click

from featcache.config import DataConfig, ExtractConfig, TrainConfig
from featcache.errors import UserError

# The registry's names, for click.Choice; backbones.py keeps torch imports inside functions.
from featcache.backbones import BACKBONES  # noqa: E402

MODEL_CHOICE = click.Choice(sorted(BACKBONES))


class _Group(click.Group):
    """Turns a UserError into one line on stderr and its exit code; bugs still raise."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featcache")
def cli():
    """Transfer learning on small image datasets: cache a backbone's features once,
    train linear heads on the cache in JAX, compare with fine-tuning in PyTorch.

    \b
    Quick start (no network needed):
      featcache demo
    Your own data (ROOT/{train,val,test}/<class>/<image>):
      featcache extract --model resnet18 --data ROOT
      featcache head-train --model resnet18 --data ROOT
    """


def main():  # console-script entry point
    cli(prog_name="featcache")


# --------------------------------------------------------------------------- shared options


def data_options(f):
    """--data and the carving of missing val/test splits."""
    @click.option("--data", "data", required=True, metavar="DIR|demo",
                  help="Dataset folder ROOT/{train,val,test}/<class>/<image>, or 'demo' (built-in, 2 classes) "
                       "or 'demo3' (3 classes).")
    @click.option("--val-fraction", default=0.15, show_default=True,
                  help="Fraction of train carved out as val when ROOT/val is missing (stratified).")
    @click.option("--test-fraction", default=0.15, show_default=True,
                  help="Fraction of train carved out as test when ROOT/test is missing (stratified).")
    @click.option("--split-seed", default=0, show_default=True, help="Seed of the carved split.")
    @functools.wraps(f)
    def wrapper(*args, data, val_fraction, test_fraction, split_seed, **kwargs):
        kwargs["data_config"] = DataConfig(root=data, val_fraction=val_fraction,
                                           test_fraction=test_fraction, split_seed=split_seed)
        return f(*args, **kwargs)
    return wrapper


def backbone_options(f):
    """--weights, --image-size, --dtype, --cache-dir: what selects one cache file."""
    @click.option("--weights", default="imagenet", show_default=True, metavar="imagenet|none|PATH",
                  help="torchvision's default pretrained weights (downloaded once), random init, "
                       "or a state_dict file of the full torchvision model.")
    @click.option("--image-size", type=int, default=None, metavar="N",
                  help="Crop size fed to the network (default: the model's native size, 224).")
    @click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
                  help="Storage type of the cached features.")
    @click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False),
                  help="Folder of the cache files.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper


def train_options(f):
    """The training options shared by head-train and finetune: same names, same defaults."""
    defaults = TrainConfig()
    options = [
        click.option("--epochs", default=defaults.epochs, show_default=True, help="Training epochs."),
        click.option("--batch-size", default=defaults.batch_size, show_default=True,
                     help="Mini-batch size (the last short batch is kept)."),
        click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default=defaults.optimizer,
                     show_default=True, help="Same arithmetic as torch.optim."),
        click.option("--lr", default=defaults.lr, show_default=True, help="Initial learning rate."),
        click.option("--momentum", default=defaults.momentum, show_default=True, help="SGD momentum."),
        click.option("--nesterov", is_flag=True, help="Nesterov momentum (SGD)."),
        click.option("--weight-decay", default=defaults.weight_decay, show_default=True,
                     help="L2 penalty (sgd, adam) or decoupled decay (adamw)."),
        click.option("--scheduler", type=click.Choice(["cosine", "none"]), default=defaults.scheduler,
                     show_default=True, help="cosine: CosineAnnealingLR(T_max=epochs) stepped per epoch, to 0."),
        click.option("--seed", default=defaults.seed, show_default=True,
                     help="Seed of head init and batch order (the same in both modes)."),
        click.option("--runs-dir", default=defaults.runs_dir, show_default=True, type=click.Path(file_okay=False),
                     help="Where run directories are written."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _train_config(kwargs: dict, **extra) -> TrainConfig:
    names = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
             "scheduler", "seed", "runs_dir")
    return TrainConfig(**{n: kwargs.pop(n) for n in names}, **extra)


# --------------------------------------------------------------------------- commands


@cli.command()
def models():
    """List the backbones: name, feature dim D, default weights, input size.

    \b
    Example:
      featcache models
    """
    from featcache.backbones import describe_registry
    from featcache.report import print_table

    rows = describe_registry()
    print_table(rows, title="Backbones (featcache extract --model NAME)")


@cli.command("demo-data")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option("--classes", "num_classes", type=click.IntRange(2, 3), default=2, show_default=True,
              help="2: normal vs abnormal cells; 3: normal, elongated, clustered.")
@click.option("--image-size", default=64, show_default=True, help="Side of the square PNG images.")
def demo_data(directory, seed, num_classes, image_size):
    """Write the built-in synthetic microscopy-like dataset to DIRECTORY.

    \b
    Example:
      featcache demo-data ./demo-data && featcache extract --model resnet18 --data ./demo-data --weights none
    """
    from featcache.demo import make_demo_dataset

    root = make_demo_dataset(directory, seed=seed, num_classes=num_classes, image_size=image_size)
    counts = {split.name: sum(1 for _ in split.rglob("*.png")) for split in sorted(root.iterdir())
              if split.is_dir()}
    click.echo(f"wrote {sum(counts.values())} images to {root} " +
               ", ".join(f"{k}={v}" for k, v in counts.items()))


@cli.command()
@click.option("--model", "models_", multiple=True, required=True, type=MODEL_CHOICE,
              help="Backbone; repeat to extract several in turn.")
@data_options
@backbone_options
@click.option("--batch-size", default=64, show_default=True, help="Images per forward pass.")
@click.option("--num-workers", type=int, default=-1, show_default="auto: half the cores, at most 4",
              help="Decode worker processes.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]))
@click.option("--amp", is_flag=True, help="bf16 autocast (CUDA only).")
@click.option("--wait", is_flag=True, help="If another process is writing the same cache, wait for it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(models_, data_config, weights, image_size, dtype, cache_dir, batch_size, num_workers,
            device, amp, wait, quiet):
    """Run each backbone ONCE over every split and cache its penultimate features (HDF5).

    A second run with the same inputs is a cache hit and does no forward pass.

    \b
    Example:
      featcache extract --model resnet18 --model googlenet --data ./chest_xray
      featcache extract --model resnet18 --data demo --weights none --image-size 64
    """
    from featcache.extract import extract as run_extract

    for model in models_:
        config = ExtractConfig(model=model, data=data_config, weights=weights, image_size=image_size,
                               batch_size=batch_size, num_workers=num_workers, dtype=dtype, device=device,
                               amp=amp, cache_dir=cache_dir, wait=wait)
        run_extract(config, progress=not quiet, log=click.echo)


@cli.group("cache")
def cache_group():
    """Inspect cache files: ls, verify."""


@cache_group.command("ls")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
def cache_ls(cache_dir):
    """List the caches: model, dataset, splits (N), D, dtype, size, status.

    \b
    Example:
      featcache cache ls --cache-dir cache
    """
    from featcache.cache import list_caches
    from featcache.report import print_table

    rows = [{
        "dataset": r["dataset"], "model": r.get("model") or "?", "weights": r.get("weights") or "?",
        "splits": " ".join(f"{s}={v['n']}" if v["n"] == v["done"] else f"{s}={v['done']}/{v['n']}"
                           for s, v in r["splits"].items()),
        "D": r.get("feature_dim") or "?", "dtype": r.get("dtype") or "?",
        "size": f"{r['size'] / 1e6:.1f} MB", "status": r["status"], "file": Path(r["path"]).name,
    } for r in list_caches(cache_dir)]
    if not rows:
        click.echo(f"no caches in {cache_dir}")
        return
    print_table(rows, title=f"Caches in {cache_dir}")


@cache_group.command("verify")
@click.argument("file", type=click.Path(dir_okay=False))
def cache_verify(file):
    """Check one cache file: it opens, shapes agree, no missing rows, attributes present.

    \b
    Example:
      featcache cache verify cache/demo-c2-s0-64px/resnet18-none-0123456789ab.h5
    """
    from featcache.cache import verify_cache
    from featcache.errors import EXIT_BAD_CACHE

    problems = verify_cache(file)
    if problems:
        for p in problems:
            click.echo(f"{file}: {p}", err=True)
        sys.exit(EXIT_BAD_CACHE)
    click.echo(f"{file}: ok")


@cli.command("head-train")
@click.option("--cache", "cache_file", type=click.Path(dir_okay=False), default=None,
              help="A cache file from featcache extract (or give --model and --data to find it by key).")
@click.option("--model", type=MODEL_CHOICE, default=None, help="Find the cache of this backbone ...")
@click.option("--data", default=None, metavar="DIR|demo", help="... over this dataset (with --model).")
@click.option("--val-fraction", default=0.15, show_default=True, help="As given to extract (carved splits).")
@click.option("--test-fraction", default=0.15, show_default=True, help="As given to extract (carved splits).")
@click.option("--split-seed", default=0, show_default=True, help="As given to extract (carved splits).")
@backbone_options
@train_options
@click.option("--standardize", is_flag=True, help="Z-score features with the train mean/std (stored in head.npz).")
@click.option("--run-name", default=None, help="Run directory name (default <time>-head-<model>).")
def head_train(cache_file, model, data, val_fraction, test_fraction, split_seed, weights, image_size, dtype,
               cache_dir, standardize, run_name, **kwargs):
    """Train the linear head in JAX on cached features: all epochs in one compiled program.

    \b
    Example:
      featcache head-train --cache cache/demo-c2-s0-64px/resnet18-none-0123456789ab.h5
      featcache head-train --model resnet18 --data demo --weights none --image-size 64 --epochs 30
    """
    from featcache.head import train_head
    from featcache.report import print_summary

    config = _train_config(kwargs, standardize=standardize)
    if cache_file is None:
        cache_file = _find_cache(model, data, DataConfig(root=data or "", val_fraction=val_fraction,
                                                         test_fraction=test_fraction, split_seed=split_seed),
                                 weights=weights, image_size=image_size, dtype=dtype, cache_dir=cache_dir)
    result = train_head(cache=cache_file, config=config, run_name=run_name, progress=True)
    print_summary(result)


def _find_cache(model, data, data_config, *, weights, image_size, dtype, cache_dir) -> str:
    """The cache file of (model, data, weights, ...) by key, or a UserError saying how to create it."""
    from featcache.extract import find_cache

    if not model or not data:
        raise UserError("Give --cache FILE, or --model and --data to find the cache by key.")
    config = ExtractConfig(model=model, data=data_config, weights=weights, image_size=image_size,
                           dtype=dtype, cache_dir=cache_dir)
    path = find_cache(config)
    if path is None:
        cmd = f"featcache extract --model {model} --data {data} --weights {weights}"
        cmd += f" --image-size {image_size}" if image_size else ""
        cmd += f" --dtype {dtype}" if dtype != "float32" else ""
        cmd += f" --cache-dir {cache_dir}" if cache_dir != "cache" else ""
        raise UserError(f"No cache of {model} on {data} with these settings in {cache_dir}; create it with: {cmd}")
    return str(path)


@cli.command()
@click.option("--model", required=True, type=MODEL_CHOICE, help="Backbone to fine-tune.")
@data_options
@click.option("--weights", default="imagenet", show_default=True, metavar="imagenet|none|PATH",
              help="Starting weights (as for extract).")
@click.option("--image-size", type=int, default=None, metavar="N", help="Crop size (default: native, 224).")
@train_options
@click.option("--augment", is_flag=True, help="RandomResizedCrop + horizontal flip on train images.")
@click.option("--freeze-backbone", is_flag=True,
              help="The classic fixed-feature loop: backbone frozen in eval mode, images through it every epoch.")
@click.option("--amp", is_flag=True, help="bf16 autocast (CUDA only).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]))
@click.option("--num-workers", type=int, default=-1, show_default="auto", help="Decode worker processes.")
@click.option("--cache-dir", default="cache", show_default=True, help="Where --data demo is rendered.")
@click.option("--resume", "resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue a killed run from its last finished epoch (its stored settings are used).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune(model, data_config, weights, image_size, augment, freeze_backbone, amp, device, num_workers,
             cache_dir, resume, quiet, **kwargs):
    """Train in PyTorch: the whole network with a new head, or (--freeze-backbone) only the head.

    Same plan (head init, batch order, lr per epoch) and metrics as head-train: with
    --freeze-backbone and no --augment it reports what extract + head-train report.

    \b
    Example:
      featcache finetune --model resnet18 --data demo --weights none --image-size 64 --epochs 5
      featcache finetune --model resnet18 --data ./chest_xray --freeze-backbone
      # after a kill: the same command plus --resume RUN_DIR
      featcache finetune --model resnet18 --data demo --weights none --image-size 64 --epochs 5 \
        --resume runs/20261130-101500-finetune-resnet18
    """
    from featcache.config import FinetuneConfig
    from featcache.errors import DivergedError
    from featcache.finetune import finetune as run_finetune
    from featcache.report import print_summary

    train = _train_config(kwargs)
    config = FinetuneConfig(model=model, data=data_config, weights=weights, image_size=image_size,
                            augment=augment, freeze_backbone=freeze_backbone, amp=amp, device=device,
                            num_workers=num_workers, cache_dir=cache_dir)
    result = run_finetune(config, train, resume=resume, progress=not quiet, log=click.echo)
    print_summary(result)
    if result.diverged:
        raise DivergedError(f"Training diverged ({result.extra.get('diverged_reason')}); lower --lr. "
                            f"The last good checkpoint is in {result.run_dir}.")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--figure", type=click.Path(dir_okay=False), default="comparison.png", show_default=True,
              help="Val accuracy and loss curves of all runs; '' for none.")
def report(run_dirs, fmt, figure):
    """Lay runs side by side: model, mode, train loss/acc, best val loss/acc, test acc, time.

    \b
    Example:
      featcache report runs/*
      featcache report runs/*-head-resnet18 runs/*-frozen-resnet18 --format markdown
    """
    from featcache.report import compare_runs

    click.echo(compare_runs(run_dirs, format=fmt, figure=figure or None), nl=False)
    if figure:
        click.echo(f"figure: {figure}", err=True)


@cli.command()
@click.option("--model", default="resnet18", show_default=True, type=MODEL_CHOICE)
@click.option("--weights", default="none", show_default=True, metavar="imagenet|none|PATH",
              help="'none' needs no network; 'imagenet' downloads torchvision's weights once.")
@click.option("--image-size", default=64, show_default=True, help="Crop size (the demo images are 64 px).")
@click.option("--epochs", default=30, show_default=True, help="Epochs of head-train and of the frozen loop.")
@click.option("--finetune-epochs", default=3, show_default=True, help="Epochs of the full fine-tune (slowest).")
@click.option("--lr", default=0.01, show_default=True, help="Learning rate of all three trainings (SGD).")
@click.option("--cache-dir", default="cache", show_default=True)
@click.option("--runs-dir", default="runs", show_default=True)
def demo(model, weights, image_size, epochs, finetune_epochs, lr, cache_dir, runs_dir):
    """Run everything on the built-in demo dataset, no network needed.

    demo data -> extract -> head-train (JAX, cached) -> finetune --freeze-backbone (the classic
    loop; same numbers) -> full finetune -> report.

    \b
    Example:
      featcache demo
      featcache demo --model googlenet --epochs 10
    """
    import time

    from featcache.config import FinetuneConfig
    from featcache.datasets import resolve_data_root
    from featcache.extract import extract as run_extract
    from featcache.finetune import finetune as run_finetune
    from featcache.head import train_head
    from featcache.report import compare_runs, print_summary

    root = resolve_data_root("demo", cache_dir=cache_dir)
    click.echo(f"== demo dataset: {root}")
    data = DataConfig(root="demo")
    click.echo(f"\n== 1. extract {model} once (weights {weights}, {image_size} px)")
    t0 = time.perf_counter()
    cache_file = run_extract(ExtractConfig(model=model, data=data, weights=weights, image_size=image_size,
                                           cache_dir=cache_dir), log=click.echo)
    extract_s = time.perf_counter() - t0
    train = TrainConfig(epochs=epochs, lr=lr, runs_dir=runs_dir)
    click.echo(f"\n== 2. head-train on the cache ({epochs} epochs, JAX)")
    head = train_head(cache=cache_file, config=train)
    print_summary(head)
    click.echo(f"\n== 3. the classic frozen loop: images through the backbone every epoch ({epochs} epochs)")
    ft = FinetuneConfig(model=model, data=data, weights=weights, image_size=image_size, cache_dir=cache_dir)
    frozen = run_finetune(dataclasses.replace(ft, freeze_backbone=True), train, log=click.echo)
    print_summary(frozen)
    click.echo(f"\n== 4. full fine-tune ({finetune_epochs} epochs)")
    full = run_finetune(ft, dataclasses.replace(train, epochs=finetune_epochs), log=click.echo)
    print_summary(full)
    click.echo("\n== 5. report")
    figure = Path(runs_dir) / "demo-comparison.png"
    click.echo(compare_runs([head, frozen, full], format="table", figure=figure), nl=False)
    cached_s = extract_s + head.summary.training_time
    click.echo(f"cached frozen mode: extract {extract_s:.1f} s + head {head.summary.training_time:.2f} s; "
               f"classic frozen loop {frozen.summary.training_time:.1f} s "
               f"({frozen.summary.training_time / cached_s:.1f}x); same test acc: "
               f"{head.summary.test_acc:.4f} vs {frozen.summary.test_acc:.4f}")
    click.echo(f"figure: {figure}")
