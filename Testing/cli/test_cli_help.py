"""``medgen <command> --help``: every argument explained, defaults shown, and the same defaults as the job kinds."""

from __future__ import annotations

import argparse

import pytest

from medgen.cli.main import build_parser
from medgen.jobs.kinds import get_kind, known_kinds


def _commands() -> dict[str, argparse.ArgumentParser]:
    subparsers = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return dict(subparsers.choices)


def _arguments(command: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in command._actions if not isinstance(action, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_argument_of_every_command_is_explained(name):
    command = _commands()[name]
    assert command.description, name
    unexplained = [action.dest for action in _arguments(command) if not (action.help or "").strip()]
    assert unexplained == [], f"medgen {name}: no help for {unexplained}"


def test_help_shows_each_default_in_the_form_it_is_typed_and_no_empty_ones():
    text = _commands()["translate-train"].format_help()
    flat = " ".join(text.split())
    assert "--grid I J K" in flat and "resampled to it (default: 32 32 32)" in flat
    assert "(default: 2.5d)" in flat and "(default: tiny)" in flat
    assert "seed of the job's random draws (default: 0)" in flat  # a zero default is still shown
    assert "(default: None)" not in flat and "(default: False)" not in flat and "(default: [])" not in flat
    assert "training steps (override the preset) --unconditional" in flat  # no default, nothing appended


@pytest.mark.parametrize("name", sorted(set(_commands()) & {kind.name for kind in known_kinds()}))
def test_command_defaults_are_the_job_kinds_defaults(name):
    """A default typed twice (option and job schema) must not drift: the CLI and Slicer would compute different things."""
    params = get_kind(name).params["properties"]
    compared = 0
    for action in _arguments(_commands()[name]):
        schema = params.get(action.dest)
        if action.option_strings and schema is not None and "default" in schema and action.default is not None:
            assert action.default == schema["default"], f"medgen {name} {action.option_strings[-1]}"
            compared += 1
    assert compared >= 1, f"medgen {name}: no option shares a default with the job kind"
