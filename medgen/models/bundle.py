"""MONAI bundles (a folder with ``configs/`` and ``models/``) loaded offline and without running their code.

``monai.bundle.ConfigParser`` resolves the config (``@`` references, ``%`` macros); MedGen then builds
the network itself from the allow-list with the resolved arguments, so nothing the bundle names is
imported or instantiated by MONAI's component locator. ``$`` expressions are Python code and are
refused unless the caller trusts the bundle (``allow_expressions=True``). Weights come from
``models/model.safetensors``, ``models/model.pt`` (``weights_only=True``) or, failing both, the tensors
of the TorchScript ``models/model.ts`` read without its code; the network is always MedGen's eager
build of ``network_def``, so adapters can wrap it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from torch import nn

from medgen.errors import ModelError
from medgen.models.registry import build_network, network_factory
from medgen.models.spec import ModelSpec
from medgen.models.torchscript_weights import read_torchscript_tensors
from medgen.models.weights import load_state_dict_checked, read_safetensors, torch_load_weights, unwrap_state_dict

#: config files searched, in order, when none is named
CONFIG_CANDIDATES = ("inference.json", "inference.yaml", "train.json", "train.yaml")
#: keys of a config component that only steer ConfigParser; anything else underscored is refused
_COMPONENT_KEYS = ("_target_", "_desc_")
#: MONAI release that changed SwinUNETR's patch-merging order (see medgen.models.swin_zoo)
_MERGE_ORDER_CHANGED = (1, 5)


def _config_file(bundle_folder: Path, config_name: str | None) -> Path:
    configs = bundle_folder / "configs"
    if config_name is not None:
        path = configs / config_name
        if not path.is_file():
            raise ModelError(f"Bundle config {path} does not exist.")
        return path
    for candidate in CONFIG_CANDIDATES:
        if (configs / candidate).is_file():
            return configs / candidate
    with_network = sorted(
        path for path in configs.glob("*.json") if "network_def" in path.read_text(encoding="utf-8", errors="replace")
    )
    if not with_network:
        raise ModelError(
            f"{bundle_folder} is not a MONAI bundle: no configs/inference.json and no configs/*.json defining "
            "network_def."
        )
    return with_network[0]


def _check_plain(parser: ConfigParser, item_id: str, allow_expressions: bool, seen: set[str]) -> None:
    """Refuse ``$`` expressions, nested components and parser directives in ``item_id`` and what it references."""
    if item_id in seen:
        return
    seen.add(item_id)

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            extra = [key for key in value if key.startswith("_") and key not in _COMPONENT_KEYS]
            if extra or ("_target_" in value and where != "network_def"):
                raise ModelError(
                    f"Bundle item {where} holds a component or parser directive ({extra or value['_target_']}); "
                    "MedGen builds only the network itself from an allow-list."
                )
            for key, sub_value in value.items():
                walk(sub_value, f"{where}::{key}")
        elif isinstance(value, list):
            for index, sub_value in enumerate(value):
                walk(sub_value, f"{where}::{index}")
        elif isinstance(value, str) and value.startswith("$") and not allow_expressions:
            raise ModelError(
                f"Bundle item {where} is a Python expression ({value!r}); expressions are code and are not run. "
                "Replace it by its value in the config, or pass allow_expressions=True if you trust this bundle."
            )
        elif isinstance(value, str) and value.startswith("@"):
            _check_plain(parser, value[1:], allow_expressions, seen)

    walk(parser.get(item_id), item_id)


def _channel_names(metadata: dict[str, Any]) -> list[str]:
    """Class names from ``network_data_format/outputs/pred/channel_def`` (``[]`` when absent or malformed)."""
    channel_def: Any = metadata
    for key in ("network_data_format", "outputs", "pred", "channel_def"):
        channel_def = channel_def.get(key, {}) if isinstance(channel_def, dict) else {}
    try:
        return [str(channel_def[key]) for key in sorted(channel_def, key=int)]
    except (ValueError, TypeError):
        return []


def _monai_version(metadata: dict[str, Any]) -> tuple[int, ...]:
    version = str(metadata.get("monai_version", "0"))
    parts = [int(part) for part in version.split(".")[:2] if part.isdigit()]
    return tuple(parts) or (0,)


def _compat_kwargs(name: str, kwargs: dict[str, Any], metadata: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Adapt SwinUNETR arguments of bundles made before MONAI 1.5 to the installed MONAI."""
    notes: list[str] = []
    if name != "SwinUNETR" or _monai_version(metadata) >= _MERGE_ORDER_CHANGED:
        return kwargs, notes
    kwargs = dict(kwargs)
    if kwargs.pop("img_size", None) is not None:
        notes.append("dropped img_size (removed from SwinUNETR in MONAI 1.5)")
    if kwargs.get("downsample", "merging") == "merging":
        kwargs["downsample"] = "merging_legacy"
        notes.append("legacy patch-merging order (bundle trained with MONAI < 1.5)")
    return kwargs, notes


def load_bundle(
    bundle_folder: str | os.PathLike, config_name: str | None = None, allow_expressions: bool = False
) -> tuple[nn.Module, ModelSpec]:
    """Build a MONAI bundle's ``network_def`` and load its weights, offline, in eval mode on the CPU.

    Args:
        bundle_folder: folder with ``configs/`` (``inference.json`` by default) and ``models/``;
            ``configs/metadata.json`` is read for class names and the MONAI version.
        config_name: a file name in ``configs/`` to use instead of the default search.
        allow_expressions: evaluate ``$`` expressions in the network arguments (runs bundle code).

    Returns:
        ``(network, spec)``; the spec names the class and resolved arguments, so ``save_model`` can
        store the bundle as a MedGen model folder.

    Raises:
        ModelError: not a bundle, a class off the allow-list, refused expressions, no or unreadable
            weights, or weights that do not fit (keys listed).
    """
    folder = Path(bundle_folder)
    config_path = _config_file(folder, config_name)
    metadata_path = folder / "configs" / "metadata.json"
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"Bundle metadata {metadata_path} is not valid JSON ({error}).") from error
    if not isinstance(metadata, dict):
        raise ModelError(f"Bundle metadata {metadata_path} must hold a JSON object; it holds a {type(metadata).__name__}.")
    parser = ConfigParser()
    try:
        parser.read_config(str(config_path))
        parser.parse()
        network_config = parser.get("network_def")
    except Exception as error:  # ConfigParser raises many types (KeyError, ValueError, JSON/YAML errors)
        raise ModelError(f"Could not read bundle config {config_path}: {error}") from error
    if not isinstance(network_config, dict) or "_target_" not in network_config:
        raise ModelError(f"Bundle config {config_path} has no network_def component with a _target_.")
    name = str(network_config["_target_"]).rsplit(".", 1)[-1]
    network_factory(name)
    _check_plain(parser, "network_def", allow_expressions, set())
    try:
        arguments = {
            key: parser.get_parsed_content(f"network_def::{key}", instantiate=False, eval_expr=allow_expressions)
            for key in network_config
            if key not in _COMPONENT_KEYS
        }
    except Exception as error:  # e.g. an @reference to an item the config does not define
        raise ModelError(f"Could not resolve the network arguments of bundle config {config_path}: {error}") from error
    kwargs, notes = _compat_kwargs(name, arguments, metadata)
    network = build_network(name, kwargs)
    load_state_dict_checked(network, _bundle_weights(folder), source=f"bundle {folder}")
    class_names = _channel_names(metadata)
    out_channels = int(kwargs.get("out_channels", len(class_names) or 1))
    spec = ModelSpec(
        network=name,
        kwargs=kwargs,
        in_channels=int(kwargs.get("in_channels", 1)),
        out_channels=out_channels,
        class_names=class_names if len(class_names) == out_channels else [],
        name=str(metadata.get("name", folder.name)),
        description=str(metadata.get("description", "")),
        provenance={
            "source": f"MONAI bundle {folder}",
            "config": config_path.name,
            "bundle_version": metadata.get("version"),
            "monai_version": metadata.get("monai_version"),
            "compat": notes,
            "preprocessing": f"see the bundle's configs/{config_path.name}",
        },
    )
    return network.eval(), spec


def _bundle_weights(folder: Path) -> dict:
    models = folder / "models"
    if (models / "model.safetensors").is_file():
        return read_safetensors(models / "model.safetensors")
    if (models / "model.pt").is_file():
        return unwrap_state_dict(torch_load_weights(models / "model.pt"))[0]
    if (models / "model.ts").is_file():
        # only the tensors are read; the archive's TorchScript code is neither compiled nor run
        return read_torchscript_tensors(models / "model.ts")
    raise ModelError(
        f"Bundle {folder} has no weights: expected models/model.safetensors, models/model.pt or models/model.ts."
    )
