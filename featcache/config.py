"""Frozen configuration dataclasses: one click option maps to one field (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass


SPLITS = ("train", "val", "test")  # the splits of a dataset and of its cache, in this order
DEFAULT_STREAM_MEMORY_MIB = 1024  # head-train --stream-memory: memory for the blocks of streamed features


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how missing val/test splits are carved from train."""

    root: str  # a folder ROOT/{train,val,test}/<class>/<image>, a manifest .csv, or "demo"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    group_by: str | None = None  # regex whose capture group names an image's group (patient); carve whole groups
    strict: bool = False  # unreadable image: fatal instead of skipped and listed
    verify_content: bool = False  # the dataset fingerprint hashes every file's bytes, not its size and mtime


@dataclass(frozen=True)
class ExtractConfig:
    """One backbone run once over every split into one cache file."""

    model: str
    data: DataConfig
    weights: str = "imagenet"  # "imagenet" | "none" | path to a state_dict
    image_size: int | None = None  # crop size; None = the model's native size
    batch_size: int = 64
    num_workers: int = -1  # decode worker processes; -1 = auto (half the cores, at most 4)
    dtype: str = "float32"  # "float32" | "float16"
    device: str = "cpu"
    amp: bool = False  # bf16 autocast on CUDA
    precision: str = "auto"  # "fp32" | "bf16" | "auto" (featcache.precision: bf16 where the device has it natively)
    cache_dir: str = "cache"
    wait: bool = False  # wait for another writer's lock instead of failing


@dataclass(frozen=True)
class TrainConfig:
    """Training of the linear head, shared by head-train and finetune (same names, same defaults)."""

    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "sgd"  # "sgd" | "adam" | "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # "cosine" (CosineAnnealingLR, T_max=epochs, stepped per epoch) | "none"
    standardize: bool = False  # z-score features with train mean/std (head-train only)
    seed: int = 0
    runs_dir: str = "runs"
    class_weight: str = "none"  # "none" | "balanced" | "W1,W2,..." (plan.class_weights, from the train labels)
    operating_point: str = "youden"  # two classes: threshold rule chosen on val (metrics.choose_threshold)
    bootstrap: int = -1  # test-metric resamples; 0 = no intervals; -1 = auto (runs.bootstrap_resamples)


@dataclass(frozen=True)
class FinetuneConfig:
    """What `featcache finetune` trains on and how; the training itself is a TrainConfig."""

    model: str
    data: DataConfig
    weights: str = "imagenet"
    image_size: int | None = None
    augment: bool = False  # RandomResizedCrop + horizontal flip on train images
    freeze_backbone: bool = False  # the classic fixed-feature loop: only the head trains
    amp: bool = False  # bf16 autocast on CUDA
    device: str = "cpu"
    num_workers: int = -1  # -1 = auto
    precision: str = "auto"  # "fp32" | "bf16" | "auto", as extract's (the frozen loop computes what extract does)
    eval_batch_size: int = 64  # val/test passes
    cache_dir: str = "cache"  # where --data demo is rendered


@dataclass(frozen=True)
class BenchConfig:
    """Settings of `featcache bench` (every path gets the same data, epochs, batch size, crop, weights, device)."""

    models: tuple[str, ...] = ("resnet18", "googlenet")
    data: str = "demo"  # "demo" | "demo3" | a dataset folder
    epochs: int = 30
    image_size: int | None = None  # crop size; None = each model's native size (224), as in the study
    batch_size: int = 32  # training batches and extraction batches
    weights: str = "none"  # speed does not depend on the values; "none" needs no network
    device: str = "cpu"  # "cpu" | "cuda"
    precision: str = "auto"  # "fp32" | "bf16" | "auto": of every path (the forward limit also in fp32 NCHW)
    repeat: int = 3  # every path runs this many times, interleaved; medians reported
    quick: bool = False  # tiny demo, 32 px, 2 epochs, 1 repeat: the smoke run a test does
    finetune: bool = True  # path 6, the slowest
    scale_factors: tuple[int, ...] = (1, 2, 4)  # extraction time at these multiples of the images
    scale_epochs: tuple[int, ...] = (30, 100, 300)  # head-train time at these epoch counts
    out: str = "benchmarks/results"  # folder of the result JSON files
    work_dir: str | None = None  # datasets, caches and runs of the benchmark; None = a temporary folder


@dataclass(frozen=True)
class CompareConfig:
    """`featcache compare RUN_A RUN_B`: the paired bootstrap of the runs' test metrics."""

    bootstrap: int = 1000  # stratified resamples, the same rows drawn for both runs
    seed: int = 0
    figure: str | None = None  # a PNG with both runs' ROC curves; None = no figure
