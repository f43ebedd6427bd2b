"""Behaviour pinned after a mutation audit of medgen.synthesis (each test fails on one surviving mutant)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgen.synthesis.filtering import CandidateScore, acceptance_rate, filter_all


def _record(mask_id: str, candidate: int, value: float) -> CandidateScore:
    organs = {"liver": value, "spleen": value}
    return CandidateScore(mask_id, candidate, dict(organs), dict(organs), dict(organs))


def test_acceptance_rate_is_the_share_of_masks_with_an_accepted_candidate():
    """Two of three masks get pairs (one of them two pairs): the rate is 2/3 of the masks, not pairs per mask."""
    scores = [_record("a", i, 0.95) for i in range(3)]  # strict path: two kept
    scores += [_record("b", 0, 0.85)]  # relaxed path: one kept
    scores += [_record("c", i, 0.3) for i in range(2)]  # nothing kept
    decisions = filter_all(scores)
    assert [len(decisions[m].accepted) for m in "abc"] == [2, 1, 0]
    assert acceptance_rate(decisions) == pytest.approx(2 / 3)
    assert acceptance_rate({}) == 0.0


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images):
        return self.logits.expand(images.shape[0], -1, -1, -1, -1)


def test_organ_confidence_is_the_mean_top_probability_over_the_predicted_organ():
    """Spec: confidence = mean max-softmax inside the PREDICTED organ. The organ is the first 4 rows of a 8×2×2 grid;
    the checker predicts rows 2..5 (margin 3 -> p3), the missed rows 0..1 as background (margin 1 -> p1)."""
    from medgen.synthesis.checker import checker_from_model, score_candidates

    condition = torch.zeros(1, 8, 2, 2, dtype=torch.long)
    condition[0, :4] = 1
    logits = torch.zeros(1, 2, 8, 2, 2)
    logits[0, 1, 2:6] = 3.0
    logits[0, 0, :2] = 1.0
    logits[0, 0, 6:] = 5.0
    [score] = score_candidates(checker_from_model(_FixedLogits(logits)), torch.zeros(1, 1, 8, 2, 2), condition, ["organ"],
                               mask_id="m")
    p3 = torch.softmax(torch.tensor([0.0, 3.0]), 0)[1].item()
    assert score.organ_iou["organ"] == pytest.approx(2 / 6)
    assert score.organ_confidence["organ"] == pytest.approx(p3)


def test_synthetic_checker_images_have_a_within_label_texture_up_to_label_std_max():
    """SynthSeg-style images: each label gets a random mean plus a within-label std drawn from [0, label_std_max]."""
    from monai.transforms import Compose

    from medgen.synthesis.checker import CheckerConfig, randomised_image

    label = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    label[0, 3:9, 3:9, 3:9] = 1
    config = CheckerConfig.tiny(label_std_max=0.2)
    torch.manual_seed(0)
    stds = []
    for _ in range(20):
        image = randomised_image(label, 1, config, Compose([]))
        stds += [float(image[label == value].std()) for value in (0, 1)]
    assert max(stds) > 0.05  # texture is there...
    assert max(stds) < 0.2 * 1.2  # ... and bounded by label_std_max (sample std of N(0, s), s <= 0.2)


def test_denormalised_latents_stay_within_the_training_bounds():
    """Spec C.9 oracle 5: [-1, 1] maps onto [g_min, g_max]; a diffusion output beyond [-1, 1] is clipped to the bounds,
    so the decoder never sees latents outside the training posteriors' 3-sigma range."""
    from medgen.synthesis.latents import LatentSet

    latents = LatentSet.from_posteriors(torch.zeros(2, 4, 2, 2, 2), torch.full((2, 4, 2, 2, 2), 0.5))
    assert (latents.g_min, latents.g_max) == (-1.5, 1.5)
    mapped = latents.denormalize(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]))
    assert torch.allclose(mapped, torch.tensor([-1.5, -1.5, 0.0, 1.5, 1.5]))


def _joint_phantom(seed: int):
    from monai.data import MetaTensor

    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))
    radius = grid.pow(2).sum(0).sqrt()
    label = torch.zeros(16, 16, 16, dtype=torch.int64)
    label[radius < 0.9] = 2
    label[radius < 0.5] = 1
    image = torch.where(label == 1, 0.2, torch.where(label == 2, 0.8, 0.05)) + 0.05 * torch.rand((16, 16, 16), generator=generator)
    return MetaTensor(image[None]), MetaTensor(label[None])


@pytest.fixture(scope="module")
def joint_model(tmp_path_factory):
    from medgen.labels import LabelInfo
    from medgen.synthesis.joint_ldm import JointLDMConfig, train_joint_ldm
    from medgen.synthesis.prepare import prepare_pairs

    labels = [LabelInfo("cavity", 1, (1.0, 0.0, 0.0)), LabelInfo("wall", 2, (0.0, 1.0, 0.0))]
    pairs, labels = prepare_pairs([(f"c{i}", *_joint_phantom(i)) for i in range(2)], shape=(16, 16, 16), labels=labels)
    torch.manual_seed(0)
    config = JointLDMConfig.tiny(vae_phase1_steps=2, vae_phase2_steps=0, ldm_steps=3, checkpoint_every=3, ema_decay=0.5)
    return train_joint_ldm(pairs, labels, tmp_path_factory.mktemp("joint"), config)


def test_the_model_folder_holds_the_ema_weights_of_the_latent_ddpm(joint_model):
    """Spec C.5 / the module docs: ldm.safetensors holds the EMA weights (what sampling uses), not the last step's."""
    from medgen.diffusion.checkpoint import latest_checkpoint, load_checkpoint
    from medgen.models.weights import read_safetensors

    model_state, ema_state, _, _ = load_checkpoint(latest_checkpoint(joint_model / "ldm"))
    saved = read_safetensors(joint_model / "ldm.safetensors")
    assert ema_state is not None and sorted(saved) == sorted(ema_state)
    assert all(torch.equal(saved[name], ema_state[name]) for name in saved)
    assert any(not torch.equal(saved[name], model_state[name]) for name in saved if saved[name].is_floating_point())


@pytest.mark.parametrize(("slice_factor", "warned"), [(1.2, True), (1.005, False)])
def test_cases_whose_spacings_differ_by_more_than_one_percent_are_warned_about(oblique, slice_factor, warned):
    """prepare_pairs without spacing_mm: spacings differing by more than 1 % (a 1.2 mm next to a 1 mm slice spacing)
    mix physical scales and are reported; 0.5 % is rounding."""
    from monai.data import MetaTensor

    from medgen.progress import CallbackReporter
    from medgen.synthesis.prepare import prepare_pairs

    def pair(affine):
        image = MetaTensor(torch.rand(1, 12, 12, 12) * 500, affine=torch.from_numpy(affine))
        label = torch.zeros(1, 12, 12, 12, dtype=torch.int64)
        label[0, 3:9, 3:9, 3:9] = 1
        return image, MetaTensor(label, affine=torch.from_numpy(affine))

    other = oblique.copy()
    other[:3, 2] *= slice_factor
    logs = []
    prepare_pairs([("a", *pair(oblique)), ("b", *pair(other))], shape=(8, 8, 8),
                  reporter=CallbackReporter(lambda event: logs.append(event.get("message", ""))))
    assert any("spacings differ" in message for message in logs) == warned


def test_a_mask_of_the_model_grids_shape_but_another_spacing_is_resampled():
    """The generator works at its training spacing: a mask with the grid's shape but half the voxel size shows organs
    at twice their size unless it is resampled to the model's spacing (nearest neighbour) first."""
    from monai.data import MetaTensor

    from medgen.synthesis.maskgen import MaskGenModel

    grid_affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    model = MaskGenModel({}, None, None, None, None, None, 1.0, [], {}, (8, 8, 8), grid_affine)
    label = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    label[0, 2:6, 2:6, 2:6] = 1  # a 3 x 3 x 4 mm block at 0.75 x 0.75 x 1 mm
    fine = MetaTensor(label, affine=torch.diag(torch.tensor([0.75, 0.75, 1.0, 1.0], dtype=torch.float64)))
    on_grid, resampled = model.to_model_grid(fine)
    assert resampled and tuple(on_grid.shape[1:]) == (8, 8, 8)
    spacing = torch.as_tensor(on_grid.affine, dtype=torch.float64)[:3, :3].norm(dim=0)
    assert torch.allclose(spacing, torch.tensor([1.5, 1.5, 2.0], dtype=torch.float64))
    assert int((on_grid == 1).sum()) == 2 * 2 * 2  # the 3 x 3 x 4 mm block in 1.5 x 1.5 x 2 mm voxels, not 4³
    same = MetaTensor(label, affine=grid_affine)
    assert model.to_model_grid(same) == (same, False)


def test_per_organ_thresholds_are_inclusive():
    """An organ exactly at the strict per-organ IoU (0.70, e.g. 7 of 10 voxels) and confidence (0.80) passes: the
    thresholds are minimums ("IoU >= 0.70"), spec B.5."""
    from medgen.synthesis.filtering import FilterThresholds

    iou = {"liver": 7 / 10, "kidney": 0.95, "spleen": 0.95}
    confidence = {"liver": 0.8, "kidney": 0.99, "spleen": 0.99}
    at_boundary = CandidateScore("m", 0, iou, confidence, dict(iou))
    assert FilterThresholds().failures(at_boundary) == []
    below = CandidateScore("m", 1, {**iou, "liver": 0.69}, confidence, dict(iou))
    assert FilterThresholds().failures(below) == ["liver IoU 0.690 < 0.70"]


def test_each_latent_draw_is_a_fresh_sample_of_the_posterior():
    """Stages 2 and 3 train on z = (mu + sigma * eps) * scale_factor drawn anew at every step (as DIFF-3's dynamic
    sampling, spec C.9 oracle 6): draws of one sample differ, and their mean and spread approach mu and sigma."""
    from medgen.synthesis.maskgen_training import _LatentData

    mu = torch.stack([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 0.5)])
    sigma = torch.stack([torch.full((1, 2, 2, 2), 0.1), torch.full((1, 2, 2, 2), 0.2)])
    data = _LatentData([None, None], mu, sigma, 2.0, None, 0.0)
    torch.manual_seed(0)
    draws = torch.cat([data.draw_latents(torch.tensor([1] * 100), [()] * 100) for _ in range(10)])
    assert not torch.equal(draws[0], draws[1])
    assert torch.allclose(draws.mean(0), torch.full((1, 2, 2, 2), 0.5 * 2.0), atol=3 * 0.4 / 1000 ** 0.5)
    assert torch.allclose(draws.std(0), torch.full((1, 2, 2, 2), 0.2 * 2.0), rtol=0.1)
