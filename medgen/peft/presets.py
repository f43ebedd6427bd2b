"""Named option sets that reproduce published recipes.

- ``tenvoo-paper``: the released TenVOO fine-tuning recipe on the 3D DDPM ``DiffusionModelUNet``
  (spec tenvoo.md §5.6, §6.3): six target groups (111 layers; the middle block is not matched because the
  regexes say "resnets"/"attentions" in the plural), rank 4, default init, wrapped biases and all "*norm*" trained.
- ``fseft``: the FSEFT methods on MONAI ``SwinUNETR`` (feature_size 48, binary head ``out.conv.conv``, decoder
  frozen unless ``decoder=True``), with the released quirks that make its parameter counts (spec fseft.md §4.1).
"""

from __future__ import annotations

from typing import Any

from medgen.errors import BadInputError

#: the six DDPM_LAYERS groups used by the released scripts: conv1, conv2, to_q, to_v, time_emb_proj, time_embed.2
TENVOO_PAPER_TARGETS = [
    r".*resnets.*.conv1.conv",
    r".*resnets.*.conv2.conv",
    r".*attentions.*.to_q",
    r".*attentions.*.to_v",
    r"time_embed.2",
    r".*resnets.*.time_emb_proj",
]

_TENVOO_PAPER = {
    "target_modules": TENVOO_PAPER_TARGETS,
    "rank": 4,
    "init": "sum_opposite_freeze_one",
    "train_bias": True,
    "train_norms": True,
    "exclude_first_last_conv": True,
}

SWIN_HEAD = "out.conv.conv"
_SWIN_BLOCKS = r"^swinViT\.layers\d+\.0\.blocks\.\d+$"

_FSEFT = {
    "linear-probe": {"head": SWIN_HEAD},
    "spatial-adapter": {"head": SWIN_HEAD, "kernel_size": 3},
    # the block LayerNorms and the four patch-merging LayerNorms
    "affine-norm": {"head": SWIN_HEAD, "target_modules": r"^swinViT\."},
    # FSEFT selects names containing "attn"/"mlp" and "bias": this catches the relative-position tables (quirk Q4)
    "bitfit": {"head": SWIN_HEAD, "target_modules": r"^swinViT\..*\.(attn|mlp)(\.|$)", "include_relpos_bias": True},
    # rank 4 per q/k/v fused on qkv = rank 12, no alpha scaling (quirk Q2)
    "lora": {"head": SWIN_HEAD, "target_modules": r"\.attn\.qkv$", "rank": 12, "alpha": 12},
    "adaptformer": {"head": SWIN_HEAD, "target_modules": _SWIN_BLOCKS, "bottleneck": 16, "scale": 0.1},
    "full": {},
}

PRESETS = ("tenvoo-paper", "fseft")


def resolve_preset(preset: str | None, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method options of ``preset`` overridden by the user's ``options``.

    Args:
        preset: ``None``, ``"tenvoo-paper"`` or ``"fseft"``.
        method: the method name.
        options: user options; for ``fseft`` the extra option ``decoder`` (bool) unfreezes every parameter whose
            name contains "decoder", as FSEFT's ``--decoder fine-tuned``.
    """
    if preset is None:
        return dict(options)
    if preset == "tenvoo-paper":
        if method not in ("tenvoo-l", "tenvoo-q"):
            raise BadInputError(f"preset 'tenvoo-paper' is defined for tenvoo-l and tenvoo-q, not {method!r}.")
        return {**_TENVOO_PAPER, **options}
    if preset == "fseft":
        if method not in _FSEFT:
            raise BadInputError(f"preset 'fseft' is defined for {sorted(_FSEFT)}, not {method!r}.")
        user = dict(options)
        defaults = dict(_FSEFT[method])
        if user.pop("decoder", False):
            defaults["train_also"] = "decoder"
        return {**defaults, **user}
    raise BadInputError(f"unknown preset {preset!r}; known presets: {list(PRESETS)}.")
