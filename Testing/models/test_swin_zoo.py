"""Swin-UNETR zoo checkpoints: every known key layout loads, with the legacy patch-merging order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMergingV2

from medgen.errors import ModelError
from medgen.models import load_swin_zoo_checkpoint, normalize_swin_state_dict

TINY_SWIN = {"in_channels": 1, "out_channels": 3, "feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}
#: smallest input whose deepest Swin stage still has more than one voxel for instance norm
VOLUME_SHAPE = (1, 1, 64, 32, 32)


class OldMonaiPatchMerging(PatchMergingV2):
    """Reference: the 3D merging of MONAI <= 1.4 / FSEFT, written as that code's eight explicit slices."""

    def forward(self, x):
        _, d, h, w, _ = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x0 = x[:, 0::2, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, 0::2, :]
        x3 = x[:, 0::2, 0::2, 1::2, :]
        x4 = x[:, 1::2, 0::2, 1::2, :]
        x5 = x[:, 0::2, 1::2, 0::2, :]
        x6 = x[:, 0::2, 0::2, 1::2, :]
        x7 = x[:, 1::2, 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)))


@pytest.fixture(scope="module")
def old_network() -> SwinUNETR:
    """A tiny Swin-UNETR as trained by pre-1.5 code (random weights, old merge order)."""
    torch.manual_seed(0)
    return SwinUNETR(**TINY_SWIN, downsample=OldMonaiPatchMerging).eval()


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return torch.randn(*VOLUME_SHAPE, generator=torch.Generator().manual_seed(1))


def fseft_layout(state_dict):
    """FSEFT pre-training: raw DDP state dict, head named classifier."""
    return {"module." + k.replace("out.conv.conv.", "classifier."): v for k, v in state_dict.items()}


def btcv_layout(state_dict):
    """BTCV fine-tuned (MONAI research contributions): {"state_dict": native keys} + bookkeeping."""
    return {"state_dict": dict(state_dict), "epoch": 5000, "best_acc": 0.8}


def ssl_layout(state_dict):
    """Self-supervised encoder (model_swinvit.pt): transformer only, no swinViT. prefix, mlp.fcN, SSL heads."""
    encoder = {
        "module." + k[len("swinViT.") :].replace("mlp.linear", "mlp.fc"): v
        for k, v in state_dict.items()
        if k.startswith("swinViT.")
    }
    encoder["module.rotation_head.weight"] = torch.zeros(4, 8)
    encoder["module.contrastive_head.weight"] = torch.zeros(8, 8)
    return {"state_dict": encoder, "epoch": 100}


def clipdriven_layout(state_dict):
    """CLIP-Driven / SuPreM Universal model: {"net": module.backbone.* + text-driven heads}, no Swin head."""
    net = {"module.organ_embedding": torch.zeros(32, 512)}
    net.update({"module.backbone." + k: v for k, v in state_dict.items() if not k.startswith("out.")})
    net["module.precls_conv.0.weight"] = torch.zeros(8, 48, 1, 1, 1)
    net["module.controller.weight"] = torch.zeros(153, 256)
    return {"net": net, "optimizer": {"state": {}, "param_groups": []}, "epoch": 2100}


def test_legacy_checkpoint_gives_identical_outputs_after_loading(tmp_path, old_network, volume):
    checkpoint_path = tmp_path / "fseft.pth"
    torch.save(fseft_layout(old_network.state_dict()), checkpoint_path)
    loaded, spec = load_swin_zoo_checkpoint(checkpoint_path, model_id="fseft")
    with torch.no_grad():
        expected = old_network(volume)
        assert torch.equal(loaded(volume), expected)
        # regression guard: MONAI >= 1.5's own "merging" accepts the same weights but computes something else
        current_monai = SwinUNETR(**TINY_SWIN).eval()
        current_monai.load_state_dict(old_network.state_dict())
        assert (current_monai(volume) - expected).abs().max() > 1e-3
    assert spec.kwargs["downsample"] == "merging_legacy"
    assert spec.output_activation == "sigmoid" and spec.preprocessing.spacing_mm == [1.5, 1.5, 1.5]


@pytest.mark.parametrize(
    "layout, container, has_head",
    [(fseft_layout, "raw", True), (btcv_layout, "state_dict", True), (ssl_layout, "state_dict", False), (clipdriven_layout, "net", False)],
)
def test_every_zoo_layout_loads_all_transformer_weights(old_network, layout, container, has_head):
    reference = old_network.state_dict()
    loaded, spec = load_swin_zoo_checkpoint(layout(reference), out_channels=None if has_head else 3)
    loaded_state = loaded.state_dict()
    transformer_keys = [k for k in reference if k.startswith("swinViT.")]
    assert all(torch.equal(loaded_state[k], reference[k]) for k in transformer_keys)
    report = spec.provenance["load_report"]
    assert report["container"] == container
    assert spec.kwargs["feature_size"] == 12 and spec.kwargs["depths"] == [1, 1, 1, 1] and spec.kwargs["window_size"] == 7
    if has_head:
        assert torch.equal(loaded_state["out.conv.conv.weight"], reference["out.conv.conv.weight"])
        assert report["missing_from_checkpoint"] == []
    else:
        assert "out.conv.conv.weight" in report["missing_from_checkpoint"]


def test_foreign_heads_are_dropped_and_reported(old_network):
    state_dict, report = normalize_swin_state_dict(clipdriven_layout(old_network.state_dict()))
    assert not any(k.startswith(("module.", "backbone.", "organ_embedding", "controller")) for k in state_dict)
    assert report["dropped_foreign"] == ["module.controller.weight", "module.organ_embedding", "module.precls_conv.0.weight"]


def test_missing_transformer_weight_is_an_error_not_a_silent_random_init(old_network):
    damaged = dict(old_network.state_dict())
    del damaged["swinViT.layers2.0.blocks.0.attn.qkv.weight"]
    with pytest.raises(ModelError, match=r"missing transformer keys \['swinViT.layers2.0.blocks.0.attn.qkv.weight'\]"):
        load_swin_zoo_checkpoint(damaged)


def test_headless_checkpoint_needs_out_channels_and_non_swin_is_refused(old_network):
    with pytest.raises(ModelError, match="pass out_channels"):
        load_swin_zoo_checkpoint(ssl_layout(old_network.state_dict()))
    with pytest.raises(ModelError, match="no Swin-UNETR transformer"):
        load_swin_zoo_checkpoint({"down_tr64.ops.0.conv1.weight": torch.zeros(2, 1, 3, 3, 3)})
    with pytest.raises(ModelError, match="Unknown Swin-UNETR zoo model id"):
        load_swin_zoo_checkpoint(old_network.state_dict(), model_id="imagenet")


def test_a_checkpoint_without_qkv_biases_builds_attention_without_them(volume):
    """Whether the attention's qkv projection has a bias is read from the checkpoint: one trained without it loads
    into a network without it, and computes what the trained network computed."""
    torch.manual_seed(0)
    no_bias = SwinUNETR(**TINY_SWIN, qkv_bias=False, downsample=OldMonaiPatchMerging).eval()
    assert not any(name.endswith("qkv.bias") for name in no_bias.state_dict())
    loaded, spec = load_swin_zoo_checkpoint(fseft_layout(no_bias.state_dict()))
    assert spec.kwargs["qkv_bias"] is False and loaded.swinViT.layers1[0].blocks[0].attn.qkv.bias is None
    with torch.no_grad():
        assert torch.equal(loaded(volume), no_bias(volume))
