"""The `featcache` command line: options -> config -> one library call -> report.

Nothing heavy is imported at module level: `featcache --help` must not start torch or jax.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import click

from featcache.config import DEFAULT_STREAM_MEMORY_MIB, DataConfig, ExtractConfig, TrainConfig
from featcache.errors import UserError

# The registry's names, for click.Choice; backbones.py keeps torch imports inside functions.
from featcache.backbones import BACKBONES  # noqa: E402

MODEL_CHOICE = click.Choice(sorted(BACKBONES))
# Numeric option types: a value out of range is a usage error (exit 2) before any work starts.
POSITIVE_INT = click.IntRange(min=1)
WORKERS = click.IntRange(min=-1)  # -1 = auto
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE_FLOAT = click.FloatRange(min=0)
FRACTION = click.FloatRange(min=0, max=1, max_open=True)


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
    @click.option("--val-fraction", default=0.15, show_default=True, type=FRACTION,
                  help="Fraction of train carved out as val when ROOT/val is missing (stratified).")
    @click.option("--test-fraction", default=0.15, show_default=True, type=FRACTION,
                  help="Fraction of train carved out as test when ROOT/test is missing (stratified).")
    @click.option("--split-seed", default=0, show_default=True, help="Seed of the carved split.")
    @click.option("--strict", is_flag=True,
                  help="Stop at the first unreadable image instead of skipping it and listing it in failures.csv.")
    @functools.wraps(f)
    def wrapper(*args, data, val_fraction, test_fraction, split_seed, strict, **kwargs):
        kwargs["data_config"] = DataConfig(root=data, val_fraction=val_fraction,
                                           test_fraction=test_fraction, split_seed=split_seed, strict=strict)
        return f(*args, **kwargs)
    return wrapper


def backbone_options(f):
    """--weights, --image-size, --dtype, --cache-dir: what selects one cache file."""
    @click.option("--weights", default="imagenet", show_default=True, metavar="imagenet|none|PATH",
                  help="torchvision's default pretrained weights (downloaded once), random init, "
                       "or a state_dict file of the full torchvision model.")
    @click.option("--image-size", type=POSITIVE_INT, default=None, metavar="N",
                  help="Crop size fed to the network (default: the model's native size, 224).")
    @click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
                  help="Storage type of the cached features.")
    @click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False),
                  help="Folder of the cache files.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper


def launch_options(f):
    """--nproc and --max-restarts: the command in N processes on this machine, under torchrun."""
    @click.option("--nproc", type=click.IntRange(1), default=1, show_default=True,
                  help="Processes on this machine, one per GPU (starts torchrun --nproc-per-node N); the results "
                       "are those of one process. Under torchrun itself, leave it out.")
    @click.option("--max-restarts", type=click.IntRange(0), default=0, show_default=True,
                  help="With --nproc: how often torchrun restarts the processes after one fails; they resume "
                       "(extract: the unfinished shards; finetune: from last.pt).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper


def _launch(ctx: click.Context, *, nproc: int, max_restarts: int) -> None:
    """Run this command again in `nproc` processes under torchrun (the same options, less --nproc); wait for it."""
    from featcache.distributed import launch

    code = launch(ctx.info_name, _forwarded_args(ctx, drop=("nproc", "max_restarts")), nproc=nproc,
                  max_restarts=max_restarts)
    if code:
        raise UserError(f"The {nproc} processes under torchrun failed (exit code {code}); the lines above say why.",
                        exit_code=code)


def _forwarded_args(ctx: click.Context, *, drop: tuple[str, ...]) -> list[str]:
    """The options given on the command line, as arguments again (what torchrun's processes get)."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.name in drop or ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            args += [param.opts[0]] if value else list(param.secondary_opts[:1])
            continue
        for v in (value if param.multiple else [value]):
            if isinstance(v, tuple):  # nargs > 1, or a FloatList
                args += [param.opts[0], *map(str, v)] if param.nargs > 1 else [param.opts[0], ",".join(map(str, v))]
            else:
                args += [param.opts[0], str(v)]
    return args


class FloatList(click.ParamType):
    """A comma-separated list of floats, e.g. 1e-4,1e-3,1e-2 (a single number is a list of one)."""

    name = "X[,X...]"

    def __init__(self, *, min: float | None = None, min_open: bool = False):
        self.min, self.min_open = min, min_open  # every value must be > min (min_open) or >= min

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        if isinstance(value, (int, float)):
            return (float(value),)
        try:
            values = tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            values = ()
        if not values:
            self.fail(f"expected numbers separated by commas, like 1e-4,1e-3; got {value!r}", param, ctx)
        if self.min is not None:
            for v in values:
                if v <= self.min if self.min_open else v < self.min:
                    self.fail(f"{v:g} is not {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        return values


def grid_train_options(f):
    """train_options where --lr and --weight-decay take comma lists (head-train trains the grid)."""
    return train_options(f, grid=True)


def train_options(f, *, grid: bool = False):
    """The training options shared by head-train and finetune: same names, same defaults."""
    defaults = TrainConfig()
    lists = " A comma list trains every value (with --weight-decay: every pair) in one program." if grid else ""
    options = [
        click.option("--epochs", default=defaults.epochs, show_default=True, type=POSITIVE_INT,
                     help="Training epochs."),
        click.option("--batch-size", default=defaults.batch_size, show_default=True, type=POSITIVE_INT,
                     help="Mini-batch size (the last short batch is kept)."),
        click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default=defaults.optimizer,
                     show_default=True, help="Same arithmetic as torch.optim."),
        click.option("--lr", default=defaults.lr, show_default=True,
                     type=FloatList(min=0, min_open=True) if grid else POSITIVE_FLOAT,
                     help="Initial learning rate." + lists),
        click.option("--momentum", default=defaults.momentum, show_default=True, type=NON_NEGATIVE_FLOAT,
                     help="SGD momentum."),
        click.option("--nesterov", is_flag=True, help="Nesterov momentum (SGD)."),
        click.option("--weight-decay", default=defaults.weight_decay, show_default=True,
                     type=FloatList(min=0) if grid else NON_NEGATIVE_FLOAT,
                     help="L2 penalty (sgd, adam) or decoupled decay (adamw)." + lists),
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
    from featcache.reporting import print_table

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
@click.option("--batch-size", default=64, show_default=True, type=POSITIVE_INT, help="Images per forward pass.")
@click.option("--num-workers", type=WORKERS, default=-1, show_default="auto: half the cores, at most 4",
              help="Decode worker processes.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]))
@click.option("--amp", is_flag=True, help="bf16 autocast (CUDA only).")
@click.option("--wait", is_flag=True, help="If another process is writing the same cache, wait for it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@launch_options
def extract(models_, data_config, weights, image_size, dtype, cache_dir, batch_size, num_workers,
            device, amp, wait, quiet, nproc, max_restarts):
    """Run each backbone ONCE over every split and cache its penultimate features (HDF5).

    A second run with the same inputs is a cache hit and does no forward pass. With --nproc N
    (or under torchrun) each process extracts its shard of the batches and rank 0 merges them
    into the same cache file one process writes.

    \b
    Example:
      featcache extract --model resnet18 --model googlenet --data ./chest_xray
      featcache extract --model resnet18 --data demo --weights none --image-size 64
      featcache extract --model resnet50 --data ./chest_xray --device cuda --nproc 4
      torchrun --nproc-per-node 4 -m featcache extract --model resnet50 --data ./chest_xray --device cuda
    """
    from featcache.extraction import extract as run_extract, find_cache

    configs = [ExtractConfig(model=model, data=data_config, weights=weights, image_size=image_size,
                             batch_size=batch_size, num_workers=num_workers, dtype=dtype, device=device,
                             amp=amp, cache_dir=cache_dir, wait=wait) for model in models_]
    if nproc > 1 and any(find_cache(config) is None for config in configs):  # user errors and hits: here, once
        return _launch(click.get_current_context(), nproc=nproc, max_restarts=max_restarts)
    for config in configs:
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
    from featcache.extraction import dataset_changed
    from featcache.reporting import print_table

    rows = [{
        "dataset": r["dataset"], "model": r.get("model") or "?", "weights": r.get("weights") or "?",
        "splits": " ".join(f"{s}={v['n']}" if v["n"] == v["done"] else f"{s}={v['done']}/{v['n']}"
                           for s, v in r["splits"].items()),
        "D": r.get("feature_dim") or "?", "dtype": r.get("dtype") or "?",
        "size": f"{r['size'] / 1e6:.1f} MB",
        # stale: its dataset changed since extraction (a re-run extracts a new cache; this one is never used)
        "status": "stale" if r["status"] == "complete" and dataset_changed(r) else r["status"],
        "file": Path(r["path"]).name,
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


from featcache.head_runs import DEFAULT_SOLVER, SOLVER_ALIASES, SOLVERS  # noqa: E402  (head-train --solver)


@cli.command("head-train")
@click.option("--cache", "cache_file", type=click.Path(dir_okay=False), default=None,
              help="A cache file from featcache extract (or give --model and --data to find it by key).")
@click.option("--model", type=MODEL_CHOICE, default=None, help="Find the cache of this backbone ...")
@click.option("--data", default=None, metavar="DIR|demo", help="... over this dataset (with --model).")
@click.option("--val-fraction", default=DataConfig.val_fraction, show_default=True, type=FRACTION,
              help="As given to extract (carved splits).")
@click.option("--test-fraction", default=DataConfig.test_fraction, show_default=True, type=FRACTION,
              help="As given to extract (carved splits).")
@click.option("--split-seed", default=DataConfig.split_seed, show_default=True,
              help="As given to extract (carved splits).")
@backbone_options
@grid_train_options
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1),
              help="Train every setting with K seeds (--seed, --seed+1, ...) and report mean ± 95 % CI.")
@click.option("--solver", type=click.Choice([*SOLVERS, *SOLVER_ALIASES]), default=DEFAULT_SOLVER, show_default=True,
              help="sgd: the trained head (--optimizer sgd|adam|adamw; 'optax' is its old name); "
                   "ridge: closed-form ridge regression on one-hot targets.")
@click.option("--l2", "l2s", type=FloatList(), default=None, metavar="X[,X...]",
              help="--solver ridge: the L2 strengths searched (selected on val).  [default: 2^-10 ... 2^20]")
@click.option("--standardize", is_flag=True, default=TrainConfig.standardize,
              help="Z-score features with the train mean/std (stored in head.npz).")
@click.option("--stream/--no-stream", default=None,
              help="Read the train rows from the cache a block at a time in batch order instead of loading every "
                   "split: for caches larger than memory; the same results.  [default: only when loading would "
                   "not fit in the memory available]")
@click.option("--stream-memory", type=click.IntRange(16), default=None, metavar="MIB",
              help="Memory for the streamed blocks of features (bigger blocks, fewer reads).  "
                   f"[default: {DEFAULT_STREAM_MEMORY_MIB}, or a quarter of the memory available when less]")
@click.option("--run-name", default=None, help="Run directory name (default <time>-head-<model>).")
def head_train(cache_file, model, data, val_fraction, test_fraction, split_seed, weights, image_size, dtype,
               cache_dir, seeds, solver, l2s, standardize, stream, stream_memory, run_name, **kwargs):
    """Train the linear head in JAX on cached features: all epochs in one compiled program.

    Comma lists in --lr / --weight-decay and --seeds K train the whole grid (lr x wd x seed) as
    ONE vmapped program, select the (lr, wd) with the best mean val accuracy over the seeds and
    report every cell as mean ± 95 % t-interval; the run keeps the selected cell's first seed.

    --stream (automatic when the features would not fit in memory) reads the train rows from the
    cache a block at a time in the plan's batch order, one block read ahead in a thread, and runs
    one compiled program per block: the same results, memory bounded by --stream-memory.

    \b
    Example:
      featcache head-train --cache cache/demo-c2-s0-64px/resnet18-none-0123456789ab.h5
      featcache head-train --model resnet18 --data demo --weights none --image-size 64 --epochs 30
      featcache head-train --cache FILE --lr 1e-4,1e-3,1e-2 --weight-decay 0,1e-4,1e-3 --seeds 5
      featcache head-train --cache FILE --solver ridge --standardize
      featcache head-train --cache FILE --stream --stream-memory 2048
    """
    from featcache.errors import DivergedError
    from featcache.head_runs import diverged_message, head_train as run_head_train
    from featcache.reporting import print_summary

    lrs, weight_decays = kwargs.pop("lr"), kwargs.pop("weight_decay")
    config = _train_config(dict(kwargs, lr=lrs[0], weight_decay=weight_decays[0]), standardize=standardize)
    if cache_file is None:
        cache_file = _find_cache(model, data, DataConfig(root=data or "", val_fraction=val_fraction,
                                                         test_fraction=test_fraction, split_seed=split_seed),
                                 weights=weights, image_size=image_size, dtype=dtype, cache_dir=cache_dir)
    result = run_head_train(cache=cache_file, config=config, solver=solver, lrs=lrs, weight_decays=weight_decays,
                            seeds=seeds, l2s=l2s, stream=stream, stream_memory_mib=stream_memory, run_name=run_name)
    print_summary(result)
    if result.diverged:
        raise DivergedError(diverged_message(result))


def _find_cache(model, data, data_config, *, weights, image_size, dtype, cache_dir) -> str:
    """The cache file of (model, data, weights, ...) by key, or a UserError saying how to create it."""
    from featcache.extraction import find_cache

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
@click.option("--image-size", type=POSITIVE_INT, default=None, metavar="N", help="Crop size (default: native, 224).")
@train_options
@click.option("--augment", is_flag=True, help="RandomResizedCrop + horizontal flip on train images.")
@click.option("--freeze-backbone", is_flag=True,
              help="The classic fixed-feature loop: backbone frozen in eval mode, images through it every epoch.")
@click.option("--amp", is_flag=True, help="bf16 autocast (CUDA only).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]))
@click.option("--num-workers", type=WORKERS, default=-1, show_default="auto", help="Decode worker processes.")
@click.option("--cache-dir", default="cache", show_default=True, help="Where --data demo is rendered.")
@click.option("--resume", "resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue a stopped run from its last finished epoch; the other options must be the run's own.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1),
              help="Run K seeds in turn (--seed, --seed+1, ...), one run each, and report mean ± 95 % CI.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@launch_options
def finetune(model, data_config, weights, image_size, augment, freeze_backbone, amp, device, num_workers,
             cache_dir, resume, seeds, quiet, nproc, max_restarts, **kwargs):
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
      # three seeds, one run each, then mean ± 95 % CI (also: featcache report RUN_DIRS)
      featcache finetune --model resnet18 --data demo --weights none --image-size 64 --epochs 5 --seeds 3
      # DDP on 4 GPUs (global batch 32 = 4 x 8), restarted from last.pt if a process dies
      featcache finetune --model resnet50 --data ./chest_xray --device cuda --nproc 4 --max-restarts 3
    """
    from featcache.config import FinetuneConfig
    from featcache.distributed import check_finetune_launch, rank
    from featcache.errors import DivergedError
    from featcache.reporting import compare_runs, print_summary

    train = _train_config(kwargs)
    if resume is not None and seeds > 1:
        raise UserError("--resume continues one run; drop --seeds (resume each seed's run on its own).")
    config = FinetuneConfig(model=model, data=data_config, weights=weights, image_size=image_size,
                            augment=augment, freeze_backbone=freeze_backbone, amp=amp, device=device,
                            num_workers=num_workers, cache_dir=cache_dir)
    if nproc > 1:
        if resume is None:
            check_finetune_launch(config, train, nproc=nproc)  # user errors here, once, not in N processes
        return _launch(click.get_current_context(), nproc=nproc, max_restarts=max_restarts)
    from featcache.finetuning import finetune as run_finetune

    echo = click.echo if rank() == 0 else (lambda *_, **__: None)  # under torchrun rank 0 reports
    results = []
    for seed in range(train.seed, train.seed + seeds):
        if seeds > 1:
            echo(f"== seed {seed} ({seed - train.seed + 1}/{seeds})")
        results.append(run_finetune(config, dataclasses.replace(train, seed=seed), resume=resume,
                                    progress=not quiet, log=echo))
        if rank() == 0:
            print_summary(results[-1])
    if seeds > 1:
        echo(compare_runs(results, format="table"), nl=False)
    for result in results:
        if result.diverged:
            kept = ("the last good checkpoint is its last.pt" if (result.run_dir / "last.pt").is_file()
                    else "no epoch finished before it, so there is no checkpoint")
            raise DivergedError(f"Training diverged ({result.extra.get('diverged_reason')}); lower --lr. "
                                f"The run {result.run_dir} is marked diverged; {kept}.")


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
    from featcache.reporting import compare_runs

    click.echo(compare_runs(run_dirs, format=fmt, figure=figure or None), nl=False)
    if figure:
        click.echo(f"figure: {figure}", err=True)


@cli.command()
@click.option("--cache", "cache_file", type=click.Path(dir_okay=False), default=None,
              help="Check the test split of this cache against its train split.")
@click.option("--between", nargs=2, type=click.Path(dir_okay=False), default=None, metavar="A.h5 B.h5",
              help="Check cache B against cache A instead (two datasets, same backbone, weights and transform).")
@click.option("--split", type=click.Choice(["all", "train", "val", "test"]), default="all", show_default=True,
              help="With --between: the split(s) of each cache to compare.")
@click.option("--folds", default=5, show_default=True, help="Cross-validation folds of the domain classifier.")
@click.option("--permutations", default=200, show_default=True, type=click.IntRange(0),
              help="Label shuffles for the p-value (its resolution is 1 / (1 + permutations)).")
@click.option("--top", default=5, show_default=True, help="Most foreign rows listed, each with its nearest neighbours.")
@click.option("--seed", default=0, show_default=True, help="Seed of folds, permutations and subsampling.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the whole result as JSON.")
def shift(cache_file, between, split, folds, permutations, top, seed, json_path):
    """Do train and test come from the same distribution? A shift check on cached features.

    A linear classifier learns to tell test rows from train rows (k-fold cross-validated
    ROC-AUC: 0.5 = indistinguishable; permutation p-value), per-class mean-feature distances
    against their chance level, and the most foreign test images with their nearest training
    images. Runs in seconds; no training of the head.

    \b
    Example:
      featcache shift --cache cache/demo-c2-s0-64px/resnet18-none-0123456789ab.h5
      featcache shift --between cache/siteA/resnet18-imagenet-aaa.h5 cache/siteB/resnet18-imagenet-bbb.h5
    """
    from featcache.shift import check_between, check_cache, print_report

    if (cache_file is None) == (between is None):
        raise UserError("Give --cache FILE (train vs test) or --between A.h5 B.h5 (two datasets), not both.")
    options = dict(folds=folds, permutations=permutations, seed=seed, top=top)
    if cache_file is not None:
        result = check_cache(cache_file, **options)
    else:
        result = check_between(*between, split=split, **options)
    print_report(result, json_path=json_path)


@cli.command()
@click.option("--model", default="resnet18", show_default=True, type=MODEL_CHOICE)
@click.option("--weights", default="none", show_default=True, metavar="imagenet|none|PATH",
              help="'none' needs no network; 'imagenet' downloads torchvision's weights once.")
@click.option("--image-size", default=64, show_default=True, type=POSITIVE_INT,
              help="Crop size (the demo images are 64 px).")
@click.option("--epochs", default=30, show_default=True, type=POSITIVE_INT,
              help="Epochs of head-train and of the frozen loop.")
@click.option("--finetune-epochs", default=3, show_default=True, type=POSITIVE_INT,
              help="Epochs of the full fine-tune (slowest).")
@click.option("--lr", default=0.01, show_default=True, type=POSITIVE_FLOAT,
              help="Learning rate of all three trainings (SGD).")
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
    from featcache.extraction import extract as run_extract
    from featcache.finetuning import finetune as run_finetune
    from featcache.head_runs import train_head
    from featcache.reporting import compare_runs, print_summary

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
    click.echo("\n== 6. export the best demo model (the head-train run) and predict the demo test images")
    from featcache.exporting import export as run_export
    from featcache.prediction import predict as run_predict

    exported = run_export(head.run_dir, out=Path(runs_dir) / "demo-model.pt", log=click.echo)
    predictions = run_predict(exported.path, root / "test", num_workers=0)  # JAX is loaded: no forked workers
    for row in predictions.rows[:3]:
        click.echo(f"  {row.path}: {row.predicted} (p={max(row.probabilities):.3f})")
    right = sum(Path(r.path).parent.name == r.predicted for r in predictions.rows)
    acc = right / len(predictions.rows)
    click.echo(f"predicted {len(predictions.rows)} test images with {exported.path}: accuracy {acc:.4f}; the run's "
               f"test accuracy {head.summary.test_acc:.4f} "
               f"({'agree' if acc == head.summary.test_acc else 'DISAGREE'})")


def _command_line(ctx: click.Context) -> str:
    """The command as typed: its name and the options given on the command line."""
    words = ["featcache", ctx.info_name]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
            value = ctx.params[param.name]
            values = [] if getattr(param, "is_flag", False) else value if param.nargs > 1 else [value]
            words += [param.opts[0], *map(str, values)]
    return " ".join(words)


def _int_list(value: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, like 1,2,4; got {value!r}.") from None


@cli.command()
@click.option("--models", default=None, metavar="A,B",
              help="Backbones, comma-separated.  [default: resnet18,googlenet; with --quick: resnet18]")
@click.option("--data", default="demo", show_default=True, metavar="DIR|demo", help="The images every path reads.")
@click.option("--epochs", default=30, show_default=True, help="Epochs of every training path.")
@click.option("--image-size", type=int, default=None, metavar="N",
              help="Crop size fed to the networks (default: the model's native size, 224, as in the study).")
@click.option("--batch-size", default=32, show_default=True, help="Training and extraction batch size.")
@click.option("--weights", default="none", show_default=True, metavar="none|imagenet|PATH",
              help="Backbone weights (speed does not depend on them; 'none' needs no network).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--repeat", default=3, show_default=True, help="Runs of every path (interleaved); medians reported.")
@click.option("--quick", is_flag=True, help="Smoke run (about 40 s on an idle machine): tiny demo, 32 px, 2 epochs, 1 repeat, no fine-tune.")
@click.option("--no-finetune", is_flag=True, help="Skip path 6, the full fine-tune (the slowest).")
@click.option("--scale-factors", default="1,2,4", show_default=True, help="Extraction at these multiples of the images.")
@click.option("--scale-epochs", default="30,100,300", show_default=True, help="head-train at these epoch counts.")
@click.option("--out", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the result JSON.")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Keep datasets and caches here (default: a temporary folder, removed).")
@click.option("--compare", nargs=2, default=None, type=click.Path(exists=True, dir_okay=False), metavar="A.json B.json",
              help="Show two results side by side instead of running.")
def bench(models, data, epochs, image_size, batch_size, weights, device, repeat, quick, no_finetune, scale_factors,
          scale_epochs, out, work_dir, compare):
    """Time the cached frozen mode against the classic loops, each path in its own process.

    Per model: 1 classic frozen loop, 2 extract + head-train (cold cache), 3 head-train (warm
    cache), 4 a PyTorch head on the cache, 5 the backbone's forward limit, 6 full fine-tune;
    then the ratios (and the theoretical one) and how the cached path scales. Writes a JSON.

    \b
    Example:
      featcache bench --models resnet18,googlenet --data demo
      featcache bench --quick
      featcache bench --compare benchmarks/results/A.json benchmarks/results/B.json
    """
    from featcache import bench as fb
    from featcache.config import BenchConfig

    if compare:
        click.echo(fb.compare(fb.load_result(compare[0]), fb.load_result(compare[1]), sources=compare), nl=False)
        return
    default_models = ("resnet18",) if quick else BenchConfig().models
    config = BenchConfig(models=tuple(m for m in models.split(",") if m) if models else default_models, data=data,
                         epochs=epochs, image_size=image_size, batch_size=batch_size, weights=weights, device=device,
                         repeat=repeat, quick=quick, finetune=not no_finetune, out=out, work_dir=work_dir,
                         scale_factors=_int_list(scale_factors, "--scale-factors"),
                         scale_epochs=_int_list(scale_epochs, "--scale-epochs"))
    doc, path = fb.run_bench(config, command=_command_line(click.get_current_context()), log=click.echo)
    click.echo(fb.render(doc), nl=False)
    click.echo(f"result: {path}")


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="File to write.  [default: RUN_DIR/model.pt, or RUN_DIR/model-state-dict.pt]")
@click.option("--format", "fmt", type=click.Choice(["torchscript", "state-dict"]), default="torchscript",
              show_default=True, help="torchscript: plain torch.jit.load works; state-dict: for featcache.load_model.")
@click.option("--weights", default=None, metavar="PATH",
              help="head-train runs on a cache extracted with --weights PATH: that file (its SHA-256 is checked).")
@click.option("--cache", "cache_file", default=None, type=click.Path(dir_okay=False),
              help="The head-train run's cache file, if it is no longer where the run says.")
@click.option("--data-root", default=None, type=click.Path(file_okay=False),
              help="Where the dataset is now, if it moved (the check reads a few cached test images).")
@click.option("--atol", default=1e-4, show_default=True,
              help="Largest |logit difference| the export check allows (plus float32/float16 rounding).")
def export(run_dir, out, fmt, weights, cache_file, data_root, atol):
    """Export a finished run as one PyTorch module: cut backbone + linear head, with the class
    names, the eval transform and the input size.

    head-train runs: the cache's backbone with head.npz (standardization folded into the Linear
    layer); finetune and frozen runs: best.pt. The written file is loaded back and its logits on a
    few cached test images checked against the run's (--atol); if they differ, nothing is written.

    \b
    Example:
      featcache export runs/20261130-101500-head-resnet18 --out model.pt
      featcache export runs/20261130-101500-finetune-resnet18 --out model-sd.pt --format state-dict
      python -c "import torch; model = torch.jit.load('model.pt')"   # no featcache needed
    """
    from featcache.exporting import export as run_export

    run_export(run_dir, out=out, format=fmt, weights=weights, cache=cache_file, data_root=data_root, atol=atol,
               log=click.echo)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, metavar="[RUN_DIR] IMAGE_OR_DIR...")
@click.option("--model-file", default=None, type=click.Path(dir_okay=False),
              help="A file written by featcache export (else the first argument is a run directory or such a file).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Write the predictions here as CSV (default: CSV on stdout).")
@click.option("--batch-size", default=64, show_default=True, type=POSITIVE_INT, help="Images per forward pass.")
@click.option("--num-workers", type=WORKERS, default=-1, show_default="auto: half the cores, at most 4",
              help="Decode worker processes.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]))
@click.option("--weights", default=None, metavar="PATH",
              help="With a head-train RUN_DIR whose cache came from --weights PATH: that file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict(inputs, model_file, out, batch_size, num_workers, device, weights, quiet):
    """Predict the class of images with an exported model or a run: class and probability per class.

    Images are batched and decoded in worker processes; folders are walked recursively.
    Unreadable images are listed (stderr and the CSV's error column), never fatal.

    \b
    Example:
      featcache predict --model-file model.pt ./new_images --out predictions.csv
      featcache predict runs/20261130-101500-head-resnet18 scan1.png scan2.png
    """
    from featcache.prediction import predict as run_predict
    from featcache.files import atomic_write_bytes

    if model_file is None:
        if len(inputs) < 2:
            raise UserError("Give --model-file FILE, or a run directory (or exported model file) before the images.")
        model, images = inputs[0], inputs[1:]
    else:
        model, images = model_file, inputs
    result = run_predict(model, list(images), batch_size=batch_size, num_workers=num_workers, device=device,
                         weights=weights, progress=not quiet)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, result.to_csv().encode())
    else:
        click.echo(result.to_csv(), nl=False)
    for path, reason in result.failed:
        click.echo(f"unreadable: {path} ({reason})", err=True)
    click.echo(f"{len(result.rows)} images predicted, {len(result.failed)} unreadable"
               + (f"; wrote {out}" if out else ""), err=True)
