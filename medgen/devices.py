"""Device selection: ``auto`` (CUDA if usable, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import re
from typing import Any

import torch

from medgen.errors import BadInputError

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def cuda_usable() -> bool:
    """True when this torch build has CUDA and a device can actually be used."""
    return bool(torch.backends.cuda.is_built() and torch.cuda.is_available() and torch.cuda.device_count() > 0)


def select_device(name: str = "auto") -> torch.device:
    """Resolve a device name to a usable ``torch.device``.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        BadInputError: for an unknown name, or a CUDA device that this machine does not have.
    """
    name = (name or "auto").strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise BadInputError(f"Unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if name == "auto":
        return torch.device("cuda:0" if cuda_usable() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not cuda_usable():
        raise BadInputError(
            f"Device {name!r} was requested but CUDA is not usable here "
            f"(torch {torch.__version__}, CUDA built: {torch.backends.cuda.is_built()}). "
            "Choose 'cpu' or 'auto', or reinstall a CUDA build of PyTorch."
        )
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise BadInputError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return torch.device(f"cuda:{index}")


def describe_device(device: torch.device) -> dict[str, Any]:
    """Name, type and (for CUDA) memory and compute capability of ``device``, for manifests and the UI."""
    info: dict[str, Any] = {"device": str(device), "type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            total_memory_gib=round(props.total_memory / 2**30, 2),
            compute_capability=f"{props.major}.{props.minor}",
        )
    else:
        info.update(name="CPU", threads=torch.get_num_threads())
    return info
