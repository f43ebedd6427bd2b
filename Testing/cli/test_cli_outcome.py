"""What a finished ``medgen`` command prints: output paths as JSON on stdout, the rest of the result on stderr."""

from __future__ import annotations

import json
import types

from medgen.cli.main import _print_outcome


def test_the_outcome_shows_outputs_and_result_fields_but_not_the_event_timestamp(capsys):
    result = {"event": "result", "time": 1795581361.976, "elapsed_s": 127.506, "accepted": {"case1": 2},
              "outputs": {"model": "/jobs/x/outputs/model"}}
    _print_outcome(types.SimpleNamespace(result=result, error=None))

    printed = capsys.readouterr()
    assert json.loads(printed.out) == {"model": "/jobs/x/outputs/model"}
    assert printed.err.splitlines() == ["[medgen] elapsed_s: 127.506", '[medgen] accepted: {"case1": 2}']


def test_a_failed_job_prints_its_error_kind_and_message(capsys):
    _print_outcome(types.SimpleNamespace(result=None, error={"kind": "bad_input", "message": "no such file"}))

    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == "[medgen] bad_input: no such file\n"
