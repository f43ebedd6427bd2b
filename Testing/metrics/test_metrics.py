"""medgen.metrics on hand-checkable cases."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.metrics import dice_per_class, dice_with_convention, hd95_per_class, psnr, ssim_3d


def test_dice_per_class_matches_hand_count():
    reference = torch.zeros(10, 10, 10, dtype=torch.int64)
    reference[:5] = 1
    prediction = torch.zeros_like(reference)
    prediction[:4] = 1  # 400 of reference's 500 voxels
    dice = dice_per_class(prediction, reference, num_classes=3)
    assert dice[1] == pytest.approx(2 * 400 / (400 + 500))
    assert dice[0] == pytest.approx(2 * 500 / (600 + 500))
    assert dice[2] == 1.0  # absent from both


def test_hd95_is_the_shift_in_mm():
    reference = torch.zeros(20, 20, 20, dtype=torch.int64)
    reference[5:10, 5:10, 5:10] = 1
    shifted = torch.roll(reference, shifts=2, dims=0)
    assert hd95_per_class(shifted, reference, 2, spacing_mm=(1.5, 1.0, 1.0))[0] == pytest.approx(3.0)
    assert np.isnan(hd95_per_class(torch.zeros_like(reference), reference, 2)[0])


def test_image_metrics():
    volume = torch.rand(16, 16, 16)
    assert ssim_3d(volume, volume) == pytest.approx(1.0, abs=1e-5)
    assert ssim_3d(volume, torch.rand(16, 16, 16)) < 0.5
    assert psnr(volume, volume) == float("inf")
    assert psnr(volume, volume + 0.1) == pytest.approx(20.0, abs=1e-3)


def test_psnr_uses_the_squared_data_range():
    """8-bit data (range 255): an error of 25.5 everywhere (a tenth of the range) is 10 log10(255² / 25.5²) = 20 dB,
    and an error of 51 on half the voxels 10 log10(255² / (51² / 2)) = 10 log10(50) dB, as for the same errors
    scaled to range 1."""
    reference = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0)) * 255
    assert psnr(reference + 25.5, reference, data_range=255.0) == pytest.approx(20.0, abs=1e-4)
    half = reference.clone()
    half[:4] += 51.0
    assert psnr(half, reference, data_range=255.0) == pytest.approx(10 * np.log10(50.0), abs=1e-4)
    assert psnr(half / 255, reference / 255) == pytest.approx(10 * np.log10(50.0), abs=1e-4)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(BadInputError, match="differ in shape"):
        dice_per_class(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5), 2)
    with pytest.raises(BadInputError, match="differ in shape"):  # no broadcasting of a (20, 20, 1) slab
        psnr(torch.rand(20, 20, 20), torch.rand(20, 20, 1))
    with pytest.raises(BadInputError, match=r"one 3D volume \(I, J, K\) or \(1, I, J, K\); got shape \(2, 8, 8, 8\)"):
        ssim_3d(torch.rand(2, 8, 8, 8), torch.rand(2, 8, 8, 8))
    with pytest.raises(BadInputError, match="every side >= 7 voxels"):
        ssim_3d(torch.rand(8, 8, 5), torch.rand(8, 8, 5))


def test_image_metrics_take_the_librarys_channel_first_volumes():
    volume = MetaTensor(torch.rand(1, 12, 12, 12), affine=torch.eye(4))
    assert ssim_3d(volume, volume) == pytest.approx(1.0, abs=1e-5) and psnr(volume, volume.clone()) == float("inf")
    assert psnr(volume, volume + 0.1) == pytest.approx(psnr(volume[0], volume[0] + 0.1))


@pytest.mark.parametrize("labels, message", [
    (torch.full((4, 4, 4), 2), r"class numbers 0..1; found 2..2"),
    (torch.full((4, 4, 4), -1), r"class numbers 0..1; found -1..-1"),
    (torch.full((4, 4, 4), 0.6), "not whole numbers"),
    (torch.full((4, 4, 4), float("nan")), "not whole numbers"),
])
def test_label_values_outside_the_classes_are_clear_errors(labels, message):
    with pytest.raises(BadInputError, match=message):
        dice_per_class(labels, torch.zeros(4, 4, 4, dtype=torch.int64), 2)
    with pytest.raises(BadInputError, match=message if "whole" in message else "class numbers"):
        hd95_per_class(torch.zeros(4, 4, 4, dtype=torch.int64), labels, 2)


def test_label_metrics_of_2d_maps_and_nan_under_the_mrgen_convention():
    reference = torch.zeros(6, 6, dtype=torch.int64)
    reference[:3] = 1
    assert dice_per_class(reference, reference, 3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(BadInputError, match="not whole numbers"):
        dice_with_convention(torch.full((4, 4), float("nan")), torch.zeros(4, 4), {"liver": 1})


def test_fid_on_pluggable_encoder_features_separates_distributions():
    from monai.networks.nets import UNet

    from medgen.metrics import frechet_distance, layer_features

    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    layer = next(name for name, module in network.named_modules() if isinstance(module, torch.nn.Conv3d))
    real = [torch.rand(1, 16, 16, 16) for _ in range(6)]
    same = [torch.rand(1, 16, 16, 16) for _ in range(6)]
    shifted = [torch.rand(1, 16, 16, 16) * 0.2 + 0.8 for _ in range(6)]
    real_f, same_f, shifted_f = (layer_features(network, layer, vols) for vols in (real, same, shifted))
    assert real_f.shape == (6, 4)
    assert frechet_distance(real_f, real_f) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real_f, shifted_f) > 10 * frechet_distance(real_f, same_f)
    with pytest.raises(BadInputError, match="no layer"):
        layer_features(network, "nope", real)


def test_mmd_and_ms_ssim():
    from medgen.metrics import maximum_mean_discrepancy, ms_ssim_3d

    a, b = torch.rand(4, 1, 8, 8, 8), torch.rand(4, 1, 8, 8, 8)
    assert maximum_mean_discrepancy(a, b + 1.0) > maximum_mean_discrepancy(a, b) + 100  # unbiased estimate: a shift dominates
    volume = torch.rand(48, 48, 48)
    assert ms_ssim_3d(volume, volume) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(BadInputError, match="MS-SSIM"):
        ms_ssim_3d(torch.rand(16, 16, 16), torch.rand(16, 16, 16))


def _tiny_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def test_the_default_feature_layer_is_the_encoder_bottleneck():
    from medgen.metrics.distribution import bottleneck_layer

    network = _tiny_unet()
    grids = {}

    def record_grid(name):
        def hook(module, inputs, output):
            grids[name] = tuple(output.shape[2:])
        return hook

    hooks = [module.register_forward_hook(record_grid(name))
             for name, module in network.named_modules() if isinstance(module, torch.nn.Conv3d)]
    layer = bottleneck_layer(network, torch.rand(1, 16, 16, 16))
    for hook in hooks:
        hook.remove()
    assert grids[layer] == (4, 4, 4) == min(grids.values())  # 16³ halved twice
    assert dict(network.named_modules())[layer].out_channels == 16
    with pytest.raises(BadInputError, match="runs no Conv3d"):
        bottleneck_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2)), torch.rand(1, 2, 2, 2))


def test_the_fid_report_names_the_feature_network_layer_and_weights():
    from medgen.metrics.distribution import FeatureNetwork, bottleneck_layer, fid_report

    network = _tiny_unet()
    real = [torch.rand(1, 16, 16, 16) for _ in range(5)]
    generated = [torch.rand(1, 16, 16, 16) * 0.2 + 0.8 for _ in range(4)]
    layer = bottleneck_layer(network, real[0])
    features = FeatureNetwork(network, layer, "tiny unet", "model folder /models/tiny, weights SHA-256 abc")
    report = fid_report(real, generated, features)
    assert report["feature_network"] == {"name": "tiny unet", "layer": layer, "feature_dim": 16, "source": "base model",
                                         "weights": "model folder /models/tiny, weights SHA-256 abc"}
    assert (report["real_count"], report["generated_count"]) == (5, 4)
    assert report["fid"] > 10 * fid_report(real, real[::-1], features)["fid"]
    timestep_calls = []
    traced = FeatureNetwork(network, layer, "tiny unet", "w", "user-supplied",
                            forward=lambda net, batch: timestep_calls.append(batch.shape) or net(batch))
    assert fid_report(real, generated, traced)["fid"] == pytest.approx(report["fid"])
    assert timestep_calls == [(1, 1, 16, 16, 16)] * 9


def test_fid_of_one_dimensional_features_follows_the_same_formula():
    from medgen.metrics import frechet_distance

    generator = torch.Generator().manual_seed(0)
    real, generated = torch.randn((20, 2), generator=generator), torch.randn((20, 2), generator=generator) * 2 + 1
    one_d = frechet_distance(real[:, :1], generated[:, :1])
    a, b = real[:, 0].double(), generated[:, 0].double()
    expected = (a.mean() - b.mean()) ** 2 + a.var() + b.var() - 2 * (a.var() * b.var()).sqrt()
    assert one_d == pytest.approx(float(expected), rel=1e-9)
    # the same value as the F = 2 formula on features whose second column carries no difference
    padded = frechet_distance(torch.cat([real[:, :1], torch.zeros(20, 1)], 1), torch.cat([generated[:, :1], torch.zeros(20, 1)], 1))
    assert one_d == pytest.approx(padded, rel=1e-6)


@pytest.mark.parametrize("real_shape, generated_shape, message", [
    ((1, 4), (3, 4), r"N >= 2 per set; the real set is \(1, 4\)"),  # one sample: its covariance is NaN
    ((3, 4), (3, 2, 2), r"the generated set is \(3, 2, 2\)"),
    ((3, 4), (3, 5), "got 4 and 5 features"),
])
def test_fid_refuses_feature_sets_it_cannot_compare(real_shape, generated_shape, message):
    from medgen.metrics import frechet_distance

    with pytest.raises(BadInputError, match=message):
        frechet_distance(torch.ones(real_shape), torch.ones(generated_shape))


def test_fid_with_fewer_volumes_than_features_matches_scipy_and_never_goes_negative():
    """The few-shot case: singular covariances. MONAI's FIDMetric raised on the imaginary part sqrtm returns there
    (6 of 40 such draws); the value must match an independent float64 computation and stay >= 0."""
    import scipy.linalg

    from medgen.metrics import frechet_distance

    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        real, generated = torch.randn(4, 64, generator=generator) * 100, torch.randn(4, 64, generator=generator) * 100 + 3
        a, b = real.double().numpy(), generated.double().numpy()
        covariances = np.cov(a.T), np.cov(b.T)
        expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(covariances[0]) + np.trace(covariances[1])
                    - 2 * np.trace(scipy.linalg.sqrtm(covariances[0] @ covariances[1]).real))
        assert frechet_distance(real, generated) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance(real, real) == 0.0


def test_mmd_takes_sets_of_different_sizes_in_float64():
    from medgen.metrics import maximum_mean_discrepancy

    generator = torch.Generator().manual_seed(1)
    real, generated = torch.rand(3, 1, 8, 8, 8, generator=generator), torch.rand(5, 1, 8, 8, 8, generator=generator)
    x, y = real.double().flatten(1), generated.double().flatten(1)
    within = [(k.sum() - k.trace()) / (len(k) * (len(k) - 1)) for k in (x @ x.T, y @ y.T)]
    assert maximum_mean_discrepancy(real, generated) == pytest.approx(float(within[0] + within[1] - 2 * (x @ y.T).mean()))
    with pytest.raises(BadInputError, match="at least 2 volumes per set"):
        maximum_mean_discrepancy(real[:1], generated)


def test_feature_layers_that_return_tuples_or_pooled_vectors_give_features():
    from medgen.metrics import layer_features

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv3d(1, 3, 3), torch.nn.Linear(3, 2)

        def forward(self, x):
            features = self.conv(x)
            return self.head(features.mean((2, 3, 4))), (features, x)

    class WithSkips(torch.nn.Module):  # a block that returns its output and its skips, as a DDPM UNet's
        def __init__(self):
            super().__init__()
            self.block = Blocks()

        def forward(self, x):
            return self.block(x)

    volumes = [torch.rand(1, 6, 6, 6) for _ in range(2)]
    assert layer_features(WithSkips(), "block", volumes).shape == (2, 2)  # the tuple's first output, already (1, F)
    assert layer_features(WithSkips(), "block.head", volumes).shape == (2, 2)
    assert layer_features(WithSkips(), "block.conv", volumes).shape == (2, 3)


def test_mmd_refuses_volumes_of_different_shapes():
    from medgen.metrics import maximum_mean_discrepancy

    with pytest.raises(BadInputError, match="of one size"):  # same voxel count, another grid
        maximum_mean_discrepancy(torch.rand(3, 2, 4, 4, 4), torch.rand(3, 1, 8, 4, 4))
