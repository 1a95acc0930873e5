"""Predict the class of new images with an exported model (or a run directory): batched, decoded in workers.

An unreadable image is listed in `Predictions.failed` with its reason and never stops the others.
Never imports jax.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from featcache import metrics
from featcache.datasets import IMAGE_EXTENSIONS, ImageDataset, Sample, SkipUnreadable, collate_readable
from featcache.errors import UserError
from featcache.precision import features, prepare as prepare_net, resolve as resolve_precision
from featcache.progress import progress_bar


@dataclass(frozen=True)
class Prediction:
    """One readable image: its predicted class and the probability of every class."""

    path: str
    predicted: str  # a class name
    probabilities: tuple[float, ...]  # (C,) in class_names order


@dataclass(frozen=True)
class Predictions:
    """The result of `predict`: rows in input order, unreadable images apart."""

    class_names: list[str]
    rows: list[Prediction]
    failed: list[tuple[str, str]]  # (path, reason) of each unreadable image
    logits: np.ndarray  # (len(rows), K) float32, K = 1 for two classes

    def to_csv(self) -> str:
        """CSV text: path, predicted, prob_<class>..., error; unreadable images last, with their reason."""
        lines = [_csv_line(["path", "predicted", *(f"prob_{c}" for c in self.class_names), "error"])]
        for r in self.rows:
            lines.append(_csv_line([_cell(r.path), _cell(r.predicted), *(f"{p:.6f}" for p in r.probabilities), ""]))
        for path, reason in self.failed:
            lines.append(_csv_line([_cell(path), "", *([""] * len(self.class_names)), _cell(reason)]))
        return "".join(lines)


# A cell a spreadsheet would run as a formula starts with one of these (OWASP, "CSV Injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_line(cells: list[str]) -> str:
    """One CSV row ending in "\\n"; a cell holding a newline or a carriage return is quoted."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(cells)  # csv quotes the characters of its line terminator
    return buf.getvalue()[:-2] + "\n"


def _cell(text: str) -> str:
    """A text cell of the predictions CSV: a leading single quote when a spreadsheet would read it as a formula."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def predict(model: nn.Module | str | Path, images: str | Path | Sequence[str | Path], *, batch_size: int = 64,
            num_workers: int = -1, device: str = "cpu", weights: str | None = None,
            progress: bool = False, precision: str = "auto") -> Predictions:
    """Classify images with an exported model.

    Args:
        model: a module from `featcache.load_model`, the path of a file written by `featcache export`,
            or a finished run directory (its module is built in memory, unchecked).
        images: image files and folders (walked recursively: png, jpg, jpeg, tif, tiff, bmp, gif, webp;
            hidden entries skipped).
        batch_size: images per forward pass.
        num_workers: DataLoader processes decoding images; -1 = half the cores, at most 4. Use 0 in a
            process that has loaded JAX (workers fork).
        device: "cpu", "cuda", "cuda:N" or "auto".
        weights: for a head-train run directory whose cache came from a weights file: that file.
        progress: a progress bar on an interactive stderr.
        precision: "fp32", "bf16" or "auto" (featcache.precision): the backbone's arithmetic; the head is float32.

    Returns:
        Predictions. Raises UserError for a bad model, a path that does not exist or no images at all.
    """
    from featcache.backbones import pick_device

    if batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    paths = collect_images([images] if isinstance(images, (str, Path)) else images)
    module = resolve_model(model, weights=weights)
    torch_device = pick_device(device)
    arithmetic = resolve_precision(precision, str(torch_device))
    module = prepare_net(module, torch_device, arithmetic)
    if num_workers < 0:
        from featcache.environment import default_num_workers

        num_workers = default_num_workers()
    from featcache.environment import worker_context

    # Path() / path is the path as given (absolute or relative to the working directory).
    images_dataset = ImageDataset(Path(), [Sample(p, -1) for p in paths], module.transform)
    loader = torch.utils.data.DataLoader(
        SkipUnreadable(images_dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_readable, pin_memory=torch_device.type == "cuda",
        multiprocessing_context=worker_context(num_workers))
    num_classes = len(module.class_names)
    logits, kept, failed = [], [], []
    with progress_bar(progress) as bar:
        task = bar.add_task("predict", total=len(paths), info="") if bar else None
        for batch, index, failures in loader:
            failed += [(paths[i], reason) for i, reason in failures]
            if batch is not None:
                logits.append(_logits(module, batch[0], device=torch_device, arithmetic=arithmetic))
                kept += index
            if bar:
                bar.update(task, advance=len(index) + len(failures), info=f"{len(failed)} unreadable")
    k = 1 if num_classes == 2 else num_classes
    all_logits = np.concatenate(logits) if logits else np.zeros((0, k), np.float32)  # (N, K)
    probabilities = metrics.probabilities(all_logits, num_classes)  # (N, C)
    predicted = metrics.predict(all_logits, num_classes)  # (N,)
    rows = [Prediction(path=paths[i], predicted=module.class_names[c], probabilities=tuple(float(p) for p in prob))
            for i, c, prob in zip(kept, predicted, probabilities)]
    return Predictions(class_names=list(module.class_names), rows=rows, failed=failed, logits=all_logits)


def _logits(module: nn.Module, images: torch.Tensor, *, device, arithmetic: str) -> np.ndarray:
    """(B, K) float32 logits: the backbone by extract's forward (precision.features), the head in float32."""
    if isinstance(getattr(module, "backbone", None), nn.Module) and isinstance(getattr(module, "head", None), nn.Module):
        with torch.inference_mode():
            return module.head(features(module.backbone, images, device=device, precision=arithmetic)).cpu().numpy()
    return features(module, images, device=device, precision=arithmetic).cpu().numpy()


def resolve_model(model: nn.Module | str | Path, *, weights: str | None = None) -> nn.Module:
    """A module with `.class_names` and `.transform`: as given, loaded from an export, or built from a run."""
    from featcache.exporting import build_module, load_model

    if isinstance(model, nn.Module):
        if not hasattr(model, "class_names") or not hasattr(model, "transform"):
            raise UserError("The model has no .class_names/.transform; load it with featcache.load_model(PATH).")
        return model
    path = Path(model)
    if path.is_dir():
        return build_module(path, weights=weights)
    if weights is not None:
        raise UserError("--weights is only for a head-train run directory; an exported model holds its weights.")
    return load_model(path)


def collect_images(items: Sequence[str | Path]) -> list[str]:
    """Image paths from files (kept as given) and folders (walked recursively, sorted); UserError if none."""
    paths: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            for folder, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                paths += [os.path.join(folder, f) for f in sorted(files)
                          if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        elif p.exists():
            paths.append(str(p))
        else:
            raise UserError(f"{p} does not exist; pass image files or folders of images.")
    if not paths:
        shown = ", ".join(str(i) for i in list(items)[:3]) or "(nothing)"
        raise UserError(f"No images found in {shown} ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "pass image files or folders of images.")
    return paths
