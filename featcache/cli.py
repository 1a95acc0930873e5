"""The `featcache` command line: options -> config -> one library call -> report.

Every option that sets a config field takes its default from the config dataclass (`config_option`);
the checks of the values live in the library, so the Python API (api.py) gets the same ones.
Nothing heavy is imported at module level: `featcache --help` must not start torch or jax.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import click

from featcache.api import config_from
from featcache.config import (DEFAULT_STREAM_MEMORY_MIB, BenchConfig, DataConfig, ExtractConfig, FinetuneConfig,
                              TrainConfig)
from featcache.demo_run import run_demo
from featcache.errors import UserError
from featcache.reporting import FORMATS


class _ModelName(click.ParamType):
    """--model: a torchvision name (featcache models), timm/<name>, or a backbone file (made absolute)."""

    name = "model"

    def get_metavar(self, param, ctx=None):
        return "NAME|timm/NAME|FILE.pt2"

    def convert(self, value, param, ctx):
        import os

        from featcache.backbones import check_model, file_source, source_of

        try:
            check_model(value)
        except UserError as exc:
            self.fail(str(exc), param, ctx)
        if source_of(value) is file_source and os.path.isfile(value):
            return os.path.abspath(value)  # the same file from any folder: the same cache
        return value


MODEL_CHOICE = _ModelName()  # no torch, no timm: names are checked, timm's own list only when a model is built
DEVICE_CHOICE = click.Choice(["cpu", "cuda", "auto"])
# Numeric option types: a value out of range is a usage error (exit 2) before any work starts.
POSITIVE_INT = click.IntRange(min=1)
WORKERS = click.IntRange(min=-1)  # -1 = auto
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE_FLOAT = click.FloatRange(min=0)
FRACTION = click.FloatRange(min=0, max=1, max_open=True)
SEED = click.IntRange(0, 2**31 - 1)  # what numpy, torch and JAX all take (a negative seed is numpy's ValueError)
MAX_IMAGE_SIZE = 4096  # one 4096 px image is 192 MiB as float32: a larger crop cannot make a batch in memory
IMAGE_SIZE = click.IntRange(1, MAX_IMAGE_SIZE)
IMAGE_SIZE_LIMIT = f"At most {MAX_IMAGE_SIZE} (one image of that side is already 192 MiB as float32)."
WEIGHTS_METAVAR = "imagenet|none|PATH"
WORKERS_HELP = "Decode worker processes."
WORKERS_DEFAULT = "auto: half the cores, at most 4"


class _Group(click.Group):
    """Turns a UserError into one line on stderr and its exit code; bugs still raise."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:  # Ctrl-C: one line on what is kept, exit 130 (128 + SIGINT), not click's "Aborted!"
            click.echo(INTERRUPTED.get(ctx.invoked_subcommand, INTERRUPTED[None]), err=True)
            sys.exit(EXIT_INTERRUPTED)


EXIT_INTERRUPTED = 130  # what a shell reports for a process Ctrl-C (SIGINT) ended
INTERRUPTED = {
    "extract": "Interrupted: the features extracted so far are kept (a .partial file beside the cache); run the same "
               "command again to resume where it stopped.",
    "finetune": "Interrupted: the finished epochs are kept in the run directory's last.pt; run the same command "
                "with --resume RUN_DIR to continue.",
    None: "Interrupted: files are written whole or not at all, so nothing half-written is left.",
}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featcache")
def cli():
    """Transfer learning on small image datasets: cache a backbone's features once,
    train linear heads on the cache in JAX, compare with fine-tuning in PyTorch.

    \b
    Quick start (no network needed):
      featcache demo
    Your own data (ROOT/{train,val,test}/<class>/<image>); --weights none needs no network,
    leave it out for the ImageNet weights (downloaded once):
      featcache extract --model resnet18 --data ROOT --weights none
      featcache head-train --model resnet18 --data ROOT --weights none
      featcache finetune --model resnet18 --data ROOT --weights none
      featcache report runs
    Documentation: README.md and docs/ in the source tree.
    """


def main():  # console-script entry point
    cli(prog_name="featcache")


# --------------------------------------------------------------------------- options from the configs


def default(source, name: str):
    """The default of field `name` of a config dataclass (or keyword `name` of a function): one definition."""
    value = inspect.signature(source).parameters[name].default
    if value is inspect.Parameter.empty:
        raise TypeError(f"{source.__name__}.{name} has no default")
    return value


def config_option(source, name: str, *decls: str, **kwargs):
    """click.option setting field `name` of `source` (a config dataclass or a function), default read from there.

    The option is --name-with-dashes unless `decls` are given; a bool field without a --x/--no-x pair is a
    flag; a default other than None is shown in --help.
    """
    value = default(source, name)
    decls = decls or (f"--{name.replace('_', '-')}",)
    if isinstance(value, bool) and not any("/" in d for d in decls):
        kwargs.setdefault("is_flag", True)
    elif value is not None:
        kwargs.setdefault("show_default", True)
    return click.option(*decls, name, default=value, **kwargs)


def _stack(f, options):
    """Apply click options so that --help lists them in the order given."""
    for option in reversed(options):
        f = option(f)
    return f


class CommaList(click.ParamType):
    """A comma-separated list, e.g. 1e-4,1e-3,1e-2 (kind float), 1,2,4 (int), a,b (str); one value is a list of one."""

    EXAMPLES = {float: "1e-4,1e-3", int: "1,2,4", str: "a,b"}

    def __init__(self, kind: type = float, *, min: float | None = None, min_open: bool = False):
        self.kind, self.min, self.min_open = kind, min, min_open  # every value must be > min (min_open) or >= min
        self.name = {float: "X[,X...]", int: "N[,N...]", str: "A[,B...]"}[kind]

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(self.kind(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError:
            values = ()
        if not values:
            what = {float: "numbers", int: "integers", str: "names"}[self.kind]
            self.fail(f"expected {what} separated by commas, like {self.EXAMPLES[self.kind]}; got {value!r}",
                      param, ctx)
        if self.min is not None:
            for v in values:
                if v <= self.min if self.min_open else v < self.min:
                    self.fail(f"{v:g} is not {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        return values


FloatList = CommaList  # CommaList() is a list of floats; the name head-train's --l2 uses


# --------------------------------------------------------------------------- shared option groups


GROUP_BY_HELP = (r"Regex whose capture group names an image's group in its path, e.g. '(patient\d+)': carved val/test "
                 "take whole groups; a group in more than one given split is reported (--strict: an error). A "
                 "manifest's group column is used without it.")


def data_options(f=None, *, required: bool = True, strict: bool = True, data_help: str | None = None):
    """--data and the carving of missing val/test splits, passed on as `data_config` (a DataConfig).

    As @data_options or @data_options(...): required=False lets --data be left out (data_config is then
    None, e.g. where --data only finds a cache); strict=False leaves out --strict (nothing reads images).
    """
    if f is None:
        return functools.partial(data_options, required=required, strict=strict, data_help=data_help)
    options = [
        click.option("--data", "data", required=required, default=None, metavar="DIR|demo", help=data_help or (
            "Dataset folder ROOT/{train,val,test}/<class>/<image>, a manifest CSV (columns path,label[,split,group]; "
            "paths relative to its folder), or 'demo' (built-in, 2 classes) or 'demo3' (3 classes).")),
        config_option(DataConfig, "val_fraction", type=FRACTION,
                      help="Fraction of train carved out as val when ROOT/val is missing (stratified)."),
        config_option(DataConfig, "test_fraction", type=FRACTION,
                      help="Fraction of train carved out as test when ROOT/test is missing (stratified)."),
        config_option(DataConfig, "split_seed", type=SEED, help="Seed of the carved split."),
        config_option(DataConfig, "group_by", metavar="REGEX", help=GROUP_BY_HELP),
        config_option(DataConfig, "verify_content", help="Key the cache by a hash of every image's bytes instead "
                      "of its size and modification time (reads every file; catches same-size, same-time swaps)."),
    ]
    if strict:
        options.append(config_option(DataConfig, "strict", help="Stop at the first unreadable image instead of "
                                                                "skipping it and listing it in failures.csv."))

    @functools.wraps(f)
    def wrapper(*args, data, val_fraction, test_fraction, split_seed, group_by, verify_content, strict=False,
                **kwargs):
        kwargs["data_config"] = None if data is None else DataConfig(
            root=data, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed, strict=strict,
            group_by=group_by, verify_content=verify_content)
        return f(*args, **kwargs)
    return _stack(wrapper, options)


def _weights_option(source, help: str):
    return config_option(source, "weights", metavar=WEIGHTS_METAVAR, help=help)


def _image_size_option(source):
    return config_option(source, "image_size", type=IMAGE_SIZE, metavar="N",
                         help="Crop size fed to the network (default: the model's native size, 224). "
                              + IMAGE_SIZE_LIMIT)


PRECISION_HELP = ("The backbone's arithmetic: fp32, bf16 (autocast) or auto (bf16 where the CPU/GPU has it natively); "
                  "channels_last layout for both.")


def precision_option(source, help: str = PRECISION_HELP):
    """--precision fp32|bf16|auto, its default read from `source` (featcache.precision)."""
    from featcache.precision import PRECISIONS

    return config_option(source, "precision", type=click.Choice(PRECISIONS), help=help)


def backbone_options(f):
    """--weights, --image-size, --dtype, --cache-dir: what selects one cache file."""
    return _stack(f, [
        _weights_option(ExtractConfig, "torchvision's default pretrained weights (downloaded once), random init, "
                                       "or a state_dict file of the full torchvision model."),
        _image_size_option(ExtractConfig),
        config_option(ExtractConfig, "dtype", type=click.Choice(["float32", "float16"]),
                      help="Storage type of the cached features."),
        config_option(ExtractConfig, "cache_dir", type=click.Path(file_okay=False), help="Folder of the cache files."),
    ])


def launch_options(f):
    """--nproc and --max-restarts: the command in N processes on this machine, under torchrun."""
    return _stack(f, [
        click.option("--nproc", type=click.IntRange(1), default=1, show_default=True,
                     help="Processes on this machine, one per GPU (starts torchrun --nproc-per-node N); the "
                          "results are those of one process. Under torchrun itself, leave it out."),
        click.option("--max-restarts", type=click.IntRange(0), default=0, show_default=True,
                     help="With --nproc: how often torchrun restarts the processes after one fails; they resume "
                          "(extract: the unfinished shards; finetune: from last.pt)."),
    ])


def grid_train_options(f):
    """train_options where --lr and --weight-decay take comma lists (head-train trains the grid)."""
    return train_options(f, grid=True)


def train_options(f, *, grid: bool = False):
    """The training options shared by head-train and finetune: same names, TrainConfig's defaults."""
    lists = " A comma list trains every value (with --weight-decay: every pair) in one program." if grid else ""
    return _stack(f, [
        config_option(TrainConfig, "epochs", type=POSITIVE_INT, help="Training epochs."),
        config_option(TrainConfig, "batch_size", type=POSITIVE_INT,
                      help="Mini-batch size (the last short batch is kept)."),
        config_option(TrainConfig, "optimizer", type=click.Choice(["sgd", "adam", "adamw"]),
                      help="Same arithmetic as torch.optim."),
        config_option(TrainConfig, "lr", type=CommaList(min=0, min_open=True) if grid else POSITIVE_FLOAT,
                      help="Initial learning rate." + lists),
        config_option(TrainConfig, "momentum", type=NON_NEGATIVE_FLOAT, help="SGD momentum."),
        config_option(TrainConfig, "nesterov", help="Nesterov momentum (SGD)."),
        config_option(TrainConfig, "weight_decay", type=CommaList(min=0) if grid else NON_NEGATIVE_FLOAT,
                      help="L2 penalty (sgd, adam) or decoupled decay (adamw)." + lists),
        config_option(TrainConfig, "scheduler", type=click.Choice(["cosine", "none"]),
                      help="cosine: CosineAnnealingLR(T_max=epochs) stepped per epoch, to 0."),
        config_option(TrainConfig, "seed", type=SEED,
                      help="Seed of head init and batch order (the same in both modes)."),
        config_option(TrainConfig, "runs_dir", type=click.Path(file_okay=False),
                      help="Where run directories are written."),
        config_option(TrainConfig, "class_weight", metavar="none|balanced|W1,W2,...",
                      help="Loss weight per class: balanced = N / (C * train rows of the class); "
                           "train loss is the weighted one optimised, val/test losses stay unweighted."),
        config_option(TrainConfig, "operating_point", metavar="youden|sens=X|spec=X",
                      help="Two classes: the threshold chosen on val, frozen for test's sensitivity, "
                           "specificity, PPV, NPV, F1."),
        config_option(TrainConfig, "bootstrap", type=click.IntRange(-1),
                      help="Stratified bootstrap resamples for the test metrics' 95 % intervals (seed 0); "
                           "0 = none; -1 = 1000 for up to 4 classes, 200 above."),
    ])


def _train_config(kwargs: dict, **extra) -> TrainConfig:
    """The TrainConfig of head-train's options (the options are taken out of kwargs's copy)."""
    return config_from(TrainConfig, dict(kwargs), **extra)


# --------------------------------------------------------------------------- launching under torchrun


def _launch(ctx: click.Context, *, nproc: int, max_restarts: int) -> None:
    """Run this command again in `nproc` processes under torchrun (the same options, less --nproc); wait for it."""
    from featcache.distributed import launch

    code = launch(ctx.info_name, _given_args(ctx, drop=("nproc", "max_restarts")), nproc=nproc,
                  max_restarts=max_restarts)
    if code:
        raise UserError(f"The {nproc} processes under torchrun failed (exit code {code}); the lines above say why.",
                        exit_code=code)


def _given_args(ctx: click.Context, *, drop: tuple[str, ...] = ()) -> list[str]:
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
            if isinstance(v, tuple):  # nargs > 1, or a CommaList
                args += [param.opts[0], *map(str, v)] if param.nargs > 1 else [param.opts[0], ",".join(map(str, v))]
            else:
                args += [param.opts[0], str(v)]
    return args


def _command_line(ctx: click.Context) -> str:
    """The command as typed: its name and the options given on the command line."""
    return " ".join(["featcache", ctx.info_name, *_given_args(ctx)])


def _silent(*_, **__) -> None:
    """A log/echo that prints nothing (the processes of a torchrun group other than rank 0)."""


# --------------------------------------------------------------------------- commands


@cli.command()
@click.option("--timm", "timm_pattern", default=None, metavar="PATTERN",
              help="List timm's models matching PATTERN (e.g. 'convnext*'), with their feature width.")
def models(timm_pattern):
    """List the backbones: name, feature dim D, default weights, input size.

    Any timm model works too, as --model timm/<name> (with a pretrained tag, e.g.
    timm/convnext_tiny.fb_in22k, or timm/hf-hub:<org>/<repo>); --timm PATTERN lists them.
    Your own backbone file works as --model path/to/backbone.pt2 (see docs/backbones.md).

    \b
    Example:
      featcache models
      featcache models --timm 'efficientnet_lite*'
    """
    from featcache.reporting import print_table

    if timm_pattern is not None:
        from featcache.backbones.timm_source import list_models

        rows = list_models(timm_pattern)
        if not rows:
            raise UserError(f"timm has no model matching {timm_pattern!r}; try a wider pattern such as "
                            f"'{timm_pattern[:3]}*'.")
        print_table(rows, title=f"timm models matching {timm_pattern!r} (featcache extract --model timm/NAME)")
        return
    from featcache.backbones import describe_registry

    print_table(describe_registry(), title="Backbones (featcache extract --model NAME)")
    click.echo("Also: --model timm/<name> (featcache models --timm PATTERN lists them), "
               "or --model path/to/backbone.pt2 (your own, see docs/backbones.md).")


@cli.command("demo-data")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=SEED, help="Same seed, byte-identical files.")
@click.option("--classes", "num_classes", type=click.IntRange(2, 3), default=2, show_default=True,
              help="2: normal vs abnormal cells; 3: normal, elongated, clustered.")
@click.option("--image-size", default=64, show_default=True, type=IMAGE_SIZE,
              help="Side of the square PNG images. " + IMAGE_SIZE_LIMIT)
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
@config_option(ExtractConfig, "batch_size", type=POSITIVE_INT, help="Images per forward pass.")
@config_option(ExtractConfig, "num_workers", type=WORKERS, show_default=WORKERS_DEFAULT, help=WORKERS_HELP)
@config_option(ExtractConfig, "device", type=DEVICE_CHOICE)
@config_option(ExtractConfig, "amp", help="bf16 autocast (CUDA only).")
@precision_option(ExtractConfig)
@config_option(ExtractConfig, "wait", help="If another process is writing the same cache, wait for it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@launch_options
def extract(models_, data_config, quiet, nproc, max_restarts, **options):
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

    configs = [config_from(ExtractConfig, dict(options), model=model, data=data_config) for model in models_]
    if nproc > 1 and any(find_cache(config) is None for config in configs):  # user errors and hits: here, once
        return _launch(click.get_current_context(), nproc=nproc, max_restarts=max_restarts)
    for config in configs:
        run_extract(config, progress=not quiet, log=click.echo)


@cli.group("cache")
def cache_group():
    """Inspect cache files: ls, verify."""


@cache_group.command("ls")
@config_option(ExtractConfig, "cache_dir", type=click.Path(file_okay=False))
def cache_ls(cache_dir):
    """List the caches: model, dataset, splits (N), D, dtype, size, status, key (stat|content).

    \b
    Example:
      featcache cache ls --cache-dir cache
    """
    from featcache.cache import list_caches
    from featcache.extraction import dataset_changed
    from featcache.reporting import cache_row, print_table

    rows = [dict(cache_row(record, dataset_changed=dataset_changed), key=record.get("key_mode") or "?")
            for record in list_caches(cache_dir)]
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
      featcache cache ls                       # the cache files, with their paths
      featcache cache verify FILE              # one of them
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
@click.option("--split-seed", default=DataConfig.split_seed, show_default=True, type=SEED,
              help="As given to extract (carved splits).")
@click.option("--group-by", default=DataConfig.group_by, metavar="REGEX", help="As given to extract (carved splits).")
@click.option("--verify-content", is_flag=True, help="As given to extract (a cache keyed by the files' bytes).")
@backbone_options
@grid_train_options
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1),
              help="Train every setting with K seeds (--seed, --seed+1, ...) and report mean ± 95 % CI.")
@click.option("--solver", type=click.Choice([*SOLVERS, *SOLVER_ALIASES]), default=DEFAULT_SOLVER, show_default=True,
              help="sgd: the trained head (--optimizer sgd|adam|adamw; 'optax' is its old name); "
                   "ridge: closed-form ridge regression on one-hot targets; lbfgs: logistic regression by L-BFGS, "
                   "C selected on val; knn: cosine k-NN votes, k selected on val (no linear head).")
@click.option("--l2", "l2s", type=FloatList(), default=None, metavar="X[,X...]",
              help="--solver ridge: the L2 strengths searched (selected on val).  [default: 2^-10 ... 2^20]")
@click.option("--C", "cs", type=FloatList(), default=None, metavar="X[,X...]",
              help="--solver lbfgs: the inverse L2 strengths C fitted in one program (selected on val).  "
                   "[default: 32 values log-spaced over 1e-6 ... 1e6]")
@click.option("--k", "ks", type=CommaList(int), default=None, metavar="K[,K...]",
              help="--solver knn: the neighbour counts scored in one pass (selected on val).  "
                   "[default: 10,20,100,200, clipped to the train rows]")
@click.option("--temperature", type=float, default=None,
              help="--solver knn: votes weigh exp(similarity / T).  [default: 0.07]")
@click.option("--shots", type=CommaList(int), default=None, metavar="K[,K...]",
              help="Few-shot (--solver lbfgs or knn): K train images per class, drawn --draws times (seeded by "
                   "--seed), all in one program; one run per K with mean ± 95 % interval over the draws.")
@click.option("--draws", type=click.IntRange(1), default=None,
              help="With --shots: draws per K.  [default: 5]")
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
@click.option("--quiet", is_flag=True, help="No progress lines on stderr; the summary (and any warning) still prints.")
@precision_option(ExtractConfig, help="With --model/--data: the precision the cache was extracted at (as extract's "
                                     "--precision).")
def head_train(cache_file, model, data, val_fraction, test_fraction, split_seed, group_by, weights, image_size, dtype,
               precision, cache_dir, seeds, solver, l2s, cs, ks, temperature, shots, draws, standardize, stream, stream_memory,
               run_name, quiet, **kwargs):
    """Train the linear head in JAX on cached features: all epochs in one compiled program.

    Comma lists in --lr / --weight-decay and --seeds K train the whole grid (lr x wd x seed) as
    ONE vmapped program, select the (lr, wd) with the best mean val accuracy over the seeds and
    report every cell as mean ± 95 % t-interval; the run keeps the selected cell's first seed.

    --stream (automatic when the features would not fit in memory) reads the train rows from the
    cache a block at a time in the plan's batch order, one block read ahead in a thread, and runs
    one compiled program per block: the same results, memory bounded by --stream-memory.

    \b
    Example:
      featcache head-train --model resnet18 --data demo --weights none --image-size 64 --epochs 30
      featcache head-train --cache FILE --lr 1e-4,1e-3,1e-2 --weight-decay 0,1e-4,1e-3 --seeds 5
      featcache head-train --cache FILE --solver ridge --standardize
      featcache head-train --cache FILE --solver lbfgs --C 0.01,0.1,1,10,100
      featcache head-train --cache FILE --solver knn --k 10,20
      featcache head-train --cache FILE --solver lbfgs --shots 1,5 --draws 10
      featcache head-train --cache FILE --stream --stream-memory 2048
    """
    from featcache.errors import DivergedError
    from featcache.head_runs import diverged_message, head_train as run_head_train
    from featcache.reporting import print_summary

    lrs, weight_decays = kwargs.pop("lr"), kwargs.pop("weight_decay")
    verify_content = kwargs.pop("verify_content")
    config = _train_config(dict(kwargs, lr=lrs[0], weight_decay=weight_decays[0]), standardize=standardize)
    if cache_file is None:
        cache_file = _find_cache(model, data, DataConfig(root=data or "", val_fraction=val_fraction,
                                                         test_fraction=test_fraction, split_seed=split_seed,
                                                         group_by=group_by,
                                                         verify_content=verify_content),
                                 weights=weights, image_size=image_size, dtype=dtype, cache_dir=cache_dir,
                                 precision=precision)
    result = run_head_train(cache=cache_file, config=config, solver=solver, lrs=lrs, weight_decays=weight_decays,
                            seeds=seeds, l2s=l2s, cs=cs, ks=ks, temperature=temperature, shots=shots, draws=draws,
                            stream=stream, stream_memory_mib=stream_memory, run_name=run_name, progress=not quiet)
    for one in result if isinstance(result, list) else [result]:  # a list: one few-shot run per K
        print_summary(one, notes=quiet)
    if not isinstance(result, list) and result.diverged:
        raise DivergedError(diverged_message(result))


def _find_cache(model, data, data_config, *, weights, image_size, dtype, cache_dir, precision="auto") -> str:
    """The cache file of (model, data, weights, ..., precision) by key, or a UserError saying how to create it."""
    from featcache.extraction import find_cache

    if not model or not data:
        raise UserError("Give --cache FILE, or --model and --data to find the cache by key.")
    config = ExtractConfig(model=model, data=data_config, weights=weights, image_size=image_size,
                           dtype=dtype, cache_dir=cache_dir, precision=precision)
    path = find_cache(config)
    if path is None:
        cmd = f"featcache extract --model {model} --data {data} --weights {weights}"
        cmd += f" --image-size {image_size}" if image_size else ""
        cmd += f" --dtype {dtype}" if dtype != "float32" else ""
        cmd += f" --precision {precision}" if precision != "auto" else ""
        cmd += f" --cache-dir {cache_dir}" if cache_dir != "cache" else ""
        raise UserError(f"No cache of {model} on {data} with these settings in {cache_dir}; create it with: {cmd}")
    return str(path)


@cli.command()
@click.option("--model", required=True, type=MODEL_CHOICE, help="Backbone to fine-tune.")
@data_options
@_weights_option(FinetuneConfig, "Starting weights (as for extract).")
@_image_size_option(FinetuneConfig)
@train_options
@config_option(FinetuneConfig, "augment", help="RandomResizedCrop + horizontal flip on train images.")
@config_option(FinetuneConfig, "freeze_backbone",
               help="The classic fixed-feature loop: backbone frozen in eval mode, images through it every epoch.")
@config_option(FinetuneConfig, "amp", help="bf16 autocast (CUDA only).")
@precision_option(FinetuneConfig)
@config_option(FinetuneConfig, "device", type=DEVICE_CHOICE)
@config_option(FinetuneConfig, "num_workers", type=WORKERS, show_default=WORKERS_DEFAULT, help=WORKERS_HELP)
@config_option(FinetuneConfig, "cache_dir", help="Where --data demo is rendered.")
@click.option("--resume", "resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue a stopped run from its last finished epoch; the other options must be the run's own.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1),
              help="Run K seeds in turn (--seed, --seed+1, ...), one run each, and report mean ± 95 % CI.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@launch_options
def finetune(data_config, resume, seeds, quiet, nproc, max_restarts, **options):
    """Train in PyTorch: the whole network with a new head, or (--freeze-backbone) only the head.

    Same plan (head init, batch order, lr per epoch) and metrics as head-train: with
    --freeze-backbone and no --augment it reports what extract + head-train report.

    \b
    Example:
      featcache finetune --model resnet18 --data demo --weights none --image-size 64 --epochs 5
      featcache finetune --model resnet18 --data ./chest_xray --freeze-backbone
      # after a kill: the same command plus --resume RUN_DIR
      featcache finetune --model resnet18 --data demo --weights none --image-size 64 --epochs 5 \\
        --resume runs/20261130-101500-finetune-resnet18
      # three seeds, one run each, then mean ± 95 % CI (also: featcache report RUN_DIRS)
      featcache finetune --model resnet18 --data demo --weights none --image-size 64 --epochs 5 --seeds 3
      # DDP on 4 GPUs (global batch 32 = 4 x 8), restarted from last.pt if a process dies
      featcache finetune --model resnet50 --data ./chest_xray --device cuda --nproc 4 --max-restarts 3
    """
    from featcache.distributed import check_finetune_launch, rank
    from featcache.reporting import compare_runs, print_summary

    train = config_from(TrainConfig, options)
    config = config_from(FinetuneConfig, options, data=data_config)
    if nproc > 1:
        if resume is None:
            check_finetune_launch(config, train, nproc=nproc)  # user errors here, once, not in N processes
        return _launch(click.get_current_context(), nproc=nproc, max_restarts=max_restarts)
    from featcache.finetuning import finetune_seeds

    main = rank() == 0  # under torchrun rank 0 reports
    echo = click.echo if main else _silent
    results = finetune_seeds(config, train, seeds=seeds, resume=resume, progress=not quiet, log=echo,
                             on_run=print_summary if main else None)
    if seeds > 1:
        echo(compare_runs(results, format="table"), nl=False)
    _raise_if_diverged(results)


def _raise_if_diverged(results) -> None:
    """DivergedError (exit code 5) for the first fine-tune run that diverged, saying what it kept."""
    from featcache.errors import DivergedError
    from featcache.finetuning import LAST_CKPT

    for result in results:
        if result.diverged:
            kept = (f"the last good checkpoint is its {LAST_CKPT}" if (result.run_dir / LAST_CKPT).is_file()
                    else "no epoch finished before it, so there is no checkpoint")
            raise DivergedError(f"Training diverged ({result.extra.get('diverged_reason')}); lower --lr. "
                                f"The run {result.run_dir} is marked diverged; {kept}.")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=FORMATS[0], show_default=True)
@click.option("--figure", type=click.Path(dir_okay=False), default="comparison.png", show_default=True,
              help="Val accuracy and loss curves of all runs; '' for none.")
def report(run_dirs, fmt, figure):
    """Lay runs side by side: model, mode, train loss/acc, best val loss/acc, test acc, time.

    \b
    Example:
      featcache report runs/*
      featcache report runs    # every finished run in the folder; unfinished ones are skipped with a note
      featcache report runs/*-head-resnet18 runs/*-frozen-resnet18 --format markdown
    """
    from featcache.reporting import compare_runs

    click.echo(compare_runs(run_dirs, format=fmt, figure=figure or None), nl=False)
    if figure:
        from featcache.reporting import report_figure_paths

        from featcache.files import shell_quoted

        click.echo(f"figures: {' '.join(shell_quoted(p) for p in report_figure_paths(figure))}", err=True)


from featcache.config import CompareConfig  # noqa: E402  (featcache compare)


@cli.command()
@click.argument("run_a", type=click.Path(file_okay=False))
@click.argument("run_b", type=click.Path(file_okay=False))
@config_option(CompareConfig, "bootstrap", type=click.IntRange(1),
               help="Stratified resamples (the same rows for A and B).")
@config_option(CompareConfig, "seed", type=SEED, help="Seed of the resamples.")
@click.option("--figure", type=click.Path(dir_okay=False), default=None,
              help="Write both runs' ROC curves to this PNG.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def compare(run_a, run_b, bootstrap, seed, figure, fmt):
    """Is run A better than run B? Paired bootstrap of the test metrics on the same test images.

    Rows are matched by image path (runs over different test sets are refused). For each metric:
    A, B, the difference A - B, its 95 % interval and the fraction of resamples in which A wins.

    \b
    Example:
      featcache compare runs/*-finetune-resnet18 runs/*-head-resnet18 --bootstrap 2000 --figure roc_ab.png
    """
    import json

    from featcache.paired import compare_paired

    result = compare_paired(run_a, run_b, config=CompareConfig(bootstrap=bootstrap, seed=seed, figure=figure))
    click.echo(result.table() if fmt == "table" else json.dumps(result.to_dict(), indent=2), nl=fmt == "json")
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
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of folds, permutations and subsampling.")
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
      featcache shift --cache FILE             # a cache of featcache cache ls
      featcache shift --between SITE_A.h5 SITE_B.h5
    """
    from featcache.api import shift_check
    from featcache.shift import print_report

    result = shift_check(cache=cache_file, between=between, split=split, folds=folds, permutations=permutations,
                         seed=seed, top=top)
    print_report(result, json_path=json_path)


@cli.command()
@config_option(run_demo, "models", type=CommaList(str), metavar="NAME@WEIGHTS,...",
               show_default=",".join(default(run_demo, "models")),
               help="Backbones of the demo study (pretrained offline, and random weights).")
@config_option(run_demo, "image_size", type=IMAGE_SIZE,
               help="Crop size (the 64 px demo images are resized to it; ImageNet features want more than 64 px). "
                    + IMAGE_SIZE_LIMIT)
@config_option(run_demo, "epochs", type=POSITIVE_INT, help="Epochs of head-train and of the frozen loop.")
@config_option(run_demo, "finetune_epochs", type=POSITIVE_INT, help="Epochs of the full fine-tune (slowest).")
@config_option(run_demo, "lr", type=POSITIVE_FLOAT, help="Learning rate of every training (SGD).")
@config_option(run_demo, "seeds", type=POSITIVE_INT, help="Seeds per row of the study.")
@config_option(run_demo, "cache_dir")
@config_option(run_demo, "runs_dir")
def demo(**options):
    """Run a small study on the built-in demo dataset, no network needed, then export and predict.

    demo data -> featcache study (extract, head-train on the cache, the classic frozen loop with the
    same numbers, the full fine-tune; report.md and report.html in RUNS_DIR/demo-study) -> export the
    best cached head and predict the demo test images.

    \b
    Example:
      featcache demo
      featcache demo --models resnet18@none,squeezenet1_0@none --epochs 10 --image-size 32
    """
    run_demo(**options, progress=True, log=click.echo)


def _study_option(name: str, *decls: str, **kwargs):
    """An option setting StudyPlan field `name`: None when not given (the plan file's value or the default stays)."""
    from featcache.study.plan import StudyPlan

    value = inspect.signature(StudyPlan).parameters[name].default
    value = None if value is inspect.Parameter.empty else value
    shown = ",".join(value) if isinstance(value, tuple) else value
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, default=None,
                        show_default=str(shown) if shown is not None else False, **kwargs)


@cli.command()
@click.argument("plan_file", required=False, type=click.Path(dir_okay=False, exists=True), metavar="[PLAN.toml]")
@_study_option("data", metavar="DIR|CSV|demo", help="The dataset (as for extract).")
@_study_option("out", type=click.Path(file_okay=False), help="The study folder (default: the plan file's folder).")
@_study_option("models", type=CommaList(str), metavar="NAME[@WEIGHTS],...",
               help="Backbones; NAME@WEIGHTS sets one model's weights (imagenet, none, a file).")
@_study_option("modes", type=CommaList(str), metavar="head,frozen,finetune",
               help="head: extract once + head-train; frozen: the classic frozen loop; finetune: full fine-tune.")
@_study_option("solvers", type=CommaList(str), metavar="sgd,ridge,lbfgs,knn", help="Solvers of mode head.")
@_study_option("seeds", type=POSITIVE_INT, help="Seeds per row (ridge, lbfgs, knn: one run, they have none).")
@_study_option("seed", type=SEED, help="The first seed.")
@_study_option("weights", metavar=WEIGHTS_METAVAR, help="Weights of every model without @WEIGHTS.")
@_study_option("image_size", type=IMAGE_SIZE, metavar="N", help="Crop size (default: each model's native size).")
@_study_option("epochs", type=POSITIVE_INT, help="Epochs of head-train and of the frozen loop.")
@_study_option("finetune_epochs", type=POSITIVE_INT, help="Epochs of the fine-tunes (default: --epochs).")
@_study_option("batch_size", type=POSITIVE_INT, help="Mini-batch size.")
@_study_option("optimizer", type=click.Choice(["sgd", "adam", "adamw"]), help="Optimizer of every training.")
@_study_option("lr", type=POSITIVE_FLOAT, help="Learning rate of every training.")
@_study_option("momentum", type=NON_NEGATIVE_FLOAT, help="SGD momentum.")
@_study_option("weight_decay", type=NON_NEGATIVE_FLOAT, help="Weight decay.")
@_study_option("val_fraction", type=FRACTION, help="Carved val fraction (no ROOT/val).")
@_study_option("test_fraction", type=FRACTION, help="Carved test fraction (no ROOT/test).")
@_study_option("split_seed", type=SEED, help="Seed of the carved splits.")
@_study_option("cache_dir", type=click.Path(file_okay=False), help="Folder of the feature caches (shared).")
@_study_option("device", type=DEVICE_CHOICE, help="Device of extraction and the torch loops.")
@_study_option("nproc", type=POSITIVE_INT, help="Processes of extract and finetune (torchrun).")
@_study_option("num_workers", type=WORKERS, help="Decode workers of the torch steps.")
@_study_option("bootstrap", type=POSITIVE_INT, help="Resamples of the report's paired comparisons.")
@click.option("--force", is_flag=True, help="Start a study folder made by a different plan over.")
@click.option("--list", "list_", is_flag=True, help="Print one featcache command per pending run; run nothing.")
@click.option("--report-only", is_flag=True, help="Run nothing; report whatever finished.")
@click.option("--quiet", is_flag=True, help="No live overview (one line per finished run).")
def study(plan_file, force, list_, report_only, quiet, **options):
    """Backbones x modes x seeds as one resumable study, then one report (report.md/.html/.csv/.json).

    Cheap first (extractions and cached heads before the torch loops); finished runs are reused, a killed
    study continues where it stopped, the plan is written to OUT/plan.toml.

    \b
    Example:
      featcache study --data demo --models resnet18@none,squeezenet1_0@none --modes head,frozen,finetune \\
        --seeds 2 --epochs 3 --image-size 32 --out studies/demo
      featcache study studies/demo/plan.toml            # again: nothing trains, the report is rewritten
      featcache study studies/demo/plan.toml --list     # one command per pending run (a Slurm array)
      featcache study studies/demo/plan.toml --report-only
    """
    from featcache.study.plan import plan_from
    from featcache.study.runner import list_commands, run_study

    plan = plan_from(options, plan_file=plan_file)
    if list_:
        for line in list_commands(plan, force=force):
            click.echo(line)
        return
    run_study(plan, force=force, report_only=report_only, progress=not quiet, log=click.echo)


QUICK_BENCH_MODELS = ("resnet18",)  # bench --quick without --models


@cli.command()
@config_option(BenchConfig, "models", type=CommaList(str), show_default="resnet18,googlenet; with --quick: resnet18",
               help="Backbones, comma-separated.")
@config_option(BenchConfig, "data", metavar="DIR|demo", help="The images every path reads.")
@config_option(BenchConfig, "epochs", help="Epochs of every training path.")
@config_option(BenchConfig, "image_size", type=IMAGE_SIZE, metavar="N",
               help="Crop size fed to the networks (default: the model's native size, 224, as in the study). "
                    + IMAGE_SIZE_LIMIT)
@config_option(BenchConfig, "batch_size", help="Training and extraction batch size.")
@config_option(BenchConfig, "weights", metavar="none|imagenet|PATH",
               help="Backbone weights (speed does not depend on them; 'none' needs no network).")
@config_option(BenchConfig, "device", type=click.Choice(["cpu", "cuda"]))
@precision_option(BenchConfig)
@config_option(BenchConfig, "repeat", help="Runs of every path (interleaved); medians reported.")
@config_option(BenchConfig, "quick", help="Smoke run (about 40 s on an idle machine): tiny demo, 32 px, 2 epochs, "
                                          "1 repeat, no fine-tune.")
@config_option(BenchConfig, "finetune", "--finetune/--no-finetune",
               help="Path 6, the full fine-tune (the slowest); --no-finetune skips it.")
@config_option(BenchConfig, "scale_factors", type=CommaList(int), help="Extraction at these multiples of the images.")
@config_option(BenchConfig, "scale_epochs", type=CommaList(int), help="head-train at these epoch counts.")
@config_option(BenchConfig, "out", type=click.Path(file_okay=False), help="Folder of the result JSON.")
@config_option(BenchConfig, "work_dir", type=click.Path(file_okay=False),
               help="Keep datasets and caches here (default: a temporary folder, removed).")
@click.option("--compare", nargs=2, default=None, type=click.Path(exists=True, dir_okay=False), metavar="A.json B.json",
              help="Show two results side by side instead of running.")
def bench(compare, **options):
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

    if compare:
        click.echo(fb.compare(fb.load_result(compare[0]), fb.load_result(compare[1]), sources=compare), nl=False)
        return
    ctx = click.get_current_context()
    if options["quick"] and ctx.get_parameter_source("models") == click.core.ParameterSource.DEFAULT:
        options["models"] = QUICK_BENCH_MODELS
    doc, path = fb.run_bench(config_from(BenchConfig, options), command=_command_line(ctx), log=click.echo)
    click.echo(fb.render(doc), nl=False)
    click.echo(f"result: {path}")


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="File to write.  [default: RUN_DIR/model.pt2 (exported), model.pt (torchscript), "
                   "model-state-dict.pt]")
@click.option("--format", "fmt", type=click.Choice(["exported", "torchscript", "state-dict"]), default="exported",
              show_default=True, help="exported: torch.export .pt2, plain torch.export.load works; torchscript: "
                                      "torch.jit (deprecated by torch); state-dict: for featcache.load_model.")
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
      featcache export runs/20261130-101500-head-resnet18 --out model.pt2
      featcache export runs/20261130-101500-finetune-resnet18 --out model-sd.pt --format state-dict
      python -c "import torch; model = torch.export.load('model.pt2').module()"   # no featcache needed
    """
    from featcache.exporting import export as run_export

    run_export(run_dir, out=out, format=fmt, weights=weights, cache=cache_file, data_root=data_root, atol=atol,
               log=click.echo)


from featcache.api import predict as api_predict  # noqa: E402  (predict --precision's default)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, metavar="[RUN_DIR] IMAGE_OR_DIR...")
@click.option("--model-file", default=None, type=click.Path(dir_okay=False),
              help="A file written by featcache export (else the first argument is a run directory or such a file).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Write the predictions here as CSV (default: CSV on stdout).")
@click.option("--batch-size", default=64, show_default=True, type=POSITIVE_INT, help="Images per forward pass.")
@click.option("--num-workers", type=WORKERS, default=-1, show_default=WORKERS_DEFAULT, help=WORKERS_HELP)
@click.option("--device", default="cpu", show_default=True, type=DEVICE_CHOICE)
@click.option("--weights", default=None, metavar="PATH",
              help="With a head-train RUN_DIR whose cache came from --weights PATH: that file.")
@precision_option(api_predict)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict(inputs, model_file, out, batch_size, num_workers, device, weights, precision, quiet):
    """Predict the class of images with an exported model or a run: class and probability per class.

    Images are batched and decoded in worker processes; folders are walked recursively.
    Unreadable images are listed (stderr and the CSV's error column), never fatal.

    \b
    Example:
      featcache predict --model-file model.pt2 ./new_images --out predictions.csv
      featcache predict runs/20261130-101500-head-resnet18 scan1.png scan2.png
    """
    from featcache.prediction import predict as run_predict

    if model_file is None and len(inputs) < 2:
        raise UserError("Give --model-file FILE, or a run directory (or exported model file) before the images.")
    model, images = (inputs[0], inputs[1:]) if model_file is None else (model_file, inputs)
    result = run_predict(model, list(images), batch_size=batch_size, num_workers=num_workers, device=device,
                         weights=weights, progress=not quiet, precision=precision)
    _write_or_echo(result.to_csv(), out)
    for path, reason in result.failed:
        click.echo(f"unreadable: {path} ({reason})", err=True)
    click.echo(f"{len(result.rows)} images predicted, {len(result.failed)} unreadable"
               + (f"; wrote {out}" if out else ""), err=True)


def _write_or_echo(text: str, out: str | None) -> None:
    """Write text to the file `out` (atomically, creating its folder), or to stdout when out is None."""
    from featcache.files import atomic_write_bytes

    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, text.encode())
    else:
        click.echo(text, nl=False)
