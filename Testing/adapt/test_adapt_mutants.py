"""Behaviour pinned after a mutation audit of medgen.adapt (each test fails on one surviving mutant)."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

import medgen.adapt.finetune as finetune
from medgen.adapt.finetune import FinetuneConfig, finetune_segmentation
from medgen.models.segmentation import SegmentationModel
from medgen.peft import inject
from medgen_testing import blob_case


def _bitfit_model() -> SegmentationModel:
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    inject(network, "bitfit")
    return SegmentationModel(network, ["blob"], None, (16, 16, 16), None, lambda volume: volume, "tiny-bn")


def test_an_equal_validation_dice_is_not_an_improvement(oblique, tmp_path, monkeypatch):
    """patience counts validations without a BETTER Dice: a plateau (equal scores) stops the run, and the network
    handed back is the first one that reached the plateau's score."""
    dice_of_check = [0.5, 0.7, 0.7, 0.7, 0.6, 0.6]
    validated = []

    def scripted_dice(model, *args):
        validated.append({name: tensor.detach().clone() for name, tensor in model.network.state_dict().items()})
        return dice_of_check[len(validated) - 1]

    monkeypatch.setattr(finetune, "_validation_dice", scripted_dice)
    model = _bitfit_model()
    result = finetune_segmentation(model, [blob_case(0, oblique)], FinetuneConfig(steps=6, val_every=1, patience=2, amp=False),
                                   checkpoint_dir=tmp_path, validation=blob_case(1, oblique))
    assert (result.steps, result.best_val_dice, len(validated)) == (4, 0.7, 4)
    final = model.network.state_dict()
    first_at_plateau, last = validated[1], validated[3]
    assert any(not torch.equal(first_at_plateau[name], last[name]) for name in final)  # training moved on
    assert all(torch.equal(final[name], first_at_plateau[name]) for name in final)


def test_a_label_value_one_past_the_last_class_is_refused(oblique, tmp_path):
    """A 2-class model (background + blob) predicts classes 0..1: a training map holding the value 2 is a clear
    BadInputError before training, not an index error inside the loss."""
    import pytest

    from medgen.errors import BadInputError

    image, label = blob_case(0, oblique)
    label = label.clone()
    label[label > 0] = 2
    model = _bitfit_model()
    with pytest.raises(BadInputError, match=r"label values \[0, 2\].*classes 0\.\.1"):
        finetune.check_segmentation_labels(model, label, "The map")
    with pytest.raises(BadInputError, match="classes 0..1"):
        finetune_segmentation(model, [(image, label)], FinetuneConfig(steps=1, val_every=1, amp=False), checkpoint_dir=tmp_path)


class _OracleUNet(torch.nn.Module):
    """Predicts the exact noise that leads every x_t back to the constant volume ``target`` (model range)."""

    def __init__(self, alphas_cumprod: torch.Tensor, target: float):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        self.target = target

    def forward(self, x, timesteps, context=None):
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
        return ((x.double() - alpha_bar.sqrt() * self.target) / (1 - alpha_bar).sqrt()).float()


def test_sampling_reaches_the_whole_intensity_range_of_the_generator():
    """A generator pretrained on volumes in [0, 2] (model spec ``intensity_range``) must be able to produce 2: the
    x0 clip widens to the range, so a bright 1.8 comes back as 0.9 in [0, 1], not clipped to 1 (0.5)."""
    from medgen.adapt.generator import DiffusionSettings, sample_volumes

    settings = DiffusionSettings(num_train_timesteps=20, intensity_range=(0.0, 2.0))
    oracle = _OracleUNet(settings.scheduler().alphas_cumprod, target=1.8)
    volumes = sample_volumes(oracle, 1, (4, 4, 4), diffusion=settings, seed=0)
    assert volumes.shape == (1, 1, 4, 4, 4)
    assert torch.allclose(volumes, torch.full_like(volumes, 0.9), atol=1e-3)


class _LearnedConstantUNet(torch.nn.Module):
    """A 'generator' whose only weight is the constant volume x0 it denoises towards (in the model's range)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.x0 = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, context=None):
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
        return (x - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt()


def test_finetuning_maps_the_volumes_onto_the_generators_intensity_range(tmp_path):
    """Volumes come in [0, 1]; a generator pretrained on [-1, 1] must be trained on them mapped to [-1, 1], so that
    sampling (which maps back) returns the training intensity: 0.75 in, 0.75 out (x0 = 0.5 in the model's range)."""
    from medgen.adapt.generator import DiffusionSettings, GeneratorFinetuneConfig, finetune_generator, sample_volumes

    settings = DiffusionSettings(num_train_timesteps=20, intensity_range=(-1.0, 1.0))
    unet = _LearnedConstantUNet(settings.scheduler().alphas_cumprod)
    volumes = [torch.full((1, 4, 4, 4), 0.75) for _ in range(2)]
    config = GeneratorFinetuneConfig(steps=150, lr=0.05, amp=False, checkpoint_every=1000)
    finetune_generator(unet, volumes, config, checkpoint_dir=tmp_path, diffusion=settings)
    assert abs(float(unet.x0.detach()) - 0.5) < 0.02
    generated = sample_volumes(unet, 1, (4, 4, 4), diffusion=settings, seed=0)
    assert torch.allclose(generated, torch.full_like(generated, 0.75), atol=0.02)
