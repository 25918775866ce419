"""Compute device and dtype from the user's --device / --dtype strings."""

from __future__ import annotations

import torch

from .errors import StreamPruneError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` (the CLI default): the first CUDA GPU when one is available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StreamPruneError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise StreamPruneError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamPruneError(f"--device {name} asked for CUDA, but no CUDA GPU is available; use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise StreamPruneError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        device = torch.device("cuda", index)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA (V100s have no bfloat16) and float32 on CPU (fast fp16 kernels are rare)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise StreamPruneError(f"unknown --dtype {name!r}; use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def free_memory_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: free GPU memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available
