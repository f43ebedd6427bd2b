"""Options every adaptation method shares, and the matching of ``target_modules`` regexes to module names."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from medgen.errors import BadInputError


@dataclass
class MethodConfig:
    """Options common to all methods; each method's config dataclass extends it.

    Args:
        target_modules: regex or list of regexes, matched with ``re.search`` against ``named_modules()`` names;
            ``None`` = every module of a type the method supports.
        head: name of the output layer (``nn.Conv3d``/``nn.Linear``) trained together with the method
            (the linear probe of FSEFT), e.g. ``"out.conv.conv"`` for MONAI SwinUNETR.
        head_out_channels: replace the head by a freshly initialised layer with this many outputs.
        head_rows: replace the head by the rows (output channels) of the pre-trained head listed here
            ("zero-shot" initialisation of FSEFT).
        train_also: regex or list of regexes over parameter names that are unfrozen as well
            (e.g. ``"decoder"`` to fine-tune a Swin-UNETR decoder).
    """

    target_modules: str | list[str] | None = None
    head: str | None = None
    head_out_channels: int | None = None
    head_rows: list[int] | None = None
    train_also: str | list[str] | None = None

    #: options that, when given, must be whole numbers >= 1
    POSITIVE: ClassVar[tuple[str, ...]] = ("head_out_channels",)

    def __post_init__(self) -> None:
        """Check every option against its annotation (options often come from a job's JSON), so that a wrong
        type is a clear ``BadInputError`` naming the option, not a traceback from deep inside the method."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value, hint = getattr(self, field.name), hints[field.name]
            fits = _fits(value, hint)
            if field.name in self.POSITIVE and not (fits and (value is None or value >= 1)):
                optional = " (or null)" if _fits(None, hint) else ""
                raise BadInputError(f"Option {field.name} must be a whole number >= 1{optional}; got {value!r}.")
            if not fits:
                raise BadInputError(f"Option {field.name} must be {_described(hint)}; got {value!r}.")
        if self.head_rows is not None and not self.head_rows:
            raise BadInputError("Option head_rows must list at least one row of the pre-trained head; got [].")


_NOUNS = {int: "whole number", float: "number", str: "string", bool: "true/false value"}


def _described(hint: object, plural: bool = False) -> str:
    """``hint`` in words, e.g. ``str | list[str] | None`` -> "a string, a list of strings or null"."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = [_described(arm) for arm in arguments]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    if hint is type(None):
        return "null"
    if origin is list:
        noun = "list" + ("s" if plural else "") + " of " + _described(arguments[0], plural=True)
    elif origin is dict:
        noun = "mapping" + ("s" if plural else "") + " of channel counts to " + _described(arguments[1], plural=True)
    else:
        noun = _NOUNS[hint] + ("s" if plural else "")
    return noun if plural else ("an " if noun[0] in "aeiou" else "a ") + noun


def _fits(value: object, hint: object) -> bool:
    """Whether ``value`` (from Python or JSON) has the type ``hint``: unions, ``None``, ``bool``, ``int`` (not a
    bool), ``float`` (an int too), ``str``, ``list[X]`` (a tuple too) and ``dict[int, X]`` (digit-string keys too)."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in arguments)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_fits(item, arguments[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            (_fits(key, int) or (isinstance(key, str) and key.isdigit())) and _fits(item, arguments[1])
            for key, item in value.items()
        )
    return isinstance(value, hint)


def compile_patterns(patterns: str | Sequence[str], option: str) -> list[re.Pattern]:
    """Compile one regex or a list of regexes given as option ``option``; bad syntax -> ``BadInputError``."""
    pattern_list = [patterns] if isinstance(patterns, str) else list(patterns)
    try:
        return [re.compile(pattern) for pattern in pattern_list]
    except re.error as error:
        raise BadInputError(f"{option} must be valid regular expressions, got {pattern_list}: {error}.") from error


def _sample_names(model: nn.Module, count: int = 12) -> list[str]:
    """Up to ``count`` names of weight-bearing layers spread over the model, to help write a regex."""
    names = [
        name for name, module in model.named_modules() if name and any(True for _ in module.parameters(recurse=False))
    ]
    step = max(1, len(names) // count)
    return names[::step][:count]


def match_modules(model: nn.Module, target_modules: str | Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """Modules whose names match ``target_modules`` (all named modules when ``None``).

    Raises:
        BadInputError: the regexes match nothing; the message lists some module names of the model.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    if target_modules is None:
        return named
    patterns = compile_patterns(target_modules, "target_modules")
    matches = [(name, module) for name, module in named if any(pattern.search(name) for pattern in patterns)]
    if not matches:
        raise BadInputError(
            f"target_modules {[pattern.pattern for pattern in patterns]} matched no module of this "
            f"{type(model).__name__}; some of its layer names: {_sample_names(model)}. Adjust the regex."
        )
    return matches


def select_types(
    matches: list[tuple[str, nn.Module]],
    supported: tuple[type, ...],
    method: str,
    explicit_targets: bool,
) -> list[tuple[str, nn.Module]]:
    """The matched modules of a supported type.

    Containers are skipped silently. With explicit targets, a matched weight-bearing leaf layer of another type is
    an error (the user asked for it); with ``target_modules=None`` such layers are simply not adapted.

    Raises:
        BadInputError: an explicitly targeted layer has an unsupported type, or no matched module is supported.
    """
    selected = [(name, module) for name, module in matches if isinstance(module, supported)]
    supported_names = [cls.__name__ for cls in supported]
    if explicit_targets:
        rejected = [
            (name, type(module).__name__)
            for name, module in matches
            if not isinstance(module, supported)
            and not any(True for _ in module.children())
            and any(True for _ in module.parameters(recurse=False))
        ]
        if rejected:
            raise BadInputError(
                f"{method} supports {supported_names} layers, but target_modules also matched "
                f"{rejected[:8]}{' …' if len(rejected) > 8 else ''}. Narrow the regex to supported layers."
            )
    if not selected:
        found = sorted({type(module).__name__ for _, module in matches})
        raise BadInputError(
            f"{method} supports {supported_names} layers; the matched modules are of types {found[:12]}."
        )
    return selected
