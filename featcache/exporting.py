"""Export a finished run as ONE torch module (cut backbone + linear head), check it, load it back.

The exported module maps images (N, 3, S, S) float32, already passed through the run's eval
transform, to logits (N, K): K = 1 for two classes (sigmoid = probability of class_names[1]),
else K = C (softmax). Its metadata (class names, eval transform description, input size S,
model, weights tag, head shape) travels with it:

* exported (default, `.pt2`): `torch.export` of the module with a dynamic batch dimension; metadata as JSON
  in the archive's extra file `featcache.json`, so plain
  `torch.export.load(path, extra_files={"featcache.json": ""}).module()` works without featcache.
* torchscript: `torch.jit.trace` of the module (deprecated by torch, kept for older code); metadata in the
  same extra file, `torch.jit.load(path, _extra_files={"featcache.json": ""})`.
* state-dict: `torch.save` of {"format", "state_dict", "model", "class_names", "transform",
  "input_size", "head_shape", ...}; `featcache.load_model` rebuilds the module from it.

A head-train run becomes the cut backbone of its cache (same weights; SHA-256 checked) and a
Linear layer holding head.npz with the standardization folded in (W' = W / std,
b' = b - W' mean). A finetune or frozen run becomes its best.pt. Before the file is put in
place, the written file is loaded back and checked: for a head run its logits on a few cached
test images must match ((x - mean) / std) W^T + b on their CACHED features (numpy; what the
JAX head computes) within `atol` plus float32 rounding of the folded layer (FP32_ROUNDING times the
size of its terms; and float16 rounding for float16 caches); for a checkpoint, the eager network's
logits within `atol`.

Never imports jax (tests check `sys.modules`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from featcache import runs
from featcache.backbones import BACKBONES, build_backbone, make_transform
from featcache.backbones.common import first_line
from featcache.backbones.file_source import WEIGHTS_TAG as FILE_WEIGHTS_TAG
from featcache.backbones.file_source import wrap_program
from featcache.errors import UserError
from featcache.files import new_file_mode

FORMATS = ("exported", "torchscript", "state-dict")
DEFAULT_NAMES = {"exported": "model.pt2", "torchscript": "model.pt", "state-dict": "model-state-dict.pt"}
META_FILE = "featcache.json"  # TorchScript extra file holding the metadata
EXPORT_FORMAT = "featcache-export"
EXPORT_VERSION = 1
DEFAULT_ATOL = 1e-4
CHECK_ROWS = 8  # cached test images run through the exported model at export time
FP16_UNIT_ROUNDOFF = 2.0 ** -11  # float16 caches: each stored feature is x (1 + d), |d| <= this
FP32_ROUNDING = 2.0 ** -19  # 32 float32 units of roundoff: the folded layer's float32 error, relative to its terms
CHECKPOINT_MODES = ("finetune", "frozen")
Log = Callable[[str], None]


class ExportedClassifier(nn.Module):
    """`.backbone` (the cut network) then `.head` (nn.Linear(D, K)); images (N, 3, S, S) -> logits (N, K).

    The same submodule names as `make_finetune_net`, so a best.pt state_dict loads into it.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote and what its check measured."""

    path: Path
    format: str  # "exported" | "torchscript" | "state-dict"
    mode: str  # mode of the exported run: "head" | "finetune" | "frozen"
    model: str
    class_names: list[str]
    checked: int  # images run through the written file
    max_abs_diff: float  # largest |logit difference| of the check
    tolerance: float  # largest allowed difference (atol, plus float16 rounding of the cache)


# --------------------------------------------------------------------------- export


def export(run_dir: str | Path, *, out: str | Path | None = None, format: str = "exported",
           weights: str | None = None, cache: str | Path | None = None, data_root: str | Path | None = None,
           atol: float = DEFAULT_ATOL, log: Log = print) -> ExportResult:
    """Export a finished head-train, finetune or frozen run as one torch module, checked before it is written.

    Args:
        run_dir: the run directory.
        out: the file to write; None = RUN_DIR/model.pt2 (exported), model.pt (torchscript) or
            model-state-dict.pt.
        format: "exported" (torch.export, .pt2), "torchscript" or "state-dict".
        weights: head runs whose cache was extracted with `--weights PATH` need that file again
            (its SHA-256 must equal the cache's); not used otherwise.
        cache: the head run's cache file, when it is no longer where metrics.json says.
        data_root: where the cached images now are, when the dataset moved (head runs; the check reads a few).
        atol: largest allowed |logit difference| of the check.
        log: where one-line messages go.

    Returns:
        The ExportResult. Raises UserError for a bad run, missing inputs or a failed check
        (then nothing is written).
    """
    if format not in FORMATS:
        raise UserError(f"Unknown export format {format!r}; choose one of: {', '.join(FORMATS)}.")
    run = load_finished_run(run_dir)
    module, meta, check = _module_and_check(run, weights=weights, cache=cache, data_root=data_root, atol=atol)
    inputs, _, tolerance = check
    out = _out_path(out, run_dir=run.run_dir, format=format)
    worst = _write_checked(module, meta, out, format=format, check=check, mode=run.mode)
    log(f"exported {run.mode} run {run.run_dir} ({meta['model']}, {len(meta['class_names'])} classes) "
        f"-> {out} ({format}); check: max |logit diff| {worst:.2e} on {len(inputs)} images")
    return ExportResult(path=out, format=format, mode=run.mode, model=meta["model"],
                        class_names=list(meta["class_names"]), checked=len(inputs), max_abs_diff=worst,
                        tolerance=float(np.max(tolerance)))


def _module_and_check(run: runs.RunResult, *, weights: str | None, cache: str | Path | None,
                      data_root: str | Path | None, atol: float) -> tuple[ExportedClassifier, dict, tuple]:
    """(module, metadata, check) of a run: check holds what the written file must reproduce.

    check = (images (n, 3, S, S) float32, expected logits (n, K) float64, tolerance (n, K) float64).
    """
    if run.mode == "head":
        module, meta, cache_meta = _from_head_run(run, weights=weights, cache=cache)
        module.check_precision = cache_meta.get("precision")  # the check runs the backbone as extract did
        return module, meta, _head_check(module, run, cache_meta, data_root=data_root, atol=atol)
    if weights is not None:
        raise UserError(f"{run.run_dir} is a {run.mode} run: its best.pt holds every weight; drop --weights.")
    module, meta = _from_checkpoint(run)
    inputs = _random_images(meta["input_size"])
    with torch.no_grad():
        expected = module(inputs).double().numpy()  # (n, K)
    return module, meta, (inputs, expected, np.full(expected.shape, float(atol)))


def _out_path(out: str | Path | None, *, run_dir: Path, format: str) -> Path:
    """The file to write (default: in the run directory), its folder made; UserError if it is a folder."""
    default_name = DEFAULT_NAMES[format]
    out = Path(out) if out is not None else run_dir / default_name
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out / default_name}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write_checked(module: ExportedClassifier, meta: dict, out: Path, *, format: str, check: tuple,
                   mode: str) -> float:
    """Write `module` beside `out`, load it back, and rename it into place only if its logits pass `check`.

    Returns the largest |logit difference|; a failed check is a UserError and leaves nothing written.
    """
    inputs, expected, tolerance = check
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(module, meta, tmp, format=format)
        loaded = load_model(tmp)
        with torch.no_grad():
            got = _check_logits(loaded, inputs, getattr(module, "check_precision", None))  # (n, K)
        diff = np.abs(got - expected)
        worst = float(np.max(diff))
        if not (diff <= tolerance).all():  # also catches NaN
            raise UserError(
                f"Export check failed: the exported model's logits differ from the run's by up to {worst:.3g} "
                f"(allowed {float(np.max(tolerance)):.3g}) on {len(inputs)} images; "
                + _check_hint(mode)
            )
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 -> what the umask gives any new file
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return worst


def _check_logits(loaded: nn.Module, inputs: torch.Tensor, arithmetic: str | None) -> np.ndarray:
    """(n, K) float64 logits of the written module; arithmetic: the precision of the cache the head was trained on
    (its backbone then runs extract's forward, precision.features), None = a plain call (older caches)."""
    if arithmetic is None:
        return loaded(inputs).double().numpy()
    from featcache.precision import features, prepare

    cpu = torch.device("cpu")
    feats = features(prepare(loaded.backbone, cpu, arithmetic), inputs, device=cpu, precision=arithmetic)
    return loaded.head(feats).double().numpy()


def _check_hint(mode: str) -> str:
    if mode == "head":
        return ("the backbone rebuilt here does not compute the cached features (a cache extracted on CUDA "
                "with TF32 or --amp, another torch version, or images changed since extraction); re-extract on "
                "the CPU and train the head again, or pass a larger --atol.")
    return "the traced module does not reproduce the checkpoint's network; export with --format state-dict."


def build_module(run_dir: str | Path, *, weights: str | None = None,
                 cache: str | Path | None = None) -> nn.Module:
    """The exported module of a finished run, in memory and unchecked, with the attributes of `load_model`."""
    run = load_finished_run(run_dir)
    if run.mode == "head":
        module, meta, _ = _from_head_run(run, weights=weights, cache=cache)
    else:
        module, meta = _from_checkpoint(run)
    return _attach(module, meta)


def load_finished_run(run_dir: str | Path) -> runs.RunResult:
    """The RunResult of a finished run directory; UserError naming what is wrong otherwise."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"{run_dir} is a file, not a run directory; pass the directory written by featcache "
                        "head-train or finetune (an exported model goes to featcache predict --model-file).")
    if run_dir.is_dir() and not runs.is_finished(run_dir) and (run_dir / "finetune.json").is_file():
        raise UserError(f"{run_dir} is an unfinished finetune run (no metrics.json: still running or killed); "
                        f"finish it with featcache finetune ... --resume {run_dir}, then export it.")
    run = runs.load_run(run_dir)  # UserError when missing or unfinished
    if run.mode not in ("head", *CHECKPOINT_MODES):
        raise UserError(f"{run_dir} is a {run.mode!r} run; only head, finetune and frozen runs can be exported.")
    return run


# --------------------------------------------------------------------------- head-train runs


def _from_head_run(run: runs.RunResult, *, weights: str | None,
                   cache: str | Path | None) -> tuple[ExportedClassifier, dict, dict]:
    """(module, metadata, cache metadata) of a head-train run: its cache's backbone + head.npz, folded."""
    from featcache.cache import read_meta

    head_file = run.run_dir / runs.HEAD_FILE
    solver = str(run.extra.get("solver") or "")
    if "knn" in solver or "-shot-" in solver:
        raise UserError(f"{run.run_dir} is a {solver} probe run, which has no linear head to export (k-NN keeps the "
                        "train features, few-shot runs many draws); export a --solver sgd, ridge or lbfgs run.")
    if not head_file.is_file():
        raise UserError(f"{run.run_dir} has no {runs.HEAD_FILE}, so there is no trained head to export; "
                        "train one with featcache head-train.")
    head = runs.load_head(head_file)
    cache_path = Path(cache) if cache is not None else Path(run.cache.get("path") or "")
    if cache is None and not run.cache.get("path"):
        raise UserError(f"{run.run_dir} records no cache file; pass --cache FILE (the cache it was trained on).")
    if not cache_path.is_file():
        raise UserError(f"The cache {cache_path} that {run.run_dir} was trained on does not exist (moved, or a "
                        "relative path from another folder); pass --cache FILE.")
    meta = read_meta(cache_path)
    if run.cache.get("key") and meta.get("key") != run.cache["key"]:
        raise UserError(f"{cache_path} is not the cache {run.run_dir} was trained on (its key differs); "
                        "pass the right --cache FILE.")
    weight, bias = head["weight"].astype(np.float64), head["bias"].astype(np.float64)  # (K, D), (K,)
    mean, std = head["mean"].astype(np.float64), head["std"].astype(np.float64)  # (D,), (D,)
    class_names = [str(c) for c in head["class_names"]]
    if class_names != list(meta["class_names"]) or weight.shape[1] != meta["feature_dim"]:
        raise UserError(f"{head_file} does not fit {cache_path} (classes or feature size differ); "
                        "pass the cache the run was trained on with --cache FILE.")
    if not all(np.isfinite(a).all() for a in (weight, bias, mean, std)):
        raise UserError(f"{head_file} holds non-finite weights (the run diverged); train again with a lower --lr.")

    backbone = build_backbone(meta["model"], weights=_weights_argument(run, meta, weights),
                              image_size=meta["transform"]["crop"])
    if backbone.weights_tag != meta["weights"] or backbone.weights_sha256 != meta["weights_sha256"]:
        raise UserError(
            f"The {meta['model']} weights found here ({backbone.weights_tag}, sha256 "
            f"{backbone.weights_sha256[:12] or '-'}) are not those the cache was extracted with ({meta['weights']}, "
            f"sha256 {meta['weights_sha256'][:12] or '-'}); pass the original file with --weights PATH."
        )
    # Fold the standardization into the Linear layer: ((x - m) / s) W^T + b = x (W / s)^T + (b - (W / s) m).
    folded = weight / std[None, :]  # (K, D)
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(folded.astype(np.float32)))
        linear.bias.copy_(torch.from_numpy((bias - folded @ mean).astype(np.float32)))
    module = ExportedClassifier(backbone.net, linear).eval()
    return module, _metadata(run, model=meta["model"], weights_tag=meta["weights"], class_names=class_names,
                             transform=meta["transform"], head_shape=weight.shape), meta


def _weights_argument(run: runs.RunResult, meta: dict, weights: str | None) -> str:
    """The `weights` argument of build_backbone that rebuilds the cache's backbone (its `weights` attr)."""
    tag = meta["weights"]
    if tag == FILE_WEIGHTS_TAG or tag.startswith("lite0-package:"):  # the backbone file's own; the package's
        if weights is not None:
            raise UserError(f"{run.run_dir}'s cache used {tag} weights, which need no --weights; drop --weights.")
        return FILE_WEIGHTS_TAG if tag == FILE_WEIGHTS_TAG else "lite0-package"
    if tag.startswith("file:"):
        if weights is None:
            raise UserError(
                f"{run.run_dir} was trained on features of the weights file {tag[5:]}; pass --weights PATH to that "
                f"file (sha256 {meta['weights_sha256'][:12]}...)."
            )
        if not os.path.isfile(weights):
            raise UserError(f"Weights file {weights} does not exist; pass the file the cache was extracted with.")
        return weights
    if weights is not None:
        raise UserError(f"--weights is only for runs whose cache was extracted from a weights file; "
                        f"{run.run_dir}'s cache used {tag}; drop --weights.")
    if tag == "none":
        return "none"
    if tag == _imagenet_tag(meta["model"]):
        return "imagenet"  # from the torch hub / Hugging Face cache (downloaded there by extract)
    raise UserError(f"The cache of {run.run_dir} was extracted with weights {tag}, which this featcache does "
                    "not build; extract and train the head again.")


def _imagenet_tag(model: str) -> str:
    """The weights tag of --weights imagenet for `model` (torchvision: its weights enum; timm: its name)."""
    return f"imagenet:{BACKBONES[model].weights_enum}" if model in BACKBONES else f"imagenet:{model}"


def _head_check(module: ExportedClassifier, run: runs.RunResult, meta: dict, *, data_root: str | Path | None,
                atol: float) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images (n, 3, S, S), expected logits (n, K) float64, tolerance (n, K)) from cached test rows."""
    from featcache.cache import load_features, load_paths
    from featcache.datasets import load_image

    features, _, _ = load_features(meta["path"], "test")  # (N, D) float16|float32
    paths = load_paths(meta["path"], "test")
    rows = np.unique(np.linspace(0, len(paths) - 1, min(CHECK_ROWS, len(paths))).round().astype(int))
    head = runs.load_head(run.run_dir / runs.HEAD_FILE)
    x = features[rows].astype(np.float64)  # (n, D)
    weight, mean, std = (head[k].astype(np.float64) for k in ("weight", "mean", "std"))
    expected = ((x - mean) / std) @ weight.T + head["bias"].astype(np.float64)  # (n, K)
    # The folded layer computes x W'^T + b' in float32: where W' = W / std is large (a feature of tiny scale in
    # train, std ~1e-10) its terms cancel and leave float32 rounding, relative to their size.
    folded_w = module.head.weight.detach().double().numpy()  # (K, D)
    folded_b = module.head.bias.detach().double().numpy()  # (K,)
    terms = np.abs(x) @ np.abs(folded_w).T  # (n, K)
    tolerance = atol + FP32_ROUNDING * (terms + np.abs(folded_b))
    if meta.get("dtype") == "float16":
        # The cached features are rounded to float16: that moves a logit by at most sum_j |W'_kj x_j| u16.
        tolerance += FP16_UNIT_ROUNDOFF * terms
    root = Path(data_root) if data_root is not None else Path(meta["dataset_root"])
    transform = make_transform(meta["transform"])
    images = []
    for r in rows:
        image_path = root / paths[r]
        if not image_path.is_file():
            raise UserError(f"The export check reads {len(rows)} cached test images, but {image_path} is missing; "
                            "pass --data-root DIR (where the dataset is now).")
        images.append(transform(load_image(image_path)))
    return torch.stack(images), expected, tolerance


# --------------------------------------------------------------------------- finetune / frozen runs


def _from_checkpoint(run: runs.RunResult) -> tuple[ExportedClassifier, dict]:
    """(module, metadata) of a finetune/frozen run: the network of its best.pt."""
    from featcache.finetuning import BEST_CKPT

    path = run.run_dir / BEST_CKPT
    if not path.is_file():
        raise UserError(f"{run.run_dir} has no {BEST_CKPT} (training stopped before a good epoch); "
                        "there is nothing to export.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state, model, desc = ckpt["state_dict"], ckpt["model"], ckpt["transform"]
        tag, class_names = ckpt["weights"], list(ckpt["class_names"])
    except Exception as exc:  # unreadable or foreign file
        raise UserError(f"{path} is not a readable featcache checkpoint ({first_line(exc)}); "
                        "train the run again.") from exc
    module = _skeleton(model, weights_tag=tag, input_size=desc["crop"], num_outputs=state["head.weight"].shape[0])
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit a {model} network ({first_line(exc)}); train the run again.") from exc
    return module.eval(), _metadata(run, model=model, weights_tag=tag, class_names=class_names, transform=desc,
                                    head_shape=tuple(state["head.weight"].shape))


def _skeleton(model: str, *, weights_tag: str, input_size: int, num_outputs: int) -> ExportedClassifier:
    """The architecture of an exported `model` (weights to be loaded): cut backbone + Linear(D, num_outputs)."""
    weights = FILE_WEIGHTS_TAG if weights_tag == FILE_WEIGHTS_TAG else "none"  # a file holds its network
    backbone = build_backbone(model, weights=weights, image_size=input_size)
    net = backbone.net
    if model == "googlenet" and weights_tag.startswith("imagenet:"):
        # torchvision builds GoogLeNet with ImageNet weights with transform_input=True, which no
        # state_dict records; without weights it is False.
        net.transform_input = True
    return ExportedClassifier(net, nn.Linear(backbone.spec.feature_dim, num_outputs)).eval()


def _random_images(size: int, n: int = 4) -> torch.Tensor:
    """(n, 3, size, size) seeded normal inputs: the check of a checkpoint export needs no dataset."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=generator)


# --------------------------------------------------------------------------- metadata, write, load


def _metadata(run: runs.RunResult, *, model: str, weights_tag: str, class_names: list[str], transform: dict,
              head_shape: tuple[int, ...]) -> dict[str, Any]:
    from featcache.environment import library_versions

    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "model": model,
        "weights": weights_tag,
        "class_names": list(class_names),
        "transform": dict(transform),  # backbones.make_transform(desc): Resize, CenterCrop, ToTensor, Normalize
        "input_size": int(transform["crop"]),
        "head_shape": [int(n) for n in head_shape],  # (K, D)
        "outputs": "logits (N, K): K = 1 for two classes, sigmoid = P(class_names[1]); else softmax over classes",
        "run": {"dir": str(run.run_dir), "mode": run.mode, "test_acc": run.summary.test_acc,
                "selected_epoch": run.summary.selected_epoch},
        "versions": library_versions(),
    }


def _write(module: ExportedClassifier, meta: dict, path: Path, *, format: str) -> None:
    if format == "exported":
        _write_exported(module, meta, path)
    elif format == "torchscript":
        example = torch.zeros(1, 3, meta["input_size"], meta["input_size"])  # stored in the archive: keep it small
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # ViT's shape asserts, traced as constants
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            traced = torch.jit.trace(module, example, check_trace=False)  # the check below tests it
            torch.jit.save(traced, str(path), _extra_files={META_FILE: json.dumps(meta)})
    else:
        torch.save({**meta, "state_dict": module.state_dict()}, path)


def _write_exported(module: ExportedClassifier, meta: dict, path: Path) -> None:
    """torch.export of `module` with a dynamic batch dimension, the metadata as the extra file featcache.json."""
    example = torch.zeros(2, 3, meta["input_size"], meta["input_size"])
    try:
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                      preserve_module_call_signature=SPLIT)  # load_model splits it again
    except Exception as exc:  # an operation torch.export cannot capture (TorchScript inside, data-dependent code)
        raise UserError(f"torch.export could not capture {meta['model']} ({first_line(exc)}); export with "
                        "--format torchscript or --format state-dict.") from exc
    with open(path, "wb") as f:  # a file object: torch warns about a path not ending in .pt2
        torch.export.save(program, f, extra_files={META_FILE: json.dumps(meta)})


def load_model(path: str | Path) -> nn.Module:
    """Load a model written by `featcache export` (any format: .pt2, TorchScript, state-dict), in eval mode on the CPU.

    Returns:
        A module mapping images (N, 3, S, S) to logits (N, K), with `.class_names`, `.transform`
        (RGB PIL image -> (3, S, S) tensor), `.transform_desc`, `.input_size`, `.model_name` and
        `.metadata` (the stored JSON).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"Model file {path} does not exist; create one with featcache export RUN_DIR --out {path}.")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the file written by featcache export "
                        "(featcache predict also takes a run directory in place of --model-file).")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"{_not_ours(path)} (not a torch.export, TorchScript or torch.save archive); {_HOW}.") \
            from None
    if any(n.endswith("/archive_format") or n.endswith("/models/model.json") for n in names):
        module, meta = _load_program(path, torchscript=False)
    elif any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        module, meta = _load_program(path, torchscript=True)
    else:
        module, meta = _load_state_dict_file(path)
    return _attach(module.eval(), meta)


_HOW = "create one with featcache export RUN_DIR --out FILE"


def _not_ours(path: Path) -> str:
    return f"{path} is not a model exported by featcache"


def _check_format(path: Path, meta: dict) -> None:
    if meta.get("format") != EXPORT_FORMAT or int(meta.get("format_version", 0)) > EXPORT_VERSION:
        raise UserError(f"{path} was written by a newer or unknown featcache export format "
                        f"({meta.get('format')} {meta.get('format_version')}); upgrade featcache.")


def _load_program(path: Path, *, torchscript: bool) -> tuple[nn.Module, dict]:
    """(module, metadata) of a torch.export .pt2 or a TorchScript file with featcache.json inside."""
    kind = "TorchScript" if torchscript else "torch.export"
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            if torchscript:
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            else:
                with open(path, "rb") as f:  # a file object: any file name (torch warns about a path not .pt2)
                    module = _exported_module(torch.export.load(f, extra_files=extra))
    except Exception as exc:
        raise UserError(f"{path} is a corrupt {kind} file ({first_line(exc)}); export it again.") from exc
    if not extra[META_FILE]:
        raise UserError(f"{_not_ours(path)}: a {kind} file without {META_FILE} inside; {_HOW}.")
    meta = json.loads(extra[META_FILE])
    _check_format(path, meta)
    return module, meta


SPLIT = ("backbone", "head")  # the submodules whose call signature an exported program keeps


def _exported_module(program) -> nn.Module:
    """A loaded torch.export program as a module: `.backbone` then `.head` when the program kept their call
    signatures (featcache's own exports), so predict and the export check run the backbone as extract did
    (precision.features) and the head in float32; else the whole program as one module."""
    if not set(SPLIT) <= {entry.fqn for entry in program.module_call_graph}:
        return wrap_program(program.module())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unflatten's notes about constants it re-attaches
        unflat = torch.export.unflatten(program)
    return _SplitProgram(wrap_program(unflat.backbone), wrap_program(unflat.head))


class _SplitProgram(nn.Module):
    """An exported classifier as its two programs: images -> backbone -> features (N, D) -> head -> logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _load_state_dict_file(path: Path) -> tuple[nn.Module, dict]:
    """(module, metadata) of a `--format state-dict` file: the skeleton rebuilt, its state_dict loaded."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{_not_ours(path)} ({first_line(exc)}); {_HOW}.") from exc
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        if isinstance(payload, dict) and "optimizer" in payload:
            raise UserError(f"{path} is a training checkpoint, not an exported model; export its run "
                            "directory with featcache export RUN_DIR (or pass the run directory to predict).")
        raise UserError(f"{_not_ours(path)} (a torch.save file of another kind); {_HOW}.")
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    _check_format(path, meta)
    k, _ = payload["head_shape"]
    module = _skeleton(meta["model"], weights_tag=meta["weights"], input_size=meta["input_size"], num_outputs=k)
    try:
        module.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit a {meta['model']} network ({first_line(exc)}); "
                        "export it again.") from exc
    return module, meta


def _attach(module: nn.Module, meta: dict) -> nn.Module:
    """Give a module the attributes `load_model` promises."""
    module.class_names = list(meta["class_names"])
    module.transform_desc = dict(meta["transform"])
    module.transform = make_transform(meta["transform"])
    module.input_size = int(meta["input_size"])
    module.model_name = meta["model"]
    module.metadata = meta
    return module
