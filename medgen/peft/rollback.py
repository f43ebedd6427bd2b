"""Undo a failed in-place change of a module tree, so that :func:`medgen.peft.inject` is all-or-nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def restored_on_error(model: nn.Module) -> Iterator[None]:
    """Run the body; if it raises, put ``model`` back as it was and re-raise.

    Restored: each module's attributes, the contents of its dict/set attributes (children, parameters, buffers,
    hooks; refilled in place, so hook handles taken earlier still work) and each parameter's ``requires_grad``.
    Not restored: tensor values written in place; adapting methods add modules and flip flags, they do not edit
    the base weights. Cost: one shallow copy of every module's ``__dict__``, no tensor copies.
    """
    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    saved = []
    for module in model.modules():
        attributes = dict(vars(module))
        contents = {key: value.copy() for key, value in attributes.items() if isinstance(value, (dict, set))}
        saved.append((module, attributes, contents))
    try:
        yield
    except BaseException:
        for module, attributes, contents in saved:
            state = vars(module)
            for key in set(state) - set(attributes):
                del state[key]
            state.update(attributes)
            for key, content in contents.items():
                state[key].clear()
                state[key].update(content)
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
        raise
