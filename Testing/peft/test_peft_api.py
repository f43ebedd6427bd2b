"""The shared medgen.peft API on every method: FSEFT counts (spec fseft.md §9 O2–O6), identity, merge, freezing,
adapter files and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_helpers import perturb_trainable, tiny_swin, tiny_unet, unet_inputs
from torch import nn

from medgen.errors import BadInputError, ModelError
from medgen.peft import METHODS, describe, inject, load_adapter, merge, save_adapter, trainable_parameters
from medgen.peft.inject import RECORD_ATTRIBUTE

FSEFT_COUNTS = {
    "linear-probe": (49, 19_597_873),
    "spatial-adapter": (124_465, None),
    "affine-norm": (17_329, 19_615_153),
    "bitfit": (210_739, 19_808_563),
    "lora": (69_169, 19_666_993),
    "adaptformer": (47_697, 19_645_521),
    "full": (62_186_659, 62_186_659),
}

# options that make each method applicable to the tiny Swin-UNETR (feature_size 12)
SWIN_OPTIONS = {
    "lora": {"preset": "fseft"},
    "ia3": {"target_modules": r"\.attn\.qkv$", "head": "out.conv.conv"},
    "bitfit": {"preset": "fseft"},
    "affine-norm": {"preset": "fseft"},
    "adaptformer": {"preset": "fseft"},
    "linear-probe": {"preset": "fseft"},
    "spatial-adapter": {"preset": "fseft"},
    "full": {"preset": "fseft"},
}
# methods on the tiny DDPM UNet's Conv3d layers
UNET_OPTIONS = {
    "tenvoo-l": {"preset": "tenvoo-paper"},
    "tenvoo-q": {"preset": "tenvoo-paper", "init": "last_layer_zero"},
    "lora": {"target_modules": r"resnets.*\.conv[12]\.conv$", "rank": 4, "alpha": 8},
    "ia3": {"target_modules": r"resnets.*\.conv[12]\.conv$"},
}
SWIN_INPUT = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
CASES = [("swin", method) for method in SWIN_OPTIONS] + [("unet", method) for method in UNET_OPTIONS]


def build(kind: str, method: str) -> tuple[nn.Module, nn.Module, tuple]:
    """(base, adapted copy, inputs) for one case."""
    if kind == "swin":
        base, inputs = tiny_swin(), (SWIN_INPUT,)
        options = dict(SWIN_OPTIONS[method])
    else:
        base, inputs = tiny_unet(), unet_inputs()
        options = dict(UNET_OPTIONS[method])
    preset = options.pop("preset", None)
    return base, inject(copy.deepcopy(base), method, preset=preset, **options), inputs


def test_every_method_is_covered():
    assert set(SWIN_OPTIONS) | set(UNET_OPTIONS) == set(METHODS)


@pytest.fixture(scope="module")
def swin_fs48():
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=1, feature_size=48)


@pytest.mark.parametrize("method", list(FSEFT_COUNTS))
def test_o2_fseft_trainable_counts(swin_fs48, method):
    frozen_decoder, tuned_decoder = FSEFT_COUNTS[method]
    model = inject(copy.deepcopy(swin_fs48), method, preset="fseft")
    assert trainable_parameters(model) == frozen_decoder
    if tuned_decoder is not None:
        model = inject(copy.deepcopy(swin_fs48), method, preset="fseft", decoder=True)
        assert trainable_parameters(model) == tuned_decoder


@pytest.fixture(scope="module")
def base_outputs():
    """Base-model outputs by kind, computed once (the Swin forward is the slow part of this file)."""
    outputs = {}
    torch.set_num_threads(1)  # as in every test (conftest): the thread count changes float summation order
    with torch.no_grad():
        outputs["swin"] = tiny_swin()(SWIN_INPUT)
        outputs["unet"] = tiny_unet()(*unet_inputs())
    return outputs


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_o3_identity_at_init(base_outputs, kind, method):
    _, adapted, inputs = build(kind, method)
    with torch.no_grad():
        output = adapted(*inputs)
    assert base_outputs[kind].abs().max() > 0
    assert torch.equal(output, base_outputs[kind])  # every method here starts as an exact identity


FOLDABLE = [(kind, method) for kind, method in CASES if method in ("tenvoo-l", "tenvoo-q", "lora", "ia3")]


@pytest.mark.parametrize(("kind", "method"), FOLDABLE)
def test_merge_equivalence(kind, method):
    base, adapted, inputs = build(kind, method)
    if kind == "unet":
        inputs = unet_inputs(size=8)  # float64 convolutions are slow on CPU; 8³ still crosses both UNet levels
    perturb_trainable(adapted)
    # float64 isolates the algebra of the merge from float32 rounding amplified by the network
    adapted, inputs = adapted.double(), tuple(item.double() if item.is_floating_point() else item for item in inputs)
    with torch.no_grad():
        expected = adapted(*inputs)
        merged = merge(copy.deepcopy(adapted))
        output = merged(*inputs)
    assert (output - expected).abs().max().item() <= 1e-9
    assert set(merged.state_dict()) == set(base.state_dict())  # folded back into the base architecture


@pytest.mark.parametrize("method", ["tenvoo-l", "lora"])
def test_merge_refuses_a_damaged_adapter_and_leaves_the_model_adapted(method):
    _, adapted, _ = build("unet", method)
    perturb_trainable(adapted)
    last = [value for name, value in adapted.named_parameters() if value.requires_grad and "resnets" in name][-1]
    with torch.no_grad():
        last.view(-1)[0] = float("nan")  # the last adapted layer: a half-way merge would have folded the others
    names = [name for name, _ in adapted.named_modules()]
    with pytest.raises(BadInputError, match="NaN or infinite"):
        merge(adapted)
    assert [name for name, _ in adapted.named_modules()] == names
    assert hasattr(adapted, RECORD_ATTRIBUTE)


@pytest.mark.parametrize("method", ["bitfit", "adaptformer", "spatial-adapter"])
def test_merge_keeps_unfoldable_methods(method):
    _, adapted, _ = build("swin", method)
    names = [name for name, _ in adapted.named_modules()]
    merged = merge(adapted)
    assert [name for name, _ in merged.named_modules()] == names
    with pytest.raises(BadInputError, match="no MedGen adapter"):
        save_adapter(merged, "unused")


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_o4_gradients_and_frozen_weights_after_optimizer_step(kind, method):
    _, adapted, inputs = build(kind, method)
    perturb_trainable(adapted)  # opens zero-initialised branches so every trainable tensor gets a gradient
    frozen = {name: tensor.clone() for name, tensor in adapted.state_dict().items()}
    trainable_names = {name for name, parameter in adapted.named_parameters() if parameter.requires_grad}
    optimizer = torch.optim.AdamW(adapted.parameters(), lr=1e-2, weight_decay=0.0)
    adapted(*inputs).pow(2).mean().backward()
    for name, parameter in adapted.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name
    optimizer.step()
    changed = {name for name, tensor in adapted.state_dict().items() if not torch.equal(tensor, frozen[name])}
    assert changed and changed <= trainable_names


def test_o5_lora_zero_init_dynamics():
    _, adapted, inputs = build("swin", "lora")
    lora_a = {name: p.clone() for name, p in adapted.named_parameters() if "lora_A" in name}
    optimizer = torch.optim.AdamW(adapted.parameters(), lr=1e-3, weight_decay=0.0)
    adapted(*inputs).pow(2).mean().backward()
    optimizer.step()
    parameters = dict(adapted.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in lora_a.items())
    assert any(parameters[name].abs().max() > 0 for name in parameters if "lora_B" in name)


@pytest.mark.parametrize(("kind", "method"), [("unet", "tenvoo-q"), ("unet", "lora"), ("swin", "spatial-adapter"),
                                               ("swin", "adaptformer")])
def test_save_load_round_trip(tmp_path, kind, method):
    base, adapted, inputs = build(kind, method)
    perturb_trainable(adapted)
    save_adapter(adapted, tmp_path)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(*inputs), adapted(*inputs))
    assert trainable_parameters(reloaded) == trainable_parameters(adapted)


def test_load_refuses_other_base_weights(tmp_path):
    _, adapted, _ = build("unet", "tenvoo-l")
    save_adapter(adapted, tmp_path)
    with pytest.raises(ModelError, match="SHA-256"):
        load_adapter(tiny_unet(seed=7), tmp_path)


def test_load_refuses_corrupted_file(tmp_path):
    base, adapted, _ = build("unet", "tenvoo-l")
    save_adapter(adapted, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_load_refuses_damaged_tensor_bytes_that_still_parse(tmp_path):
    """safetensors has no checksum: overwritten payload bytes parse as other numbers (NaN outputs) unless a digest is kept."""
    import json

    base, adapted, _ = build("unet", "tenvoo-l")
    save_adapter(adapted, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = b"\xff" * 64
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="is damaged"):
        load_adapter(copy.deepcopy(base), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["adapter_weights_sha256"]  # an adapter saved before the digest was recorded still loads
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    load_adapter(copy.deepcopy(base), tmp_path)


def test_load_refuses_an_adapter_with_tensors_this_model_has_no_place_for(tmp_path):
    """An adapter file re-saved with one tensor more (e.g. edited by hand, or from another variant of the network)
    must be refused by name, not half-loaded or crash on the stray tensor: its config digest is updated too, so
    only the tensor check can tell."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    base, adapted, _ = build("unet", "tenvoo-l")
    save_adapter(adapted, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.extra_core"] = torch.zeros(2, 2)
    save_file(tensors, str(weights), metadata={"format": "medgen-peft-adapter"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["adapter_weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"missing tensors \[\], unexpected tensors \['conv_in.extra_core'\]"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_load_refuses_mismatched_network(tmp_path):
    _, adapted, _ = build("unet", "tenvoo-l")
    save_adapter(adapted, tmp_path)
    with pytest.raises(ModelError):
        load_adapter(tiny_swin(), tmp_path)


def test_regex_matching_nothing_lists_module_names():
    with pytest.raises(BadInputError, match=r"no module.*conv1"):
        inject(tiny_unet(), "lora", target_modules=r"does_not_exist")


@pytest.mark.parametrize(("method", "layer_type"), [("lora", "ConvTranspose3d"), ("tenvoo-l", "ConvTranspose3d")])
def test_unsupported_layer_type_is_named(method, layer_type):
    with pytest.raises(BadInputError, match=layer_type):
        inject(tiny_swin(), method, target_modules=r"decoder2\.transp_conv\.conv$")


@pytest.mark.parametrize("layer, named", [
    (dict(dilation=2), r"dilation \(2, 2, 2\)"),  # peft's branch would output another size: every forward fails
    (dict(groups=2), "groups=2"),  # peft cannot merge it
    (dict(padding_mode="reflect"), "padding_mode='reflect'"),  # the branch pads with zeros: merged != adapted
])
def test_lora_refuses_conv_layers_its_branch_gets_wrong_and_leaves_the_model_as_it_was(layer, named):
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=2 if "dilation" in layer else 1, **layer))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(BadInputError, match=f"1 matched layer.*1: {named}.*use TenVOO"):
        inject(model, "lora", rank=2)
    assert all(type(module) is nn.Conv3d for module in model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    inject(model, "lora", rank=2, target_modules=r"^0$")  # the plain layer alone is fine


def test_unknown_option_and_method_are_rejected():
    with pytest.raises(BadInputError, match="rank"):
        inject(tiny_swin(), "bitfit", rank=4)
    with pytest.raises(BadInputError, match="tenvoo-l"):
        inject(tiny_swin(), "loha")


@pytest.mark.parametrize("options, message", [
    ({"rank": 0}, "Option rank must be a whole number >= 1; got 0"),
    ({"rank": "abc"}, "Option rank must be a whole number >= 1; got 'abc'"),
    ({"alpha": -1}, "alpha must be a positive number"),
    ({"alpha": "8"}, "Option alpha must be a number or null; got '8'"),
    ({"dropout": 2.0}, r"dropout must be a probability in \[0, 1\); got 2.0"),
    ({"dropout": True}, "Option dropout must be a number; got True"),
])
def test_bad_lora_options_are_clear_errors_before_peft_sees_them(options, message):
    with pytest.raises(BadInputError, match=message):
        inject(tiny_swin(), "lora", **options)


@pytest.mark.parametrize("rank", [0, -1, "4", 2.5, True, None])
@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q"])
def test_tenvoo_ranks_that_are_not_whole_numbers_are_clear_errors(method, rank):
    """A job's method_options come from JSON: "4", 2.5 or true must be refused, not crash inside the layer."""
    with pytest.raises(BadInputError, match=f"Option rank must be a whole number >= 1; got {rank!r}"):
        inject(tiny_swin(), method, rank=rank)


@pytest.mark.parametrize("method, options, message", [
    ("tenvoo-l", {"target_modules": 5}, "Option target_modules must be a string, a list of strings or null; got 5"),
    ("tenvoo-l", {"train_also": [None]}, r"Option train_also must be a string, a list of strings or null; got \[None\]"),
    ("tenvoo-q", {"factor_table": {"8": 5}}, "Option factor_table must be a mapping of channel counts to lists of whole "
                                             "numbers or null"),
    ("bitfit", {"include_relpos_bias": "yes"}, "Option include_relpos_bias must be a true/false value; got 'yes'"),
    ("linear-probe", {"head": "out.conv.conv", "head_out_channels": 0}, "Option head_out_channels must be a whole "
                                                                         r"number >= 1 \(or null\); got 0"),
    ("linear-probe", {"head": "out.conv.conv", "head_rows": []}, "head_rows must list at least one row"),
    ("linear-probe", {"head": "out.conv.conv", "head_rows": [0, 1]}, r"head_rows \[0, 1\] must be rows 0..0 of the "
                                                                      r"pre-trained head \(1 outputs\)"),
    ("spatial-adapter", {"head": "out.conv.conv", "kernel_size": -1}, "Option kernel_size must be a whole number >= 1"),
    ("adaptformer", {"bottleneck": 2.5}, "Option bottleneck must be a whole number >= 1; got 2.5"),
])
def test_options_of_the_wrong_type_or_range_are_clear_errors_naming_the_option(method, options, message):
    """method_options come from a job's JSON: a wrong type must be refused by name, not crash inside the method."""
    model = tiny_swin()
    with pytest.raises(BadInputError, match=message):
        inject(model, method, **options)
    assert getattr(model, RECORD_ATTRIBUTE, None) is None


class _EncoderDecoder(nn.Module):
    """Two conv + norm stages and a head: norm parameters sit in the middle of their names ("stem.norm.weight")."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv3d(1, 4, 3, padding=1))
        self.stem.add_module("norm", nn.GroupNorm(2, 4))
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv3d(4, 4, 3, padding=1))
        self.block.add_module("norm", nn.InstanceNorm3d(4))  # affine=False: nothing to train
        self.block.add_module("bn", nn.BatchNorm3d(4, affine=False))
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_train_also_regexes_are_searched_anywhere_in_the_parameter_name():
    """train_also is a regex over parameter names, found anywhere in them (as target_modules): "norm\\.weight$"
    unfreezes stem.norm.weight, whose name does not start with "norm"."""
    torch.manual_seed(0)
    model = inject(_EncoderDecoder(), "bitfit", target_modules=r"^head$", train_also=r"norm\.weight$")
    trainable = sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    assert trainable == ["head.bias", "stem.norm.weight"]


def test_affine_norm_records_only_the_norms_it_trains(tmp_path):
    """An InstanceNorm3d or BatchNorm3d without affine parameters has nothing to train: the adapter's record (saved
    in adapter_config.json, read again to re-adapt a fresh model) lists only the GroupNorm."""
    import json

    from medgen.peft.inject import adapter_record

    torch.manual_seed(0)
    model = inject(_EncoderDecoder(), "affine-norm")
    assert adapter_record(model).adapted_modules == ["stem.norm"]
    assert sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad) == [
        "stem.norm.bias", "stem.norm.weight"]
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["adapted_modules"] == ["stem.norm"]


def test_describe_lists_adapted_layers():
    _, adapted, _ = build("unet", "tenvoo-l")
    report = describe(adapted)
    assert report["method"] == "tenvoo-l" and report["trainable_parameters"] == trainable_parameters(adapted)
    adapters = [layer for layer in report["layers"] if layer["role"] == "adapter"]
    assert {layer["type"] for layer in adapters} == {"TenVOOConv3d", "TenVOOLinear"}
    assert sum(layer["trainable_parameters"] for layer in report["layers"]) == report["trainable_parameters"]


def test_head_rows_zero_shot_initialisation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 1), nn.Conv3d(4, 3, 1))
    volume = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = model(volume)[:, [2, 0]]
    probe = inject(copy.deepcopy(model), "linear-probe", head="1", head_rows=[2, 0])
    with torch.no_grad():
        assert torch.equal(probe(volume), reference)
    assert trainable_parameters(probe) == 2 * 4 + 2


class _NestedSameName(nn.Module):
    """A top-level ``conv`` and a deeper ``block.conv``: names that differ only by a prefix."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv3d(4, 4, 3, padding=1))


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_hf_tuners_wrap_exactly_the_selected_modules(method):
    adapted = inject(_NestedSameName(), method, target_modules=r"^conv$")
    trainable = {name.split(".")[0] for name, parameter in adapted.named_parameters() if parameter.requires_grad}
    assert trainable == {"conv"}
    assert type(adapted.block.conv) is nn.Conv3d
    assert [layer["name"] for layer in describe(adapted)["layers"]] == ["conv"]


class _GroupedLast(nn.Module):
    """A plain conv TenVOO can wrap, then a grouped conv it refuses: inject fails after the first layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(8, 8, 3, padding=1)
        self.b = nn.Conv3d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("method, options, message", [
    ("tenvoo-l", {"rank": 2}, "groups=8"),
    ("lora", {"head": "missing"}, "missing"),
    ("tenvoo-l", {"rank": 2, "head": "a", "head_out_channels": 8}, "groups=8"),
])
def test_failed_inject_leaves_model_unchanged(method, options, message):
    model = _GroupedLast()
    model.a.bias.requires_grad_(False)
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    volume = torch.randn(1, 8, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(volume)
    modules_before = list(model.named_modules())
    flags_before = [(name, parameter.requires_grad) for name, parameter in model.named_parameters()]
    with pytest.raises(BadInputError, match=message):
        inject(model, method, **options)
    assert list(model.named_modules()) == modules_before
    assert [(name, parameter.requires_grad) for name, parameter in model.named_parameters()] == flags_before
    with torch.no_grad():
        assert torch.equal(model(volume), before)
    handle.remove()
    model(volume)
    assert len(calls) == 2
    inject(model, "tenvoo-l", target_modules=r"^a$", rank=2)  # no leftover record refuses a second attempt


def test_a_replaced_head_keeps_the_pretrained_heads_convolution_geometry():
    pretrained = nn.Conv3d(4, 2, 3, padding=2, dilation=2, padding_mode="reflect")
    model = nn.Sequential(nn.Conv3d(1, 4, 1), pretrained)
    inputs = torch.rand(1, 1, 8, 8, 8)
    inject(model, "linear-probe", head="1", head_out_channels=5)
    fresh = model[1]
    assert (fresh.dilation, fresh.padding, fresh.padding_mode) == ((2, 2, 2), (2, 2, 2), "reflect")
    assert model(inputs).shape == (1, 5, 8, 8, 8)


@pytest.mark.parametrize("method, options", [("spatial-adapter", {"head": "out.conv.conv"}), ("adaptformer", {})])
def test_added_branches_take_the_models_dtype(method, options):
    model = inject(tiny_swin().double(), method, **options)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float64}


def test_lora_dropout_acts_in_eval_mode_training_steps_and_never_at_inference():
    # partly frozen models train in eval() mode (FSEFT): the branch dropout must still act there
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1)), "lora", rank=2, dropout=0.5).eval()
    perturb_trainable(model)  # lora_B starts at zero: the branch (and its dropout) would not show
    inputs = torch.rand(1, 2, 6, 6, 6)
    with torch.no_grad():
        inference = [model(inputs) for _ in range(2)]
    training = [model(inputs) for _ in range(2)]
    assert torch.equal(*inference) and not torch.equal(*training)
    assert not torch.equal(training[0], inference[0])
