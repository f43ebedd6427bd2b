"""MONAI bundles: a tiny bundle made in a temp folder loads offline, safely and exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SegResNet, SwinUNETR

from medgen.errors import ModelError
from medgen.models import LegacyPatchMerging, load_bundle, load_model, save_model

NETWORK_DEF = {
    "_target_": "SegResNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": "@num_classes",
    "init_filters": 8,
    "blocks_down": [1, 1],
    "blocks_up": [1],
}
METADATA = {
    "name": "tiny_segresnet",
    "version": "0.1.0",
    "monai_version": "1.6.1",
    "network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "liver", "2": "spleen"}}}},
}


def write_bundle(folder: Path, network_def: dict, weights: dict | None, metadata: dict = METADATA) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {"num_classes": 3, "network_def": network_def, "inferer": {"_target_": "SlidingWindowInferer"}}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    if weights is not None:
        torch.save(weights, folder / "models" / "model.pt")
    return folder


@pytest.fixture
def reference_network() -> SegResNet:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in NETWORK_DEF.items() if not k.startswith("_")}
    return SegResNet(**{**kwargs, "out_channels": 3}).eval()


def test_bundle_loads_with_reference_outputs_and_class_names(tmp_path, reference_network):
    bundle = write_bundle(tmp_path / "bundle", NETWORK_DEF, reference_network.state_dict())
    network, spec = load_bundle(bundle)
    volume = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(network(volume), reference_network(volume))
    assert spec.network == "SegResNet" and spec.out_channels == 3
    assert spec.kwargs["out_channels"] == 3  # the @num_classes reference is resolved
    assert spec.class_names == ["background", "liver", "spleen"]


def test_bundle_converts_to_a_model_folder(tmp_path, reference_network):
    bundle = write_bundle(tmp_path / "bundle", NETWORK_DEF, {"model": reference_network.state_dict(), "epoch": 3})
    network, spec = load_bundle(bundle)
    save_model(network, spec, tmp_path / "converted")
    reloaded, reloaded_spec = load_model(tmp_path / "converted")
    assert reloaded_spec.provenance["source"].startswith("MONAI bundle")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), network.state_dict().values()))


def test_expression_in_network_def_is_refused(tmp_path, reference_network):
    network_def = {**NETWORK_DEF, "init_filters": "$__import__('os').system('echo hacked')"}
    bundle = write_bundle(tmp_path / "bundle", network_def, reference_network.state_dict())
    with pytest.raises(ModelError, match="Python expression"):
        load_bundle(bundle)


def test_expression_behind_a_reference_is_refused(tmp_path, reference_network):
    bundle = write_bundle(tmp_path / "bundle", {**NETWORK_DEF, "init_filters": "@filters"}, reference_network.state_dict())
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["filters"] = "$8"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="Python expression"):
        load_bundle(bundle)
    network, _ = load_bundle(bundle, allow_expressions=True)
    assert network.init_filters == 8


def test_network_off_the_allow_list_is_refused(tmp_path):
    bundle = write_bundle(tmp_path / "bundle", {"_target_": "builtins.eval", "source": "1"}, {"w": torch.zeros(1)})
    with pytest.raises(ModelError, match="Unknown network class 'eval'"):
        load_bundle(bundle)


def test_torchscript_only_bundle_loads_tensors_into_an_eager_network(tmp_path, reference_network):
    bundle = write_bundle(tmp_path / "bundle", NETWORK_DEF, None)
    torch.jit.script(reference_network).save(str(bundle / "models" / "model.ts"))
    network, _ = load_bundle(bundle)
    assert type(network) is SegResNet
    volume = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(network(volume), reference_network(volume))


def test_bundle_without_weights_or_with_broken_torchscript_raises_model_error(tmp_path):
    bundle = write_bundle(tmp_path / "bundle", NETWORK_DEF, None)
    with pytest.raises(ModelError, match="has no weights"):
        load_bundle(bundle)
    (bundle / "models" / "model.ts").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelError, match="TorchScript archive"):
        load_bundle(bundle)


def test_wrong_weights_list_the_differing_keys(tmp_path, reference_network):
    state_dict = dict(reference_network.state_dict())
    state_dict.pop("conv_final.2.conv.weight")
    bundle = write_bundle(tmp_path / "bundle", NETWORK_DEF, state_dict)
    with pytest.raises(ModelError, match=r"missing keys \(1\): conv_final.2.conv.weight"):
        load_bundle(bundle)


def test_not_a_bundle_says_what_is_expected(tmp_path):
    (tmp_path / "configs").mkdir()
    with pytest.raises(ModelError, match="not a MONAI bundle"):
        load_bundle(tmp_path)


def test_malformed_metadata_and_dangling_references_are_model_errors(tmp_path, reference_network):
    weights = reference_network.state_dict()
    with pytest.raises(ModelError, match="must hold a JSON object; it holds a list"):
        load_bundle(write_bundle(tmp_path / "list", NETWORK_DEF, weights, metadata=[]))
    with pytest.raises(ModelError, match="Could not resolve the network arguments"):
        load_bundle(write_bundle(tmp_path / "dangling", {**NETWORK_DEF, "init_filters": "@nowhere"}, weights))
    odd = {**METADATA, "network_data_format": {"outputs": {"pred": "a string"}}}  # only the class names are lost
    assert load_bundle(write_bundle(tmp_path / "odd", NETWORK_DEF, weights, metadata=odd))[1].class_names == []


def test_pre_1_5_swin_bundle_gets_legacy_merging_and_drops_img_size(tmp_path):
    torch.manual_seed(0)
    swin_kwargs = {"in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    trained_before_1_5 = SwinUNETR(**swin_kwargs, downsample=LegacyPatchMerging)
    network_def = {"_target_": "SwinUNETR", "img_size": [64, 64, 64], **swin_kwargs}
    metadata = {**METADATA, "monai_version": "1.3.0", "network_data_format": {}}
    bundle = write_bundle(tmp_path / "bundle", network_def, trained_before_1_5.state_dict(), metadata)
    network, spec = load_bundle(bundle)
    assert spec.kwargs["downsample"] == "merging_legacy" and "img_size" not in spec.kwargs
    assert isinstance(network.swinViT.layers1[0].downsample, LegacyPatchMerging)


def test_class_names_follow_the_channel_numbers_beyond_ten(tmp_path):
    """channel_def keys are channel numbers written as strings: channel 10 comes after channel 9, not after 1."""
    torch.manual_seed(0)
    network_def = {**NETWORK_DEF, "out_channels": 12}
    kwargs = {k: v for k, v in network_def.items() if not k.startswith("_")}
    names = ["background", *(f"organ {channel}" for channel in range(1, 12))]
    channel_def = {str(channel): name for channel, name in reversed(list(enumerate(names)))}
    metadata = {**METADATA, "network_data_format": {"outputs": {"pred": {"channel_def": channel_def}}}}
    bundle = write_bundle(tmp_path / "bundle", network_def, SegResNet(**kwargs).state_dict(), metadata)
    assert load_bundle(bundle)[1].class_names == names


def test_a_swin_bundle_made_with_monai_1_5_keeps_the_current_patch_merging(tmp_path):
    """MONAI 1.5.0 itself changed the patch-merging order: a bundle recorded with it is used as it is, without the
    legacy merging or any other compatibility change."""
    torch.manual_seed(0)
    swin_kwargs = {"in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    metadata = {**METADATA, "monai_version": "1.5.0", "network_data_format": {}}
    bundle = write_bundle(tmp_path / "bundle", {"_target_": "SwinUNETR", **swin_kwargs}, SwinUNETR(**swin_kwargs).state_dict(), metadata)
    network, spec = load_bundle(bundle)
    assert spec.kwargs.get("downsample", "merging") == "merging" and spec.provenance["compat"] == []
    assert not isinstance(network.swinViT.layers1[0].downsample, LegacyPatchMerging)
