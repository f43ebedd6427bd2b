"""Read the tensors of a TorchScript archive without loading (compiling or running) its code.

``torch.jit.load`` compiles the archive's TorchScript and runs its ``__setstate__`` methods, and
``torch.load(weights_only=True)`` refuses the archive's ``__torch__`` classes. This reader unpickles
``data.pkl`` with an unpickler that knows only TorchScript objects (kept as plain attribute dicts),
tensor rebuilding, ``OrderedDict`` and TorchScript's typed-list wrappers; anything else
in the pickle is refused.
Written by hand because neither torch nor safetensors offers a code-free TorchScript reader.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from medgen.errors import ModelError

#: storage classes that may appear in a TorchScript pickle, and the dtype they hold
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


#: constructors TorchScript pickles wrap typed lists and tagged values in; each returns its argument
_TYPED_LIST_BUILDERS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")


def _keep_value(value: Any, *type_tag: Any) -> Any:
    return value


class _ScriptObject:
    """Stand-in for a TorchScript module: only its attribute dict is kept."""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(flat: torch.Tensor, offset: int, size: tuple, stride: tuple, *unused: Any) -> torch.Tensor:
    return flat.as_strided(size, stride, offset).clone()


class _TensorOnlyUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, root: str, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._root = archive, root

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _TYPED_LIST_BUILDERS:
            return _keep_value
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only tensors and TorchScript modules are read")

    def persistent_load(self, record: Any) -> torch.Tensor:
        _, storage_type, key, _, _ = record
        raw = bytearray(self._archive.read(f"{self._root}/data/{key}"))
        return torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)


def _collect(node: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, value in getattr(node, "attributes", {}).items():
        if isinstance(value, torch.Tensor):
            tensors[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", tensors)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named tensors (parameters and buffers) of a TorchScript archive, without running its code.

    Returns:
        name -> CPU tensor, names as in ``torch.jit.load(path).state_dict()``.

    Raises:
        ModelError: the file is not a TorchScript zip archive, or its pickle holds other objects.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if not pickles:
                raise ModelError(f"{path} is not a TorchScript archive (no data.pkl).")
            root = pickles[0].split("/")[0]
            model = _TensorOnlyUnpickler(archive, root, archive.read(pickles[0])).load()
            tensors: dict[str, torch.Tensor] = {}
            _collect(model, "", tensors)
    # a damaged or crafted archive fails inside torch (views out of bounds, wrong constructor arguments,
    # modules that contain themselves): every such failure is a file that cannot be used, not a bug here
    except (zipfile.BadZipFile, OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError, TypeError,
            RecursionError, AttributeError, IndexError) as error:
        raise ModelError(f"Could not read the tensors of TorchScript archive {path}: {error}") from error
    return tensors
