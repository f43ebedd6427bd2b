"""Label descriptions: which integer value in a label map means which named, coloured structure."""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterable

from medgen.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class LabelInfo:
    """One structure of a label map.

    Args:
        name: structure name shown to the user (segment name in Slicer, key in nnU-Net's dataset.json).
        value: its integer value in the label map (> 0; 0 is background).
        color: display colour as RGB in [0, 1].
        terminology: Slicer's terminology entry of the segment (``"context~category~type~..."``, DICOM codes),
            carried from the segments a job learns from to the segments it creates; empty when there is none.
    """

    name: str
    value: int
    color: tuple[float, float, float]
    terminology: str = ""

    @classmethod
    def from_dict(cls, entry: dict) -> "LabelInfo":
        """A label as stored in a model folder or labels.json (``color`` and ``terminology`` optional)."""
        value = int(entry["value"])
        color = tuple(float(c) for c in entry["color"]) if "color" in entry else default_color(value)
        name = entry["name"]
        if not isinstance(name, str):  # str(None) would name a structure "None"
            raise ValueError(f"the name of the label of value {value} must be a string, got {name!r}")
        return cls(name, value, color, str(entry.get("terminology", "")))


def default_color(value: int) -> tuple[float, float, float]:
    """A distinct, stable colour for label ``value`` (golden-ratio hue steps)."""
    hue = (value * 0.618033988749895) % 1.0
    return tuple(round(channel, 4) for channel in colorsys.hsv_to_rgb(hue, 0.65, 0.95))


def make_labels(names: dict[str, int] | Iterable[str]) -> list[LabelInfo]:
    """Labels from ``{name: value}`` (or names numbered 1, 2, ...), with default colours, sorted by value.

    A ``"background": 0`` entry (nnU-Net's ``dataset.json`` form) is left out; any other name at 0 is refused."""
    pairs = names.items() if isinstance(names, dict) else ((name, i + 1) for i, name in enumerate(names))
    labels = [LabelInfo(str(name), int(value), default_color(int(value))) for name, value in pairs
              if not _is_background(name, value)]
    check_labels(labels)
    return sorted(labels, key=lambda label: label.value)


def check_labels(labels: list[LabelInfo]) -> None:
    """Raise :class:`BadInputError` for duplicate names/values, non-positive values or colours that are not RGB in [0, 1]."""
    names = [label.name for label in labels]
    values = [label.value for label in labels]
    repeated_names = sorted({name for name in names if names.count(name) > 1})
    repeated_values = sorted({value for value in values if values.count(value) > 1})
    if repeated_names or repeated_values:
        raise BadInputError(f"Label names and values must be unique; repeated names {repeated_names}, values {repeated_values}.")
    if any(value <= 0 for value in values):
        raise BadInputError(f"Label values must be positive (0 is background); got {values}.")
    odd_colors = {label.name: label.color for label in labels
                  if len(label.color) != 3 or not all(0.0 <= channel <= 1.0 for channel in label.color)}
    if odd_colors:
        raise BadInputError(f"Label colours are RGB triples in [0, 1] (not 0-255); got {odd_colors}.")


def name_key(name: str) -> str:
    """How structure names are matched (segments to classes, labels to labels): case and surrounding spaces
    ignored ("Liver " is "liver")."""
    return name.strip().casefold()


def _is_background(name, value) -> bool:
    """The background entry label descriptions may list: named background (any case), value 0."""
    return value == 0 and name_key(str(name)) == "background"


def _whole_number(value, what: str) -> int:
    """A label value from JSON: an integer (or an integral float), never a fraction, a string or a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"names {repeated} appear twice")
    return dict(pairs)


def save_labels(labels: list[LabelInfo], path: str | os.PathLike) -> Path:
    """Write labels as JSON ``[{"name", "value", "color"}, ...]`` (checked as :func:`load_labels` reads them)."""
    from medgen.io.atomic import write_text_atomic

    check_labels(labels)

    return write_text_atomic(path, json.dumps([dataclasses.asdict(label) for label in labels], indent=2) + "\n")


#: what :func:`load_labels` reads, for error messages
LABELS_FORMAT = ('a list [{"name": "liver", "value": 1, "color": [1, 0, 0]}, ...] (color and terminology optional) '
                 'or an nnU-Net style object {"background": 0, "liver": 1, ...}')


def load_labels(path: str | os.PathLike) -> list[LabelInfo]:
    """Read label names: the list :func:`save_labels` writes (``color`` optional: a default colour is picked)
    or an nnU-Net ``dataset.json``-style ``{name: value}`` object (background 0 is left out)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=_no_repeated_keys)
        if isinstance(entries, dict):
            labels = make_labels({str(name): _whole_number(value, f"the value of {name!r}") for name, value in entries.items()})
        elif not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError("expected a list of objects")
        else:
            labels = [LabelInfo.from_dict({**e, "value": _whole_number(e["value"], f"the value of {e['name']!r}")})
                      for e in entries
                      if not _is_background(e["name"], e.get("value"))]  # as the object form does
    except (OSError, ValueError, KeyError, TypeError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise BadInputError(f"{path} is not a label description ({detail}). Write {LABELS_FORMAT}.") from None
    check_labels(labels)
    _check_file_names(labels, path)
    return labels


def _check_file_names(labels: list[LabelInfo], path) -> None:
    """What a labels.json written by hand may get wrong (not checked on labels MedGen wrote, so that model folders
    trained earlier keep working): no name, a 'background' structure, or names equal by :func:`name_key`."""
    keys = [name_key(label.name) for label in labels]
    unnamed = [label.value for label, key in zip(labels, keys) if not key]
    if unnamed:
        raise BadInputError(f"{path}: every label needs a name; the labels of values {unnamed} have none.")
    if "background" in keys:
        raise BadInputError(f"{path}: 'background' is value 0, never a structure; remove its entry of value "
                            f"{labels[keys.index('background')].value} or rename it.")
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise BadInputError(f"{path}: label names must differ by more than case and spaces (segments are matched so); "
                            f"repeated names {repeated}.")
