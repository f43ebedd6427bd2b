"""TenVOO oracles O1–O18 of spec tenvoo.md §9, one test each."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from peft_helpers import PAPER_UNET_ARGS, tiny_unet, unet_inputs
from torch import nn

from medgen.errors import BadInputError
from medgen.peft import TenVOOConv3d, TenVOOLinear, inject, load_adapter, merge, save_adapter, trainable_parameters
from medgen.peft.tenvoo_layer import TenVOOLayer

# the spec's own lettering; the Q string gives core '3''s size-1 leg its own summed label F, which is exactly the
# broadcast semantics of the released code (spec §3.3)
SPEC_L = "QPab,Rbcd,Ddef,Hfgh,Whij,Zjkl,YlmX,cane,iomk,gno->PQRDHWXYZ"
SPEC_Q = "QPab,Rbcd,Ddef,HFgh,Wgij,Zjkl,YlmX,kmno,acpn,eiop->PQRDHWXYZ"
SPEC_LINEAR = "uvQR,wZPv,XYwu->XYZPQR"


def adapter_size(layer: TenVOOLayer) -> int:
    return sum(core.numel() for core in layer.cores.values())


def sine_fill(layer: TenVOOLayer) -> None:
    """Core number j (key order) = sin(0.1 · flat index + j), float64 (spec O6/O7)."""
    with torch.no_grad():
        for j, (key, core) in enumerate(layer.cores.items()):
            values = torch.sin(0.1 * torch.arange(core.numel(), dtype=torch.float64) + j).reshape(core.shape)
            layer.cores[key] = nn.Parameter(values)


def reference_conv_delta(layer: TenVOOConv3d) -> np.ndarray:
    """Independent numpy contraction of spec §3.1–3.3, indexed (co, ci, kd, kh, kw)."""
    cores = [layer.cores[str(key)].detach().numpy() for key in range(10)]
    subscripts = SPEC_L if layer.mode == "l" else SPEC_Q
    tensor = np.einsum(subscripts, *cores, optimize="greedy")
    c_out, c_in, k_d, k_h, k_w = layer.base.weight.shape
    return tensor.reshape(c_in, k_d, k_h, k_w, c_out).transpose(4, 0, 1, 2, 3)


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(value - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize(
    ("c_in", "c_out", "rank", "expected_l", "expected_q"),
    [
        (128, 128, 4, 3456, 3504),
        (128, 128, 8, 23552, 25792),
        (128, 128, 16, 221184, 271104),
        (512, 512, 4, 5760, 5808),
        (64, 128, 8, 21504, 23744),
        (1024, 512, 4, 7808, 7856),
    ],
)
def test_o1_conv_param_counts(c_in, c_out, rank, expected_l, expected_q):
    base = nn.Conv3d(c_in, c_out, 3, device="meta")
    assert adapter_size(TenVOOConv3d(base, rank, "l")) == expected_l
    assert adapter_size(TenVOOConv3d(base, rank, "q")) == expected_q


@pytest.mark.parametrize(
    ("features_in", "features_out", "rank", "expected"),
    [(128, 128, 4, 4608), (256, 256, 4, 6144), (512, 512, 4, 21504), (512, 512, 16, 21504),
     (128, 32, 4, 768), (128, 512, 4, 2816), (128, 512, 8, 11264)],
)
def test_o2_linear_param_counts(features_in, features_out, rank, expected):
    assert adapter_size(TenVOOLinear(nn.Linear(features_in, features_out, device="meta"), rank)) == expected


@pytest.mark.parametrize(
    ("method", "rank", "expected"),
    [("tenvoo-l", 4, 601_024), ("tenvoo-q", 4, 603_904), ("tenvoo-l", 12, 5_773_248), ("tenvoo-l", 8, 1_915_072)],
)
def test_o3_paper_unet_trainable_counts(method, rank, expected):
    pytest.importorskip("einops")  # MONAI's attention blocks need it
    from monai.networks.nets import DiffusionModelUNet

    with torch.device("meta"):
        unet = DiffusionModelUNet(**PAPER_UNET_ARGS)
        assert sum(parameter.numel() for parameter in unet.parameters()) == 166_669_313
        inject(unet, method, preset="tenvoo-paper", rank=rank)
    layers = [module for module in unet.modules() if isinstance(module, TenVOOLayer)]
    assert len(layers) == 111
    assert sum(isinstance(layer, TenVOOConv3d) for layer in layers) == 60
    assert trainable_parameters(unet) == expected
    if (method, rank) == ("tenvoo-l", 4):
        assert sum(adapter_size(layer) for layer in layers) == 539_392


def test_o4_core_shapes():
    base = nn.Conv3d(64, 128, 3, device="meta")
    shapes_l = {key: tuple(core.shape) for key, core in TenVOOConv3d(base, 4, "l").cores.items()}
    assert list(shapes_l) == [str(key) for key in range(10)]
    assert shapes_l == {
        "0": (4, 8, 4, 4), "1": (2, 4, 4, 4), "2": (3, 4, 4, 4), "3": (3, 4, 4, 4), "4": (3, 4, 4, 4),
        "5": (2, 4, 4, 4), "6": (8, 4, 4, 8), "7": (4, 4, 4, 4), "8": (4, 4, 4, 4), "9": (4, 4, 4),
    }
    shapes_q = {key: tuple(core.shape) for key, core in TenVOOConv3d(base, 4, "q").cores.items()}
    assert shapes_q["3"] == (3, 1, 4, 4) and shapes_q["9"] == (4, 4, 4, 4)


@pytest.mark.parametrize(("mode", "expected"), [("l", 2.0**15), ("q", 2.0**16)])
def test_o5_all_ones_structure(mode, expected):
    layer = TenVOOConv3d(nn.Conv3d(8, 8, 3), rank=2, mode=mode)
    with torch.no_grad():
        for core in layer.cores.values():
            core.fill_(1.0)
    delta = layer.delta_weight()
    assert delta.shape == layer.base.weight.shape
    assert torch.all(delta == expected)


@pytest.mark.parametrize("mode", ["l", "q"])
def test_o6_deterministic_fill_conv(mode):
    layer = TenVOOConv3d(nn.Conv3d(64, 128, 3), rank=4, mode=mode)
    sine_fill(layer)
    delta = layer.delta_weight().detach().numpy()
    assert relative_error(delta, reference_conv_delta(layer)) < 1e-9


@pytest.mark.parametrize(("features_in", "features_out"), [(128, 128), (128, 32), (256, 512)])
def test_o7_deterministic_fill_linear(features_in, features_out):
    layer = TenVOOLinear(nn.Linear(features_in, features_out), rank=4)
    sine_fill(layer)
    cores = [layer.cores[key].detach().numpy() for key in ("-1 -2", "-1 -3", "-2 -3")]
    reference = np.einsum(SPEC_LINEAR, *cores, optimize="greedy").reshape(features_out, features_in)
    assert relative_error(layer.delta_weight().detach().numpy(), reference) < 1e-9


def test_o8_init_bounds():
    rank, g0 = 8, 16  # 512 -> 512 factors (16, 8, 4)
    for mode in ("l", "q"):
        layer = TenVOOConv3d(nn.Conv3d(512, 512, 3), rank=rank, mode=mode)
        for key, core in layer.cores.items():
            if key == "6":
                bound = math.sqrt(6 / (rank * g0))
            elif key == "9" and mode == "l":
                bound = math.sqrt(3 / rank)
            else:
                bound = math.sqrt(6) / rank
            assert core.abs().max().item() <= bound
            if core.numel() >= 2000:
                assert abs(core.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    linear = TenVOOLinear(nn.Linear(512, 512))
    for core in linear.cores.values():
        bound = math.sqrt(3 / (core.shape[-2] * core.shape[-1]))
        assert core.abs().max().item() <= bound
        assert abs(core.std().item() / (bound / math.sqrt(3)) - 1) < 0.05


@pytest.mark.parametrize(
    ("channels", "rank", "mode", "predicted"),
    [
        ((64, 128), 4, "l", 512 / (4**3 * 8)),
        ((64, 128), 4, "q", 1024 / (4**3 * 8)),
        ((32, 32), 2, "l", 512 / (2**3 * 4)),  # g0 = 4 and r = 2 differ: a g0/g1 mix-up in the formula would show
        ((32, 32), 2, "q", 1024 / (2**3 * 4)),  # spec: L 15.62±0.85 (16), Q 34.3±2.2 (32)
    ],
)
def test_o9_initial_delta_magnitude(channels, rank, mode, predicted):
    base = nn.Conv3d(*channels, 3)
    means = []
    for seed in range(400):
        torch.manual_seed(seed)
        layer = TenVOOConv3d(base, rank=rank, mode=mode)
        with torch.no_grad():
            means.append(layer.delta_weight().pow(2).mean().item())
    means = np.asarray(means)
    standard_error = means.std(ddof=1) / math.sqrt(len(means))
    assert abs(means.mean() - predicted) < 3 * standard_error


def test_o10_identity_last_layer_zero():
    conv = nn.Conv3d(128, 128, 3, padding=1)
    layer = TenVOOConv3d(conv, rank=4, mode="l", init="last_layer_zero")
    x = torch.randn(1, 128, 6, 6, 6)
    assert torch.equal(layer(x), conv(x))
    unet = tiny_unet()
    volume, timesteps = unet_inputs()
    reference = unet(volume, timesteps)
    inject(unet, "tenvoo-q", preset="tenvoo-paper", init="last_layer_zero")
    assert torch.equal(unet(volume, timesteps), reference)


def test_o11_identity_default_init():
    conv = nn.Conv3d(128, 128, 3, padding=1)
    x = torch.randn(1, 128, 6, 6, 6)
    layer = TenVOOConv3d(conv, rank=4, mode="l")
    assert (layer(x) - conv(x)).abs().max().item() <= 1e-4
    unet = tiny_unet()
    volume, timesteps = unet_inputs()
    reference = unet(volume, timesteps)
    assert reference.abs().max() > 0.1  # the re-randomised UNet is not the trivial all-zero network
    inject(unet, "tenvoo-l", preset="tenvoo-paper")
    assert (unet(volume, timesteps) - reference).abs().max().item() <= 1e-6


def perturb_cores(model: nn.Module, scale: float = 1e-2, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TenVOOLayer):
                for core in module.cores.values():
                    core.add_(scale * torch.randn(core.shape, generator=generator))


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q"])
def test_o12_merge_equivalence(method):
    unet = inject(tiny_unet(), method, preset="tenvoo-paper")
    perturb_cores(unet)
    volume, timesteps = unet_inputs()
    with torch.no_grad():
        adapted = unet(volume, timesteps)
        merged_unet = merge(copy.deepcopy(unet))
        merged = merged_unet(volume, timesteps)
    assert not any(isinstance(module, TenVOOLayer) for module in merged_unet.modules())
    assert set(merged_unet.state_dict()) == set(tiny_unet().state_dict())
    assert (merged - adapted).abs().max().item() <= 1e-5


def test_o13_train_eval_round_trip():
    unet = inject(tiny_unet(), "tenvoo-l", preset="tenvoo-paper")
    perturb_cores(unet)
    volume, timesteps = unet_inputs()
    with torch.no_grad():
        before = unet.train()(volume, timesteps)
        unet.eval()(volume, timesteps)
        after = unet.train()(volume, timesteps)
    assert (after - before).abs().max().item() <= 1e-6


@pytest.mark.parametrize("init", ["sum_opposite_freeze_one", "last_layer_zero"])
def test_o14_gradient_flow(init):
    unet = inject(tiny_unet(), "tenvoo-l", preset="tenvoo-paper", init=init)
    volume, timesteps = unet_inputs()
    unet(volume, timesteps).pow(2).mean().backward()
    layers = [module for module in unet.modules() if isinstance(module, TenVOOLayer)]
    assert any(isinstance(layer, TenVOOLinear) for layer in layers)
    for layer in layers:
        assert layer.base.weight.grad is None
        for key, core in layer.cores.items():
            if init == "sum_opposite_freeze_one" or key in ("9", "-2 -3"):
                assert core.grad is not None and core.grad.abs().max() > 0, key
            else:
                assert core.grad is None or not core.grad.any(), key


@pytest.mark.parametrize("make", [lambda: TenVOOConv3d(nn.Conv3d(8, 8, 3), 2, "l"),
                                  lambda: TenVOOLinear(nn.Linear(16, 16), 2)])
def test_a_layer_built_directly_freezes_its_base_weight(make):
    """The public layer classes used without inject (which freezes the whole model first) must still freeze the
    base weight: an optimiser over layer.parameters() would otherwise train W itself, not only the update."""
    torch.manual_seed(0)
    layer = make()
    assert not layer.base.weight.requires_grad
    inputs = torch.randn(1, 8, 5, 5, 5) if isinstance(layer, TenVOOConv3d) else torch.randn(2, 16)
    layer(inputs).pow(2).mean().backward()
    assert layer.base.weight.grad is None
    assert all(core.grad is not None for core in layer.cores.values())


def test_o15_save_load(tmp_path):
    unet = inject(tiny_unet(), "tenvoo-l", preset="tenvoo-paper")
    perturb_cores(unet)
    with torch.no_grad():  # trained biases and norms must survive the round trip too (clean choice, quirk Q3)
        for parameter in unet.parameters():
            if parameter.requires_grad and parameter.dim() == 1:
                parameter.add_(0.1)
    save_adapter(unet, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, module in unet.named_modules():
        if isinstance(module, TenVOOLayer):
            keys = [str(key) for key in range(10)] if isinstance(module, TenVOOConv3d) else ["-1 -2", "-1 -3", "-2 -3"]
            for key in keys:
                assert f"{name}.cores.{key}" in saved and f"{name}.cores_init.{key}" in saved
            assert f"{name}.base.bias" in saved
    assert any(".norm1.weight" in name for name in saved)
    reloaded = load_adapter(tiny_unet(), tmp_path)
    volume, timesteps = unet_inputs()
    with torch.no_grad():
        assert (reloaded(volume, timesteps) - unet(volume, timesteps)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("mode", ["l", "q"])
def test_o16_contraction_order_independent(mode):
    layer = TenVOOConv3d(nn.Conv3d(16, 32, 3), rank=2, mode=mode)
    sine_fill(layer)
    cores = [layer.cores[str(key)] for key in range(10)]
    # torch contracts left to right: a different order from the production pairwise path and from numpy's
    subscripts = (SPEC_L if mode == "l" else SPEC_Q).replace("F", "f")  # torch broadcasts the size-1 leg itself
    tensor = torch.einsum(subscripts, *cores)
    reference = tensor.reshape(16, 3, 3, 3, 32).permute(4, 0, 1, 2, 3).detach().numpy()
    assert relative_error(layer.delta_weight().detach().numpy(), reference) < 1e-12


def test_o17_error_cases():
    with pytest.raises(BadInputError, match="320"):
        TenVOOConv3d(nn.Conv3d(320, 64, 3))
    odd_rank = TenVOOConv3d(nn.Conv3d(32, 32, 3), rank=3, mode="l")  # clean: works, core '9' bound sqrt(3/r)
    assert odd_rank.cores["9"].abs().max().item() <= math.sqrt(3 / 3)
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv3d(32, 32, 3))
    with pytest.raises(BadInputError, match="Conv2d"):
        inject(model, "tenvoo-l", target_modules=r"^0$")


def test_o18_precision_after_small_step():
    layer = TenVOOConv3d(nn.Conv3d(128, 128, 3), rank=4, mode="l")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for core in layer.cores.values():
            core.add_(1e-4 * torch.sign(torch.randn(core.shape, generator=generator)))
    reference_now = reference_conv_delta(layer)
    initial = TenVOOConv3d(nn.Conv3d(128, 128, 3, device="meta"), rank=4, mode="l")
    frozen_cores = layer.cores_init.as_dict()
    initial.cores = nn.ParameterDict({key: nn.Parameter(core.clone()) for key, core in frozen_cores.items()})
    reference = reference_now - reference_conv_delta(initial)
    for autocast in (False, True):  # the update must not depend on autocast (CPU bf16 here)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
            update = (layer.adapted_weight() - layer.base.weight).double().numpy()
        rms_error = float(np.sqrt(np.mean((update - reference) ** 2)))
        assert rms_error <= 1e-6


def uncached_update(layer: TenVOOLayer) -> torch.Tensor:
    """ΔW(θ) − ΔW(θ0) the direct way, both contracted from scratch in float64."""
    with torch.no_grad():
        left, right = layer._factors_fp64(dict(layer.cores.items()))
        left0, right0 = layer._factors_fp64(layer.cores_init.as_dict())
        return layer._weight_view(left @ right - left0 @ right0)


@pytest.mark.parametrize("make", [lambda: TenVOOConv3d(nn.Conv3d(32, 64, 3), 4, "l"),
                                  lambda: TenVOOConv3d(nn.Conv3d(32, 64, 3), 4, "q"),
                                  lambda: TenVOOLinear(nn.Linear(128, 32), 4)])
def test_initial_factor_cache(make):
    """θ0's factors are cached, match the uncached update and are recomputed when the buffers change."""
    layer = make()
    perturb_cores(layer)
    with torch.no_grad():
        first = layer.weight_update()
        cached = layer._initial_cache[1]
        assert torch.equal(layer.weight_update(), first) and layer._initial_cache[1] is cached
    assert (first.double() - uncached_update(layer)).abs().max().item() <= 1e-6 * first.abs().max().item()
    # an adapter file / checkpoint restores other θ0 values in place: the cache must follow
    other = make()
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert not layer.weight_update().any()  # θ == θ0 again: exactly zero update
        perturb_cores(layer)
        assert (layer.weight_update().double() - uncached_update(layer)).abs().max().item() <= 1e-6
    layer.to(torch.float64)
    assert layer._initial_cache is None
    with torch.no_grad():
        update = layer.weight_update()
    assert update.dtype == torch.float64  # float64 W0 keeps a float64 update
    assert (update - uncached_update(layer)).abs().max().item() <= 1e-12
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        next(iter(twin.cores_init.as_dict().values())).add_(1.0)
        assert not torch.equal(twin.weight_update(), layer.weight_update())
        assert (twin.weight_update() - uncached_update(twin)).abs().max().item() <= 1e-12


def test_reduced_precision_matmul_falls_back_to_float64():
    """With bf16/TF32 float32 matmuls enabled by the user, the update product runs in float64 (spec Q13)."""
    from medgen.peft.tenvoo_layer import fp32_matmul_is_ieee

    layer = TenVOOConv3d(nn.Conv3d(32, 32, 3), 4, "l")
    assert fp32_matmul_is_ieee(torch.device("cpu"))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert not fp32_matmul_is_ieee(torch.device("cpu"))
        with torch.no_grad():
            assert layer.weight_update().dtype == torch.float64
    finally:
        torch.set_float32_matmul_precision(previous)
    assert fp32_matmul_is_ieee(torch.device("cpu"))


def test_inference_weight_cache():
    """Without autograd the adapted weight is reused until cores, θ0 or W0 change, and never enters a graph."""
    layer = TenVOOConv3d(nn.Conv3d(32, 64, 3), 4, "l")
    perturb_cores(layer)
    optimizer = torch.optim.SGD(layer.cores.parameters(), lr=0.1)
    with torch.no_grad():
        cached = layer.adapted_weight()
        assert layer.adapted_weight() is cached
        assert torch.equal(cached, layer._compute_adapted_weight())
    trained = layer.adapted_weight()  # autograd on: a fresh differentiable weight, the cache is released
    assert trained is not cached and trained.grad_fn is not None and layer._weight_cache is None
    trained.sum().backward()
    optimizer.step()  # bumps the cores' version counters
    with torch.no_grad():
        stepped = layer.adapted_weight()
        assert not torch.equal(stepped, cached)
        assert torch.equal(stepped, layer._compute_adapted_weight())
        assert layer.adapted_weight() is stepped
    layer.load_state_dict(TenVOOConv3d(nn.Conv3d(32, 64, 3), 4, "l").state_dict())
    with torch.no_grad():
        assert torch.equal(layer.adapted_weight(), layer.base.weight)  # θ == θ0: no update left
    layer.to(torch.float64)
    with torch.inference_mode():
        moved = layer.adapted_weight()
        assert moved.dtype == torch.float64 and layer.adapted_weight() is moved
    with torch.no_grad():
        written = layer.adapted_weight()
        written.add_(1.0)  # a caller writing into the returned weight must not poison the next call
        assert torch.equal(layer.adapted_weight(), layer._compute_adapted_weight())


# ways of replacing weights that bypass version counters but change the storage; the inference cache follows them
REPLACING_WRITES = {
    "core .data = new": lambda layer: setattr(layer.cores["3"], "data", torch.randn_like(layer.cores["3"])),
    "vector_to_parameters": lambda layer: torch.nn.utils.vector_to_parameters(
        torch.randn_like(torch.nn.utils.parameters_to_vector(layer.cores.parameters())), layer.cores.parameters()
    ),
    "W0 .data = new": lambda layer: setattr(layer.base.weight, "data", layer.base.weight.data * 2),
}
# in-place writes through .data change neither version nor storage: documented as needing clear_caches()
IN_PLACE_DATA_WRITES = {
    "core .data.copy_": lambda layer: layer.cores["0"].data.copy_(torch.randn_like(layer.cores["0"])),
    "θ0 .data.add_": lambda layer: layer.cores_init.as_dict()["5"].data.add_(0.1),
    "W0 .data.mul_": lambda layer: layer.base.weight.data.mul_(2),
}


def _expected_weight(layer):
    return layer.base.weight + uncached_update(layer).float()


@pytest.mark.parametrize("write", list(REPLACING_WRITES))
def test_inference_weight_cache_follows_replaced_storage(write):
    layer = TenVOOConv3d(nn.Conv3d(32, 64, 3), 4, "l")
    perturb_cores(layer)
    with torch.no_grad():
        cached = layer.adapted_weight().clone()
        REPLACING_WRITES[write](layer)
        expected = _expected_weight(layer)
        assert (layer.adapted_weight() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
        assert not torch.equal(layer.adapted_weight(), cached)


@pytest.mark.parametrize("write", list(IN_PLACE_DATA_WRITES))
def test_clear_caches_after_an_in_place_data_write(write):
    layer = TenVOOConv3d(nn.Conv3d(32, 64, 3), 4, "l")
    perturb_cores(layer)
    with torch.no_grad():
        layer.adapted_weight()
        IN_PLACE_DATA_WRITES[write](layer)
        layer.clear_caches()
        expected = _expected_weight(layer)
        assert (layer.adapted_weight() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_grouped_updates_match_per_layer():
    """prepare_updates contracts layers of equal core shapes together; values and gradients equal the per-layer path."""
    from medgen.peft.tenvoo_layer import prepare_updates

    torch.manual_seed(0)
    layers = [TenVOOConv3d(nn.Conv3d(32, 64, 3), 4, mode) for mode in ("l", "l", "q", "q")]
    layers += [TenVOOLinear(nn.Linear(128, 32), 4) for _ in range(2)] + [TenVOOConv3d(nn.Conv3d(64, 32, 3), 4, "l")]
    for seed, layer in enumerate(layers):
        perturb_cores(layer, seed=seed)
    cores = [core for layer in layers for core in layer.cores.values()]
    alone = [layer.weight_update() for layer in layers]
    alone_grads = torch.autograd.grad(sum(update.square().sum() for update in alone), cores)
    prepare_updates(layers)
    assert all(layer._prepared is not None for layer in layers)
    grouped = [layer.weight_update() for layer in layers]
    assert all(layer._prepared is None for layer in layers)  # used once
    grouped_grads = torch.autograd.grad(sum(update.square().sum() for update in grouped), cores)
    for one, other in zip(alone + list(alone_grads), grouped + list(grouped_grads)):
        assert torch.allclose(one, other, rtol=1e-6, atol=1e-9)
    prepare_updates(layers[:1])
    with torch.no_grad():
        layers[0].cores["9"].add_(1.0)  # an optimizer step between preparing and using: the operands are stale
    assert torch.allclose(layers[0].weight_update(), uncached_update(layers[0]).float(), atol=1e-5)


def test_model_hooks_prepare_and_release():
    """inject() groups the updates once per training forward and leaves no graph piece on the layers after it."""
    unet = inject(tiny_unet(), "tenvoo-l", preset="tenvoo-paper")
    perturb_cores(unet)
    volume, timesteps = unet_inputs()
    with torch.no_grad():
        reference = unet(volume, timesteps)
    output = unet(volume, timesteps)
    layers = [module for module in unet.modules() if isinstance(module, TenVOOLayer)]
    assert all(layer._prepared is None for layer in layers)
    assert (output - reference).abs().max().item() <= 1e-6
    output.pow(2).mean().backward()
    assert all(core.grad is not None for layer in layers for core in layer.cores.values())
    twin = copy.deepcopy(unet)  # the hooks are plain functions: the copy prepares its own layers
    twin_output = twin(volume, timesteps)
    assert torch.equal(twin_output, output)
