"""The model spec: a JSON description of a network, its outputs and its expected preprocessing.

A model folder holds ``model.json`` (this spec) and ``model.safetensors`` (the weights). Example::

    {"format": "medgen-model/1", "name": "brain-mask", "network": "SegResNet",
     "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8},
     "in_channels": 1, "out_channels": 2, "class_names": ["background", "brain"],
     "output_activation": "softmax",
     "preprocessing": {"intensity": {"method": "zscore"}, "spacing_mm": [1.0, 1.0, 1.0],
                       "patch_size": [96, 96, 96], "orientation": "RAS"},
     "weights_file": "model.safetensors", "weights_hash": "sha256:...", "provenance": {}}
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgen.errors import ModelError
from medgen.io.atomic import write_text_atomic
from medgen.models.registry import network_factory

SPEC_FORMAT = "medgen-model/1"
SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"

#: intensity normalisations a spec may ask for; parameters live next to ``method``
INTENSITY_METHODS = {
    "none": "use intensities as they are",
    "zscore": "subtract the mean and divide by the standard deviation (of voxels > 0 when nonzero=true)",
    "range": "clip to [a_min, a_max] and scale linearly to [b_min, b_max] (CT windows, e.g. HU [-175, 250] -> [0, 1])",
    "percentile": "clip to the [lower, upper] percentiles and scale to [0, 1]",
    "deepbet": "deepbet: clip to the 0.5/99.5 % quantiles, scale to [0, 1], z-score, then 0.226 * x + 0.449",
}
OUTPUT_ACTIVATIONS = ("none", "sigmoid", "softmax")
#: fields of a generator's ``diffusion`` entry: how the pretrained DDPM was trained (defaults in
#: :class:`medgen.adapt.generator.DiffusionSettings`)
DIFFUSION_FIELDS = {
    "schedule": "MONAI noise schedule name with a beta range: linear_beta, scaled_linear_beta or sigmoid_beta",
    "beta_start": "first beta, 0 < beta_start < beta_end (given together with beta_end)",
    "beta_end": "last beta, beta_end < 1",
    "num_train_timesteps": "T, the number of training timesteps (integer >= 2)",
    "intensity_range": "[lo, hi] the training volumes were scaled to, lo < hi",
}
#: MONAI ``NoiseSchedules`` that take ``beta_start``/``beta_end`` (``cosine`` does not)
BETA_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta")


@dataclass
class Preprocessing:
    """What the network expects as input.

    Args:
        intensity: ``{"method": one of INTENSITY_METHODS, **parameters}``.
        spacing_mm: target voxel spacing (D, H, W order of the tensor) in mm, or None to keep the native grid.
        patch_size: sliding-window/input patch size in voxels (D, H, W), or None for whole volumes.
        orientation: axis codes the tensor axes must follow (MONAI ``Orientation``), e.g. ``"RAS"``.
    """

    intensity: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    spacing_mm: list[float] | None = None
    patch_size: list[int] | None = None
    orientation: str = "RAS"


@dataclass
class ModelSpec:
    """A network class from the allow-list, its arguments, outputs, preprocessing and provenance.

    Args:
        network: class name from :func:`medgen.models.registry.allowed_networks`.
        kwargs: keyword arguments of the class (JSON values only).
        in_channels: input channels C of the ``(B, C, D, H, W)`` input; default ``kwargs["in_channels"]``, else the
            class's default, else 1.
        out_channels: output channels of the network; default from ``kwargs`` or the class, like in_channels.
        class_names: one name per output channel for segmentation outputs (``[]`` otherwise).
        output_activation: ``none``, ``sigmoid`` (independent channels) or ``softmax`` (over channels).
        preprocessing: see :class:`Preprocessing`.
        name: short identifier; description: one line for the UI.
        weights_file: weights file name inside the model folder.
        weights_hash: :func:`medgen.models.weights.weights_hash` of the weights (filled by ``save_model``).
        provenance: free JSON (source, licence, conversion details).
        diffusion: for a ``DiffusionModelUNet`` generator, how it was trained: any of :data:`DIFFUSION_FIELDS`
            (e.g. ``{"schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02, "intensity_range": [-1, 1]}``);
            fields left out take the TenVOO paper's values. Empty for other networks.
    """

    network: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    in_channels: int | None = None
    out_channels: int | None = None
    class_names: list[str] = field(default_factory=list)
    output_activation: str = "none"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    name: str = ""
    description: str = ""
    weights_file: str = WEIGHTS_FILE
    weights_hash: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    diffusion: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        for key in ("in_channels", "out_channels"):
            if getattr(self, key) is None:
                setattr(self, key, self.kwargs.get(key, _signature_default(self.network, key)))
        if isinstance(self.preprocessing, dict):
            self.preprocessing = _preprocessing_from_dict(self.preprocessing)
        self.validate()

    def validate(self) -> None:
        """Check the fields against each other and the allow-list.

        Raises:
            ModelError: naming the field, the value found and what is expected.
        """
        network_factory(self.network)
        for key in ("in_channels", "out_channels"):
            declared = getattr(self, key)
            if not isinstance(declared, int) or declared < 1:
                raise ModelError(f"Model spec field {key} must be a positive integer, found {declared!r}.")
            if key in self.kwargs and self.kwargs[key] != declared:
                raise ModelError(
                    f"Model spec says {key}={declared} but the network arguments say {key}={self.kwargs[key]}: "
                    "make them agree."
                )
        if self.class_names and len(self.class_names) != self.out_channels:
            raise ModelError(
                f"Model spec lists {len(self.class_names)} class names for {self.out_channels} output channels: "
                "give one name per output channel (background included) or none."
            )
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ModelError(
                f"Model spec output_activation {self.output_activation!r} is unknown; use one of {OUTPUT_ACTIVATIONS}."
            )
        _check_intensity(self.preprocessing.intensity)
        codes = self.preprocessing.orientation
        if not (isinstance(codes, str) and len(codes) == 3
                and all(sum(code in pair for code in codes.upper()) == 1 for pair in ("LR", "AP", "SI"))):
            raise ModelError(
                f"Model spec orientation {codes!r} must name one direction per axis, one of L/R, A/P and S/I each "
                "(e.g. 'RAS' or 'LPS')."
            )
        if Path(self.weights_file).name != self.weights_file:
            raise ModelError(f"Model spec weights_file must be a plain file name, found {self.weights_file!r}.")
        if self.diffusion:
            _check_diffusion(self.network, self.diffusion)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the ``format`` tag first."""
        return {"format": SPEC_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        """Build and validate a spec from parsed JSON.

        Raises:
            ModelError: wrong format tag, unknown or missing fields, or invalid values.
        """
        data = dict(data)
        spec_format = data.pop("format", None)
        if spec_format != SPEC_FORMAT:
            raise ModelError(f"Model spec format {spec_format!r} is not supported; expected {SPEC_FORMAT!r}.")
        known = {spec_field.name for spec_field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"Model spec has unknown fields {unknown}; allowed fields are {sorted(known)}.")
        if "network" not in data:
            raise ModelError("Model spec has no 'network' field: name a network class.")
        return cls(**data)


def _check_types(spec: "ModelSpec") -> None:
    """``ModelError`` naming the first spec field whose JSON type is wrong (before any field is used)."""
    expected = {"network": str, "kwargs": dict, "class_names": list, "output_activation": str, "name": str,
                "description": str, "weights_file": str, "weights_hash": str, "provenance": dict, "diffusion": dict}
    for key, kind in expected.items():
        if not isinstance(getattr(spec, key), kind):
            raise ModelError(f"Model spec field {key} must be a JSON {kind.__name__}, found {getattr(spec, key)!r}.")
    if not all(isinstance(name, str) for name in spec.class_names):
        raise ModelError(f"Model spec class_names must be strings, found {spec.class_names!r}.")
    preprocessing = spec.preprocessing
    if isinstance(preprocessing, Preprocessing):
        preprocessing = dataclasses.asdict(preprocessing)
    if not isinstance(preprocessing, dict):
        raise ModelError(f"Model spec field preprocessing must be a JSON object, found {preprocessing!r}.")
    if not isinstance(preprocessing.get("intensity", {}), dict):
        raise ModelError(f"Model spec preprocessing.intensity must be a JSON object such as {{\"method\": \"zscore\"}}, "
                         f"found {preprocessing['intensity']!r}.")
    for key, kind in (("spacing_mm", float), ("patch_size", int)):
        value = preprocessing.get(key)
        if value is not None and not (isinstance(value, list | tuple) and len(value) == 3
                                      and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value)
                                      and (kind is float or all(float(v).is_integer() for v in value))):
            raise ModelError(f"Model spec preprocessing.{key} must be three positive {'numbers' if kind is float else 'integers'} "
                             f"(D, H, W) or null, found {value!r}.")


def _signature_default(network: str, argument: str) -> int:
    """The network class's default for ``argument`` when it has an integer one, else 1."""
    parameter = inspect.signature(network_factory(network)).parameters.get(argument)
    has_int_default = parameter is not None and isinstance(parameter.default, int)
    return parameter.default if has_int_default else 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_intensity(intensity: dict[str, Any]) -> None:
    """Raise ``ModelError`` for an unknown method or parameters that cannot scale (see :data:`INTENSITY_METHODS`):
    a range needs numbers ``a_min < a_max`` (``b_min``/``b_max`` numbers when given), percentiles need
    ``0 <= lower < upper <= 100``. Equal bounds would divide by zero, and MONAI then leaves volumes unscaled."""
    method = intensity.get("method")
    if method not in INTENSITY_METHODS:
        raise ModelError(f"Model spec intensity method {method!r} is unknown; use one of {sorted(INTENSITY_METHODS)}.")
    if method == "range":
        if not all(_is_number(intensity.get(key)) for key in ("a_min", "a_max")):
            raise ModelError(f"The model spec's intensity range {intensity} needs numbers a_min and a_max "
                             "(e.g. HU -175 and 250).")
        bad = [key for key in ("b_min", "b_max") if key in intensity and not _is_number(intensity[key])]
        if bad or intensity["a_min"] >= intensity["a_max"]:
            raise ModelError(f"The model spec's intensity range {intensity} must have a_min < a_max and numbers "
                             "b_min, b_max when given.")
    if method == "percentile":
        lower, upper = intensity.get("lower", 0.5), intensity.get("upper", 99.5)
        if not (_is_number(lower) and _is_number(upper) and 0 <= lower < upper <= 100):
            raise ModelError(f"The model spec's intensity percentiles {intensity} must satisfy "
                             "0 <= lower < upper <= 100.")


def _check_diffusion(network: str, diffusion: Any) -> None:
    """Raise ``ModelError`` naming the first bad field of a ``diffusion`` entry (see :data:`DIFFUSION_FIELDS`)."""
    if network != "DiffusionModelUNet":
        raise ModelError(
            f"Model spec field diffusion describes a DDPM generator, but the network is a {network}: "
            "leave diffusion out (or empty) for other networks."
        )
    if not isinstance(diffusion, dict):
        raise ModelError(f"Model spec field diffusion must be a JSON object, found {diffusion!r}.")
    unknown = sorted(set(diffusion) - set(DIFFUSION_FIELDS))
    if unknown:
        raise ModelError(f"Model spec diffusion has unknown fields {unknown}; allowed: {sorted(DIFFUSION_FIELDS)}.")
    if "schedule" in diffusion and diffusion["schedule"] not in BETA_SCHEDULES:
        schedule = diffusion["schedule"]
        raise ModelError(f"Model spec diffusion.schedule {schedule!r} is not supported; use one of {BETA_SCHEDULES}.")
    if ("beta_start" in diffusion) != ("beta_end" in diffusion):
        raise ModelError("Model spec diffusion needs beta_start and beta_end together (one beta range), or neither.")
    for key in ("beta_start", "beta_end"):
        if key in diffusion and not (_is_number(diffusion[key]) and 0 < diffusion[key] < 1):
            raise ModelError(f"Model spec diffusion.{key} must be a number in (0, 1), found {diffusion[key]!r}.")
    if "beta_start" in diffusion and diffusion["beta_start"] >= diffusion["beta_end"]:
        start, end = diffusion["beta_start"], diffusion["beta_end"]
        raise ModelError(f"Model spec diffusion.beta_start ({start}) must be below beta_end ({end}).")
    steps = diffusion.get("num_train_timesteps")
    if "num_train_timesteps" in diffusion and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 2):
        raise ModelError(f"Model spec diffusion.num_train_timesteps must be an integer >= 2, found {steps!r}.")
    value_range = diffusion.get("intensity_range")
    if "intensity_range" in diffusion and not (
        isinstance(value_range, (list, tuple)) and len(value_range) == 2 and all(map(_is_number, value_range))
        and value_range[0] < value_range[1]
    ):
        raise ModelError(f"Model spec diffusion.intensity_range must be [lo, hi] with lo < hi, found {value_range!r}.")


def _preprocessing_from_dict(data: dict[str, Any]) -> Preprocessing:
    known = {spec_field.name for spec_field in dataclasses.fields(Preprocessing)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelError(f"Model spec preprocessing has unknown fields {unknown}; allowed: {sorted(known)}.")
    return Preprocessing(**data)


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """Read ``model.json`` (or a folder containing it).

    Raises:
        ModelError: missing file, invalid JSON or an invalid spec.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILE
    if not path.is_file():
        raise ModelError(f"Model spec {path} does not exist: a model folder needs {SPEC_FILE} and its weights.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"Model spec {path} is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise ModelError(f"Model spec {path} must hold a JSON object, found {type(data).__name__}.")
    return ModelSpec.from_dict(data)


def write_spec(spec: ModelSpec, path: str | os.PathLike) -> Path:
    """Write the spec as indented JSON, atomically.

    Raises:
        ModelError: a value in the spec (usually in ``kwargs``) is not JSON-serialisable.
    """
    try:
        text = json.dumps(spec.to_dict(), indent=2, sort_keys=False)
    except TypeError as error:
        raise ModelError(f"Model spec for {spec.network} holds a value JSON cannot store ({error}).") from error
    return write_text_atomic(path, text + "\n")
