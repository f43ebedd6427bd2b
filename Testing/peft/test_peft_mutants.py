"""Behaviour pinned after a mutation audit of medgen.peft (each test fails on one surviving mutant)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgen.errors import BadInputError
from medgen.peft import inject
from medgen.peft.inject import adapter_record
from medgen.peft.tenvoo_conv import TenVOOConv3d
from medgen.peft.tenvoo_factors import factorize

from peft_helpers import tiny_unet


def _io_convs(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Conv3d) and 1 in (module.in_channels, module.out_channels)]


def test_tenvoo_leaves_the_input_and_output_convs_alone_by_default():
    """Spec tenvoo.md §5: exclude_first_last_conv skips a matched Conv3d with in_channels == 1 OR out_channels == 1."""
    model = tiny_unet()
    io_convs = _io_convs(model)
    shapes = {name: (model.get_submodule(name).in_channels, model.get_submodule(name).out_channels) for name in io_convs}
    assert sorted(shapes.values()) == [(1, 32), (32, 1)]  # the UNet's first conv and its output conv
    inject(model, "tenvoo-l")
    wrapped = set(adapter_record(model).adapted_modules)
    for name in io_convs:
        assert type(model.get_submodule(name)) is nn.Conv3d, name
        assert name not in wrapped, name
    assert any(isinstance(module, TenVOOConv3d) for module in model.modules())

    unfiltered = inject(tiny_unet(), "tenvoo-l", exclude_first_last_conv=False)
    for name in io_convs:
        assert isinstance(unfiltered.get_submodule(name), TenVOOConv3d), name


def test_a_factor_table_entry_must_multiply_to_its_channel_count():
    with pytest.raises(BadInputError, match="product is 12"):
        factorize(12, {12: [2, 2, 2]})
    model = nn.Sequential(nn.Conv3d(8, 12, 3, padding=1))
    before = [type(module) for module in model.modules()]
    with pytest.raises(BadInputError, match="product is 12"):
        inject(model, "tenvoo-l", factor_table={12: [2, 2, 2]})
    assert [type(module) for module in model.modules()] == before
    assert getattr(model, "_medgen_peft", None) is None


def test_a_failed_change_removes_attributes_the_body_added():
    """restored_on_error puts each module's attributes back: one set inside the failed body is gone afterwards."""
    from medgen.peft.rollback import restored_on_error

    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match="half-way"):
        with restored_on_error(model):
            model[0].peft_config = {"default": object()}  # e.g. what a tuner library leaves on a module
            model.extra_flag = True
            raise RuntimeError("half-way")
    assert not hasattr(model[0], "peft_config")
    assert not hasattr(model, "extra_flag")


def test_affine_norm_trains_affine_instance_norms():
    """nnU-Net-style networks use InstanceNorm3d(affine=True): affine-norm must train its weight and bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU(),
                          nn.Conv3d(4, 4, 3, padding=1), nn.GroupNorm(2, 4))
    inject(model, "affine-norm")
    assert sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad) == [
        "1.bias", "1.weight", "4.bias", "4.weight"]
    assert adapter_record(model).adapted_modules == ["1", "4"]


@pytest.mark.parametrize(("options", "scale"), [({"rank": 2}, 1.0), ({"rank": 2, "alpha": 4.0}, 2.0)])
def test_lora_update_is_scaled_by_alpha_over_rank_and_alpha_defaults_to_rank(options, scale):
    """LoRAConfig: the update B·A is scaled by alpha / rank; alpha left out = rank, i.e. scale 1 (as FSEFT)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5))
    reference = nn.Linear(6, 5)
    reference.load_state_dict(base[0].state_dict())
    model = inject(base, "lora", **options)
    layer = model.get_submodule("0")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        a = torch.randn(layer.lora_A["default"].weight.shape, generator=generator)
        b = torch.randn(layer.lora_B["default"].weight.shape, generator=generator)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        x = torch.randn(4, 6, generator=generator)
        expected = reference(x) + scale * (x @ a.T @ b.T)
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_adaptformer_branch_is_scaled():
    """Spec fseft.md §4.1: x' = x + MLP(LN2(x)) + scale · Up(ReLU(Down(x))), x the residual stream after attention."""
    from monai.networks.nets.swin_unetr import SwinTransformerBlock

    from medgen.peft.adaptformer import AdaptFormerBlock

    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=8, num_heads=2, window_size=(2, 2, 2), shift_size=(0, 0, 0)).eval()
    x = torch.randn(1, 2, 2, 2, 8)
    outputs = {}
    with torch.no_grad():
        for scale in (0.0, 0.1, 0.5):
            wrapped = AdaptFormerBlock(block, bottleneck=3, scale=scale)
            torch.manual_seed(5)  # the same branch weights for every scale
            wrapped.down.reset_parameters()
            wrapped.up.reset_parameters()
            outputs[scale] = wrapped(x, None)
            branch = wrapped.up(torch.relu(wrapped.down(x + wrapped.block.drop_path(block.forward_part1(x, None)))))
        assert torch.allclose(outputs[0.0], block(x, None), atol=1e-6)  # scale 0: the frozen block itself
        assert branch.abs().max() > 1e-3
        for scale in (0.1, 0.5):
            assert torch.allclose(outputs[scale] - outputs[0.0], scale * branch, atol=1e-5), scale


def test_loading_into_a_model_of_another_dtype_names_the_data_types(tmp_path):
    """The same base weights cast to float64: the adapter's float32 tensors are refused for their data type (not
    blamed on other base weights, which would send the user looking for another checkpoint)."""
    import copy

    from medgen.errors import ModelError
    from medgen.peft import load_adapter, save_adapter

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1))
    save_adapter(inject(copy.deepcopy(base), "tenvoo-l"), tmp_path)
    with pytest.raises(ModelError, match="data types"):
        load_adapter(copy.deepcopy(base).double(), tmp_path)


def test_full_finetuning_adapter_keeps_batchnorm_statistics(tmp_path):
    """Full fine-tuning trains in train() mode, which moves BatchNorm running statistics: the adapter must carry them,
    or the reloaded model normalises with the base's statistics and gives other outputs."""
    import copy

    from medgen.peft import load_adapter, save_adapter

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    model = inject(copy.deepcopy(base), "full").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(3.0 + 2.0 * torch.randn(2, 1, 6, 6, 6)).pow(2).mean().backward()
        optimizer.step()
    model.eval()
    assert not torch.equal(model[1].running_mean, base[1].running_mean)
    save_adapter(model, tmp_path)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    x = torch.randn(1, 1, 6, 6, 6)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert torch.equal(reloaded[1].running_var, model[1].running_var)
