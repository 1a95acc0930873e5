"""The arithmetic of a backbone's forward pass: `--precision fp32|bf16|auto`, resolved per device, and the
one forward context every torch path uses (extract, the classic frozen loop, finetune, predict, bench).

* fp32: float32 arithmetic, the network and its inputs in channels_last memory layout (the same numbers
  up to summation order; 1.3-1.9x faster than NCHW on this project's CPUs for ResNets and GoogLeNet).
* bf16: `torch.autocast(bfloat16)` (CPU or CUDA) with channels_last; outputs are cast back to float32.
* auto: bf16 where the device computes it natively (a CPU with the avx512_bf16 or AMX flags, a CUDA
  device of compute capability >= 8.0), else fp32.

`resolve(precision, device)` is torch-free for the CPU (it reads /proc/cpuinfo), so extract's cache key,
which holds the resolved precision, is computed without starting torch. Features are stored as
float32/float16 as before, whatever the arithmetic.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from featcache.errors import UserError

PRECISIONS = ("fp32", "bf16", "auto")  # what --precision accepts
RESOLVED = ("fp32", "bf16")  # what a cache key and a run record
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
CUDA_BF16_CAPABILITY = (8, 0)  # Ampere and later


def check(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a UserError naming them."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    return precision


@functools.lru_cache(maxsize=None)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in `cpuinfo` (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: str) -> bool:
    """Does `device` ("cpu", "cuda", "cuda:N", "auto") compute bfloat16 natively? CUDA asks torch."""
    if device == "cpu":
        return bool(cpu_flags() & set(CPU_BF16_FLAGS))
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return native_bf16(device)
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= CUDA_BF16_CAPABILITY


def resolve(precision: str, device: str, *, amp: bool = False) -> str:
    """"fp32" or "bf16": `precision` with auto decided for `device`; amp (the older --amp flag) means bf16."""
    check(precision)
    if amp:
        return "bf16"
    if precision == "auto":
        return "bf16" if native_bf16(str(device)) else "fp32"
    return precision


def prepare(net, device, precision: str):
    """`net` in eval mode on `device` in the layout of `precision` (channels_last for both)."""
    import torch

    return net.to(device).eval().to(memory_format=torch.channels_last)


def to_input(images, device):
    """(B, 3, S, S) float32 images on `device` in channels_last layout."""
    import torch

    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def autocast(device, precision: str):
    """The autocast context of a resolved `precision` on `device` (a no-op for fp32)."""
    import torch

    device_type = getattr(device, "type", str(device).split(":")[0])
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def features(net, images, *, device, precision: str):
    """(B, D) float32 outputs of `net` (prepared) on a (B, 3, S, S) batch: THE forward of extract and of the
    classic frozen loop, so the two frozen modes compute the same features at every precision."""
    import torch

    with torch.no_grad(), autocast(device, precision):  # no_grad, not inference_mode: the loop's head trains on them
        out = net(to_input(images, device))  # (B, D)
    return out.float()
