"""Swin-UNETR checkpoints of the public model zoo (FSEFT, BTCV, self-supervised, CLIP-Driven, SuPreM).

Two things make these files hard to load into MONAI's ``SwinUNETR``:

1. Key layouts differ per family (``module.``/``backbone.`` prefixes, ``{"state_dict"}``/``{"net"}``
   wrappers, ``classifier`` instead of ``out.conv.conv``, the self-supervised encoder's bare
   ``layersN``/``mlp.fcN`` names, foreign text-driven heads). :func:`normalize_swin_state_dict` maps
   every key, one by one, onto MONAI's names.
2. All of them were trained with the *legacy* patch-merging order of MONAI <= 1.4, which MONAI 1.5
   changed. Both orders accept the same weights, so loading "succeeds" but the outputs differ.
   :class:`LegacyPatchMerging` restores the old order; the loader always builds the network with it.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from monai.networks.nets.swin_unetr import PatchMergingV2
from torch import nn
from torch.nn import functional as F

from medgen.errors import ModelError
from medgen.models.registry import build_network
from medgen.models.spec import ModelSpec, Preprocessing
from medgen.models.weights import read_safetensors, state_dict_differences, torch_load_weights, unwrap_state_dict

#: (d, h, w) parity of the eight sub-grids concatenated by MONAI <= 1.4's "merging" (and by the FSEFT,
#: SuPreM and CLIP-Driven copies). Slots 5 and 6 repeat slots 2 and 3: (1, 1, 0) and (0, 1, 1) are never
#: used. This is a bug of the original code, kept because every checkpoint was trained with it.
LEGACY_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

#: top-level modules of heads that are not part of Swin-UNETR (CLIP-Driven/SuPreM, SSL pre-training)
FOREIGN_HEADS = (
    "precls_conv",
    "GAP",
    "controller",
    "organ_embedding",
    "text_to_vision",
    "text_encoder",
    "rotation_pre",
    "rotation_head",
    "contrastive_pre",
    "contrastive_head",
    "conv",
    "convTrans3d",
)
#: known model ids -> what their head means (for zero-shot head initialisation downstream)
ZOO_HEADS = {
    "fseft": {"output_activation": "sigmoid", "head": "29 sigmoid channels in FSEFT universal-template order"},
    "btcv": {"output_activation": "softmax", "head": "14 softmax channels: background + 13 BTCV organs"},
    "selfsup": {"output_activation": "none", "head": "none (self-supervised encoder)"},
    "clipdriven": {"output_activation": "none", "head": "none usable (text-driven dynamic heads dropped)"},
    "suprem_swinunetr": {"output_activation": "none", "head": "none usable (text-driven dynamic heads dropped)"},
}
#: preprocessing shared by the whole zoo (FSEFT spec §3.4): 1.5 mm iso, HU [-175, 250] -> [0, 1], 96³ ROI
ZOO_PREPROCESSING = Preprocessing(
    intensity={"method": "range", "a_min": -175.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
    spacing_mm=[1.5, 1.5, 1.5],
    patch_size=[96, 96, 96],
    orientation="RAS",
)


class LegacyPatchMerging(PatchMergingV2):
    """Patch merging with MONAI <= 1.4's 3D sub-grid order (see :data:`LEGACY_MERGE_ORDER`).

    Pass it as ``SwinUNETR(..., downsample=LegacyPatchMerging)`` (or ``"merging_legacy"`` in a model spec)
    for any checkpoint trained before MONAI 1.5. Input ``(B, D, H, W, C)`` channels-last; output
    ``(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)``. 2D inputs behave as MONAI's (unchanged) 2D merging.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        _, depth, height, width, _ = x.shape
        # odd sizes are padded at the far end, as MONAI does
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2, 0, depth % 2))
        x = torch.cat([x[:, d::2, h::2, w::2, :] for d, h, w in LEGACY_MERGE_ORDER], dim=-1)
        return self.reduction(self.norm(x))


def _swin_key(name: str) -> str:
    """One checkpoint key in MONAI SwinUNETR's naming."""
    while name.startswith(("module.", "backbone.")):
        name = name.split(".", 1)[1]
    name = name.replace("swin_vit.", "swinViT.")
    name = re.sub(r"\.mlp\.fc([12])\.", r".mlp.linear\1.", name)
    # the self-supervised encoder (model_swinvit.pt) stores the transformer at top level
    if re.match(r"(patch_embed|layers\d+c?)\.", name):
        name = "swinViT." + name
    if name.startswith("classifier."):
        name = "out.conv.conv." + name[len("classifier.") :]
    return name


def normalize_swin_state_dict(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map a zoo checkpoint (any layout of FSEFT spec §3.4) onto MONAI ``SwinUNETR`` state-dict names.

    Args:
        checkpoint: what ``torch.load`` returned: a raw state dict, or one wrapped in
            ``state_dict``/``net``/``model``/``network``; non-tensor entries are ignored.

    Returns:
        ``(state_dict, report)``: the renamed tensors without foreign heads, and a report with
        ``container`` (which wrapper held the tensors) and ``dropped_foreign`` (head keys removed).
    """
    raw_state_dict, container = unwrap_state_dict(checkpoint)
    state_dict: dict[str, torch.Tensor] = {}
    dropped = []
    for name, tensor in raw_state_dict.items():
        renamed = _swin_key(name)
        if renamed.split(".", 1)[0] in FOREIGN_HEADS:
            dropped.append(name)
        else:
            state_dict[renamed] = tensor
    return state_dict, {"container": container, "dropped_foreign": sorted(dropped)}


def infer_swin_kwargs(state_dict: Mapping[str, torch.Tensor], out_channels: int | None = None) -> dict[str, Any]:
    """SwinUNETR constructor arguments read off the tensor shapes of a normalised state dict.

    Raises:
        ModelError: the state dict has no Swin transformer, or no head and no ``out_channels`` given.
    """
    embed = state_dict.get("swinViT.patch_embed.proj.weight")
    if embed is None:
        raise ModelError(
            "Checkpoint has no Swin-UNETR transformer (no key ending in patch_embed.proj.weight after removing "
            f"module./backbone. prefixes); first keys found: {sorted(state_dict)[:5]}."
        )
    feature_size, in_channels, patch_size = embed.shape[0], embed.shape[1], embed.shape[2]
    depths, num_heads = [], []
    for stage in range(1, 5):
        block_pattern = re.compile(rf"swinViT\.layers{stage}\.0\.blocks\.(\d+)\.")
        blocks = {int(match.group(1)) for key in state_dict if (match := block_pattern.match(key))}
        table = state_dict.get(f"swinViT.layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None:
            raise ModelError(f"Checkpoint lacks Swin stage {stage} (swinViT.layers{stage}.0.blocks.*).")
        depths.append(max(blocks) + 1)
        num_heads.append(int(table.shape[1]))
    # the relative-position table has (2 * window - 1)³ rows
    window_size = (round(int(table.shape[0]) ** (1 / 3)) + 1) // 2
    head = state_dict.get("out.conv.conv.weight")
    if head is not None:
        out_channels = int(head.shape[0])
    elif out_channels is None:
        raise ModelError("Checkpoint has no segmentation head (out.conv.conv / classifier): pass out_channels.")
    return {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "patch_size": int(patch_size),
        "depths": depths,
        "num_heads": num_heads,
        "window_size": int(window_size),
        "feature_size": int(feature_size),
        "qkv_bias": "swinViT.layers1.0.blocks.0.attn.qkv.bias" in state_dict,
        "use_v2": any(k.startswith("swinViT.layers1c.") for k in state_dict),
        "spatial_dims": 3,
        "downsample": "merging_legacy",
    }


def load_swin_zoo_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any], model_id: str | None = None, out_channels: int | None = None
) -> tuple[nn.Module, ModelSpec]:
    """Build MONAI ``SwinUNETR`` with legacy patch merging and load a zoo checkpoint into it.

    Args:
        checkpoint: a ``.pt``/``.pth`` file (read with ``weights_only=True``), a ``.safetensors`` file, or an
            already loaded checkpoint mapping.
        model_id: ``fseft``, ``btcv``, ``selfsup``, ``clipdriven`` or ``suprem_swinunetr`` to record what the
            head means; None when unknown.
        out_channels: head size when the checkpoint has no head (self-supervised, CLIP-Driven, SuPreM);
            that head is then randomly initialised.

    Returns:
        ``(network, spec)`` in eval mode; ``spec.provenance["load_report"]`` lists the container, the foreign
        head keys dropped, the network keys the checkpoint did not provide (decoder/head only; they keep
        their random init) and checkpoint keys the network has no place for (ignored).

    Raises:
        ModelError: unreadable file, no Swin transformer, or any transformer (``swinViT.*``) weight
            missing or of the wrong shape.
    """
    if model_id is not None and model_id not in ZOO_HEADS:
        raise ModelError(f"Unknown Swin-UNETR zoo model id {model_id!r}; known: {sorted(ZOO_HEADS)} (or None).")
    source = "checkpoint mapping"
    if not isinstance(checkpoint, Mapping):
        source = str(checkpoint)
        path = Path(checkpoint)
        checkpoint = read_safetensors(path) if path.suffix == ".safetensors" else torch_load_weights(path)
    state_dict, report = normalize_swin_state_dict(checkpoint)
    kwargs = infer_swin_kwargs(state_dict, out_channels)
    network = build_network("SwinUNETR", kwargs)
    missing, unexpected, mismatched = state_dict_differences(network, state_dict)
    # relative_position_index is a constant buffer that some checkpoints omit; everything else in the
    # transformer must come from the file, or the "pretrained" backbone would be partly random
    missing_backbone = [k for k in missing if k.startswith("swinViT.") and not k.endswith("relative_position_index")]
    if missing_backbone or mismatched:
        raise ModelError(
            f"Checkpoint {source} does not fit Swin-UNETR {kwargs}: missing transformer keys {missing_backbone[:5]} "
            f"({len(missing_backbone)} in all), shape mismatches {mismatched[:5]} ({len(mismatched)} in all). "
            "Check that the file is a Swin-UNETR checkpoint and pass the right out_channels."
        )
    network.load_state_dict({k: v for k, v in state_dict.items() if k not in unexpected}, strict=False)
    head_info = ZOO_HEADS.get(model_id or "", {"output_activation": "none", "head": "unknown"})
    report["missing_from_checkpoint"] = sorted(k for k in missing if not k.endswith("relative_position_index"))
    report["unexpected_ignored"] = unexpected
    spec = ModelSpec(
        network="SwinUNETR",
        kwargs=kwargs,
        in_channels=kwargs["in_channels"],
        out_channels=kwargs["out_channels"],
        output_activation=head_info["output_activation"],
        preprocessing=copy.deepcopy(ZOO_PREPROCESSING),
        name=model_id or Path(source).stem,
        description=f"Swin-UNETR zoo checkpoint ({head_info['head']})",
        provenance={"source": source, "model_id": model_id, "head": head_info["head"], "load_report": report},
    )
    return network.eval(), spec
