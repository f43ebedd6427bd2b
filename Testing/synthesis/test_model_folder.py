"""Generative model folders: corrupted or missing weights are clear ModelErrors, never internal errors."""

from __future__ import annotations

import pytest
import torch

from medgen.diffusion import load_trained_weights
from medgen.errors import ModelError
from medgen.synthesis.model_folder import load_into, load_weights, read_model_json, save_weights, write_model_json


def test_round_trip_and_task_check(tmp_path):
    network = torch.nn.Linear(3, 2)
    save_weights(network.state_dict(), tmp_path / "net.safetensors")
    write_model_json(tmp_path, "some-task", size=3)
    assert read_model_json(tmp_path, "some-task")["size"] == 3
    restored = load_into(torch.nn.Linear(3, 2), tmp_path / "net.safetensors")
    assert torch.equal(restored.weight, network.weight)
    with pytest.raises(ModelError, match="other-task"):
        read_model_json(tmp_path, "other-task")


@pytest.mark.parametrize("content", [b"", b"\xff" * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_corrupted_weights_are_a_model_error(tmp_path, content):
    path = tmp_path / "net.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="missing or corrupted"):
        load_weights(path)
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(content)
    with pytest.raises(ModelError, match="missing or corrupted"):
        load_trained_weights(torch.nn.Linear(3, 2), checkpoint)
