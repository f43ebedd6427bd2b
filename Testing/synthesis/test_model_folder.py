"""Generative model folders: corrupted or missing weights and unusable settings are clear ModelErrors,
never internal errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from medgen.diffusion import load_trained_weights
from medgen.errors import BadInputError, ModelError
from medgen.io.model_folder import MODEL_JSON, RUN_JSON, check_same_run, model_config, read_model_json, write_model_json
from medgen.models.weights import load_weights_into, read_safetensors, write_safetensors


def test_round_trip_and_task_check(tmp_path):
    network = torch.nn.Linear(3, 2)
    write_safetensors(network.state_dict(), tmp_path / "net.safetensors")
    write_model_json(tmp_path, "some-task", size=3)
    assert read_model_json(tmp_path, "some-task")["size"] == 3
    restored = load_weights_into(torch.nn.Linear(3, 2), tmp_path / "net.safetensors")
    assert torch.equal(restored.weight, network.weight)
    with pytest.raises(ModelError, match="other-task"):
        read_model_json(tmp_path, "other-task")


@pytest.mark.parametrize("content", [b"", b"\xff" * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_corrupted_weights_are_a_model_error(tmp_path, content):
    path = tmp_path / "net.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="truncated or corrupted"):
        read_safetensors(path)
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(content)
    with pytest.raises(ModelError, match="missing or corrupted"):
        load_trained_weights(torch.nn.Linear(3, 2), checkpoint)


def test_weights_of_other_shapes_are_a_model_error_naming_them(tmp_path):
    write_safetensors(torch.nn.Linear(3, 2).state_dict(), tmp_path / "net.safetensors")
    with pytest.raises(ModelError, match=r"shape mismatches \(1\): weight: file \[2, 3\] vs model \[2, 4\]"):
        load_weights_into(torch.nn.Linear(4, 2), tmp_path / "net.safetensors")


@dataclasses.dataclass(frozen=True)
class _Settings:
    channels: tuple[int, ...]
    steps: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be positive")


def test_model_config_round_trips_lists_to_tuples(tmp_path):
    write_model_json(tmp_path, "task", config=dataclasses.asdict(_Settings((8, 16))))
    assert model_config(tmp_path, read_model_json(tmp_path, "task"), _Settings, "test") == _Settings((8, 16))


@pytest.mark.parametrize("config, message", [
    (None, "settings are missing"),
    ([8, 16], "not a JSON object"),
    ({"channels": [8], "future_setting": 1}, r"Unknown test settings \['future_setting'\]"),
    ({"steps": 3}, "cannot be used .*channels"),
    ({"channels": [8], "steps": 0}, "cannot be used .*steps must be positive"),
    ({"channels": [8], "steps": "3"}, "setting 'steps' is '3', not of the type of its default 1"),
    ({"channels": [8], "steps": True}, "setting 'steps' is True"),
])
def test_unusable_model_settings_are_a_model_error_naming_the_file(tmp_path, config, message):
    document = {"task": "task"} if config is None else {"task": "task", "config": config}
    (tmp_path / MODEL_JSON).write_text(json.dumps(document))
    with pytest.raises(ModelError, match=f"{MODEL_JSON}: .*{message}.*Re-run the training job"):
        model_config(tmp_path, read_model_json(tmp_path, "task"), _Settings, "test")


@pytest.mark.parametrize("document, message", [
    ({"task": "task"}, "field 'labels' is missing or not a JSON list \\(got None\\)"),
    ({"task": "task", "labels": "liver"}, "field 'labels' is missing or not a JSON list"),
    ({"task": "task", "labels": [], "scale_factor": "x"}, "field 'scale_factor' is missing or not a JSON integer or number"),
    ({"task": "task", "labels": [], "scale_factor": True}, "field 'scale_factor'"),
])
def test_required_fields_of_a_damaged_model_json_are_a_model_error_naming_them(tmp_path, document, message):
    (tmp_path / MODEL_JSON).write_text(json.dumps(document))
    with pytest.raises(ModelError, match=f"{MODEL_JSON}: its {message}.*Re-run the training job"):
        read_model_json(tmp_path, "task", {"labels": list, "scale_factor": (int, float)})
    (tmp_path / MODEL_JSON).write_text(json.dumps({"task": "task", "labels": [], "scale_factor": 0.5}))
    assert read_model_json(tmp_path, "task", {"labels": list, "scale_factor": (int, float)})["scale_factor"] == 0.5


def test_a_json_file_that_is_not_an_object_is_not_a_model_folder(tmp_path):
    (tmp_path / MODEL_JSON).write_text("[1, 2]")
    with pytest.raises(ModelError, match="holds a model for task None"):
        read_model_json(tmp_path, "task")


def test_a_run_record_of_an_earlier_version_continues_with_the_settings_added_since(tmp_path):
    """A record without a setting added later compares as the value earlier versions used, not as None."""
    (tmp_path / RUN_JSON).write_text(json.dumps({"settings": {"steps": 4}, "data": "sha256:x"}))
    check_same_run(tmp_path, {"steps": 4, "seed": 0}, "sha256:x", added_later={"seed": 0})
    with pytest.raises(BadInputError, match=r"seed 0 -> 3"):
        check_same_run(tmp_path, {"steps": 4, "seed": 3}, "sha256:x", added_later={"seed": 0})
    with pytest.raises(BadInputError, match=r"seed None -> 0"):
        check_same_run(tmp_path, {"steps": 4, "seed": 0}, "sha256:x")  # without the default: a changed setting

    # a record that holds the setting keeps its own value: the earlier versions' default applies only where it is missing
    (tmp_path / RUN_JSON).write_text(json.dumps({"settings": {"steps": 4, "seed": 5}, "data": "sha256:x"}))
    check_same_run(tmp_path, {"steps": 4, "seed": 5}, "sha256:x", added_later={"seed": 0})
    with pytest.raises(BadInputError, match=r"seed 5 -> 0"):
        check_same_run(tmp_path, {"steps": 4, "seed": 0}, "sha256:x", added_later={"seed": 0})


def test_of_two_runs_starting_a_new_folder_at_once_the_second_is_compared_with_the_first(tmp_path, monkeypatch):
    """Both saw no run record; the one that records its start second must not overwrite the first's record (which
    its weights follow): it is compared with it, and other data are refused."""
    import medgen.io.model_folder as model_folder

    real_write = model_folder.write_text_atomic

    def first_run_records_meanwhile(path, text, **kwargs):
        monkeypatch.setattr(model_folder, "write_text_atomic", real_write)
        check_same_run(tmp_path, {"steps": 4}, "data of the first run")  # the other process, between the two steps
        return real_write(path, text, **kwargs)

    monkeypatch.setattr(model_folder, "write_text_atomic", first_run_records_meanwhile)
    with pytest.raises(BadInputError, match="other training data"):
        check_same_run(tmp_path, {"steps": 4}, "data of the second run")
    assert json.loads((tmp_path / RUN_JSON).read_text())["data"] == "data of the first run"
