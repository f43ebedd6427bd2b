"""Model folders: spec + safetensors round trip, weights hash, validation and clear errors."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from medgen.errors import ModelError
from medgen.models import (
    ModelSpec,
    Preprocessing,
    allowed_networks,
    build_model,
    load_model,
    load_state_dict_checked,
    read_safetensors,
    save_model,
    torch_load_weights,
    weights_hash,
)
from medgen.models.registry import build_network

UNET_KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}


def tiny_spec(**changes) -> ModelSpec:
    fields = dict(
        network="UNet",
        kwargs=UNET_KWARGS,
        in_channels=1,
        out_channels=2,
        class_names=["background", "organ"],
        output_activation="softmax",
        preprocessing=Preprocessing(intensity={"method": "zscore"}, spacing_mm=[1.0, 1.0, 1.0], patch_size=[16, 16, 16]),
        name="tiny-unet",
    )
    fields.update(changes)
    return ModelSpec(**fields)


@pytest.fixture
def saved_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    network = build_model(tiny_spec()).eval()
    save_model(network, tiny_spec(), tmp_path / "model")
    return tmp_path / "model", network


def test_save_then_load_gives_identical_outputs_and_spec(saved_folder):
    folder, network = saved_folder
    loaded, spec = load_model(folder)
    volume = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(volume), network(volume))
    assert spec.class_names == ["background", "organ"]
    assert spec.preprocessing.spacing_mm == [1.0, 1.0, 1.0]
    assert spec.weights_hash == weights_hash(network)
    assert not loaded.training
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]  # no temp files left


def test_spec_json_round_trip_is_lossless(saved_folder):
    folder, _ = saved_folder
    data = json.loads((folder / "model.json").read_text())
    assert data["format"] == "medgen-model/1"
    assert ModelSpec.from_dict(data).to_dict() == data


def test_weights_hash_ignores_insertion_order_and_detects_changes():
    torch.manual_seed(0)
    state_dict = build_model(tiny_spec()).state_dict()
    reversed_order = OrderedDict(reversed(list(state_dict.items())))
    first_hash = weights_hash(state_dict)
    assert first_hash == weights_hash(reversed_order)
    assert first_hash.startswith("sha256:") and len(first_hash) == len("sha256:") + 64
    changed = dict(state_dict)
    name = next(iter(changed))
    changed[name] = changed[name].clone()
    changed[name].view(-1)[0] += 1e-6
    assert weights_hash(changed) != first_hash


def test_weights_hash_matches_between_module_and_bfloat16_safe():
    torch.manual_seed(0)
    network = build_model(tiny_spec())
    assert weights_hash(network) == weights_hash(network.state_dict())
    assert weights_hash({"w": torch.ones(3, dtype=torch.bfloat16)}) != weights_hash({"w": torch.ones(3)})


def test_unknown_network_class_names_the_allow_list():
    with pytest.raises(ModelError, match="Unknown network class 'os.system'") as error:
        tiny_spec(network="os.system")
    assert "SegResNet" in str(error.value) and "LinkNet3d" in str(error.value)
    assert "SwinUNETR" in allowed_networks()


def test_arguments_that_would_download_weights_are_refused():
    """FlexibleUNet(pretrained=True) fetches its backbone from GitHub or Hugging Face: no network access unasked."""
    with pytest.raises(ModelError, match=r"\['pretrained'\] would download weights at run time"):
        build_network("FlexibleUNet", {"in_channels": 1, "out_channels": 2, "backbone": "efficientnet-b0",
                                       "spatial_dims": 3, "pretrained": True})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"class_names": ["only-one"]}, "1 class names for 2 output channels"),
        ({"in_channels": 3}, "in_channels=3 but the network arguments say in_channels=1"),
        ({"output_activation": "relu"}, "output_activation 'relu' is unknown"),
        ({"preprocessing": {"intensity": {"method": "magic"}}}, "intensity method 'magic' is unknown"),
        ({"preprocessing": {"intensity": {"method": "range"}}}, "needs numbers a_min and a_max"),
        ({"preprocessing": {"intensity": {"method": "range", "a_min": 5, "a_max": 5}}}, "must have a_min < a_max"),
        ({"preprocessing": {"intensity": {"method": "range", "a_min": 0, "a_max": 1, "b_max": "1"}}}, "a_min < a_max"),
        ({"preprocessing": {"intensity": {"method": "percentile", "lower": 50, "upper": 50}}}, "0 <= lower < upper"),
        ({"preprocessing": {"intensity": {"method": "percentile", "upper": 101}}}, "0 <= lower < upper <= 100"),
        ({"weights_file": "../elsewhere.safetensors"}, "plain file name"),
        ({"preprocessing": {"orientation": "XYZ"}}, "orientation 'XYZ' must name one direction per axis"),
        ({"preprocessing": {"orientation": "RRS"}}, "orientation 'RRS'"),
        ({"class_names": 3}, "class_names must be a JSON list"),
        ({"network": ["UNet"]}, "network must be a JSON str"),
        ({"preprocessing": "zscore"}, "preprocessing must be a JSON object"),
        ({"preprocessing": {"intensity": "zscore"}}, "preprocessing.intensity must be a JSON object"),
        ({"preprocessing": {"spacing_mm": [-1, 0, 1]}}, "spacing_mm must be three positive numbers"),
        ({"preprocessing": {"patch_size": [96, 96]}}, "patch_size must be three positive integers"),
    ],
)
def test_invalid_spec_fields_raise_model_error(changes, message):
    with pytest.raises(ModelError, match=message):
        tiny_spec(**changes)


def test_unknown_spec_field_and_format_are_refused(saved_folder):
    folder, _ = saved_folder
    data = json.loads((folder / "model.json").read_text())
    with pytest.raises(ModelError, match="unknown fields"):
        ModelSpec.from_dict({**data, "exec": "rm -rf"})
    with pytest.raises(ModelError, match="format"):
        ModelSpec.from_dict({**data, "format": "other/9"})


@pytest.mark.parametrize("damage", ["truncate", "random_bytes"])
def test_corrupted_weights_file_raises_model_error(saved_folder, damage):
    folder, _ = saved_folder
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_model(folder)


def test_replaced_weights_fail_the_hash_check(saved_folder):
    folder, _ = saved_folder
    torch.manual_seed(99)
    save_model(build_model(tiny_spec()), tiny_spec(), folder / "other")
    (folder / "other" / "model.safetensors").replace(folder / "model.safetensors")
    with pytest.raises(ModelError, match="hash"):
        load_model(folder)
    assert load_model(folder, verify_hash=False)[1].name == "tiny-unet"


def test_key_and_shape_mismatches_are_listed():
    torch.manual_seed(0)
    network = build_model(tiny_spec())
    state_dict = dict(network.state_dict())
    dropped = sorted(state_dict)[0]
    del state_dict[dropped]
    state_dict["extra.weight"] = torch.zeros(1)
    reshaped = sorted(state_dict)[-1]
    state_dict[reshaped] = torch.zeros(7)
    with pytest.raises(ModelError) as error:
        load_state_dict_checked(network, state_dict, source="test.safetensors")
    message = str(error.value)
    assert f"missing keys (1): {dropped}" in message
    assert "unexpected keys (1): extra.weight" in message
    assert f"{reshaped}: file [7]" in message
    assert "test.safetensors" in message


def test_save_refuses_a_model_that_does_not_match_its_spec(tmp_path):
    wider = build_model(tiny_spec(kwargs={**UNET_KWARGS, "channels": [8, 16]}))
    with pytest.raises(ModelError, match="does not match the spec's network UNet"):
        save_model(wider, tiny_spec(), tmp_path / "model")
    assert not (tmp_path / "model" / "model.json").exists()


def test_missing_folder_and_bad_json_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(tmp_path)


@pytest.mark.parametrize("name, kwargs", [
    ("UNet", {**UNET_KWARGS, "kernel_size": 0}),  # NotImplementedError inside MONAI
    ("DiffusionModelUNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "norm_num_groups": 0}),  # ZeroDivisionError
    ("AttentionUnet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": []}),  # IndexError
])
def test_arguments_a_network_rejects_in_any_way_are_model_errors(name, kwargs):
    with pytest.raises(ModelError, match=f"Could not build network {name} with arguments"):
        build_network(name, kwargs)


class _Payload:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_torch_load_refuses_pickled_code_and_garbage(tmp_path, capsys):
    malicious = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload()}, malicious)
    with pytest.raises(ModelError, match="holds Python objects besides tensors"):
        torch_load_weights(malicious)
    assert "this must never run" not in capsys.readouterr().out
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(ModelError):
        torch_load_weights(garbage)
    with pytest.raises(ModelError, match="does not exist"):
        read_safetensors(tmp_path / "absent.safetensors")
    # allowed globals called with the wrong arguments fail inside torch: still a checkpoint that cannot be used
    import zipfile

    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    for name, pickled in (("ordered", b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R."),
                          ("rebuild", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01\x85R.")):
        with zipfile.ZipFile(tmp_path / "ok.pt") as source, zipfile.ZipFile(tmp_path / f"{name}.pt", "w") as crafted:
            for item in source.infolist():
                crafted.writestr(item, pickled if item.filename.endswith("/data.pkl") else source.read(item.filename))
        with pytest.raises(ModelError, match="could not be read as a PyTorch weights file"):
            torch_load_weights(tmp_path / f"{name}.pt")


def test_channel_counts_default_to_the_network_arguments_then_the_class():
    assert ModelSpec(network="UNet", kwargs={**UNET_KWARGS, "out_channels": 3}).out_channels == 3
    linknet = ModelSpec(network="LinkNet3d")
    assert (linknet.in_channels, linknet.out_channels) == (1, 2)
