"""The independent checker of mask-conditioned synthesis: trained on source label maps with randomised
intensities, it must recognise the conditioning anatomy in a contrast it never saw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgen.errors import GeometryMismatchError, ModelError
from medgen.synthesis.checker import (
    CheckerConfig,
    checker_from_model,
    load_checker,
    save_checker,
    score_candidates,
    spatial_transforms,
    train_checker,
)
from medgen.synthesis.filtering import select_candidates

SIZE = 24
ORGANS = ("ball", "slab")
SOURCE_LUT = torch.tensor([0.1, 0.9, 0.6])  # background, ball, slab: the source modality's contrast
UNSEEN_LUT = torch.tensor([0.8, 0.3, 0.55])  # a target contrast the checker never saw


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # tiny convolutions on a loaded 2-core box: thread hand-offs cost far more than they save
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def phantom(seed: int) -> torch.Tensor:
    """A 24³ label map ``(1, I, J, K)``: a ball (1) and a slab (2), jittered by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(SIZE).float()] * 3, indexing="ij"))
    label = torch.zeros(1, SIZE, SIZE, SIZE, dtype=torch.int64)
    centre = torch.tensor([8.0, 12.0, 12.0]) + torch.randint(-2, 3, (3,), generator=generator)
    radius = 5 + 1.5 * torch.rand((), generator=generator)
    label[0][((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0) < radius**2] = 1
    i, j, k = torch.randint(-2, 3, (3,), generator=generator).tolist()
    label[0, 16 + i : 20 + i, 6 + j : 18 + j, 9 + k : 15 + k] = 2
    return label


def render(label: torch.Tensor, lut: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return lut[label] + 0.03 * torch.randn(label.shape, generator=generator)


@pytest.fixture(scope="module")
def checker():
    labels = [phantom(seed) for seed in range(6)]
    images = [render(label, SOURCE_LUT, seed) for seed, label in enumerate(labels)]
    return train_checker(labels, len(ORGANS), CheckerConfig.tiny(), images=images)


def candidates(condition: torch.Tensor, seed: int) -> torch.Tensor:
    """(4, 1, I, J, K): a faithful image in the unseen contrast, pure noise, its voxels shuffled, another mask's image."""
    generator = torch.Generator().manual_seed(seed)
    faithful = render(condition, UNSEEN_LUT, seed)
    noise = torch.rand(condition.shape, generator=generator)
    shuffled = faithful.flatten()[torch.randperm(faithful.numel(), generator=generator)].view(faithful.shape)
    wrong_anatomy = render(torch.flip(condition, dims=(1,)), UNSEEN_LUT, seed)
    return torch.stack([faithful, noise, shuffled, wrong_anatomy])


def test_checker_ranks_a_faithful_unseen_contrast_above_noise(checker):
    faithful_iou, bad_iou = [], []
    for seed in (100, 101, 102, 103):
        condition = phantom(seed)
        scores = score_candidates(checker, candidates(condition, seed), condition, ORGANS, mask_id=f"m{seed}", first_index=20)
        assert [score.candidate for score in scores] == [20, 21, 22, 23]
        assert all(score.mask_id == f"m{seed}" and score.absent_organs == () for score in scores)
        faithful, *bad = scores
        assert all(faithful.avg_iou > other.avg_iou and faithful.avg_dice > other.avg_dice for other in bad)
        for score in scores:
            for organ in ORGANS:
                assert 0.0 <= score.organ_iou[organ] <= score.organ_dice[organ] <= 1.0
                assert 0.0 <= score.organ_confidence[organ] <= 1.0
        faithful_iou.append(faithful.avg_iou)
        bad_iou.append([other.avg_iou for other in bad])
    mean_faithful = sum(faithful_iou) / len(faithful_iou)
    mean_bad = torch.tensor(bad_iou).mean(dim=0)  # per kind of bad candidate
    assert mean_faithful >= 0.45 and torch.all(mean_bad <= mean_faithful - 0.2), (faithful_iou, bad_iou)


def test_checker_absent_organs_are_recorded_and_ignored(checker):
    condition = phantom(102)
    condition[condition == 2] = 0  # the slab is absent from the conditioning mask
    images = candidates(phantom(102), 102)[:1]  # the image still shows a slab
    (score,) = score_candidates(checker, images, condition, ORGANS, mask_id="no-slab")
    assert score.absent_organs == ("slab",)
    assert score.organ_iou["slab"] == score.organ_confidence["slab"] == score.organ_dice["slab"] == 0.0
    assert score.avg_iou == pytest.approx(score.organ_iou["ball"]) and score.avg_iou > 0
    assert score.avg_confidence == pytest.approx(score.organ_confidence["ball"])
    assert "slab" not in str(select_candidates([score]).rejected)


def test_checker_save_load_round_trip(checker, tmp_path):
    condition = phantom(103)
    images = candidates(condition, 103)
    save_checker(checker, CheckerConfig.tiny(), len(ORGANS), tmp_path / "checker", organ_names=ORGANS)
    loaded = load_checker(tmp_path / "checker")
    before = [score.to_dict() for score in score_candidates(checker, images, condition, ORGANS, mask_id="m")]
    after = [score.to_dict() for score in score_candidates(loaded, images, condition, ORGANS, mask_id="m")]
    assert after == before
    with pytest.raises(ModelError, match="no medgen_model.json"):
        load_checker(tmp_path)


class IntensityOracle(nn.Module):
    """A user-supplied "segmenter": voxel value v is class round(2 v), with logit margin 4."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        classes = (images * 2).round().long().clamp(0, 2)[:, 0]
        return 4.0 * nn.functional.one_hot(classes, 3).permute(0, 4, 1, 2, 3).float()


def test_user_model_scores_are_exact():
    condition = phantom(104)
    perfect = condition.float() / 2
    damaged = perfect.clone()
    ball = (condition[0] == 1).nonzero()
    removed = ball[: len(ball) // 4]
    damaged[0, removed[:, 0], removed[:, 1], removed[:, 2]] = 0.0  # a quarter of the ball missing
    scores = score_candidates(checker_from_model(IntensityOracle()), torch.stack([perfect, damaged]), condition, ORGANS, mask_id="u")
    confidence = torch.softmax(torch.tensor([4.0, 0.0, 0.0]), 0)[0].item()
    assert scores[0].organ_iou == {"ball": 1.0, "slab": 1.0} and scores[0].organ_dice == {"ball": 1.0, "slab": 1.0}
    assert scores[0].organ_confidence["ball"] == pytest.approx(confidence)
    kept = len(ball) - len(removed)
    assert scores[1].organ_iou["ball"] == pytest.approx(kept / len(ball))
    assert scores[1].organ_dice["ball"] == pytest.approx(2 * kept / (kept + len(ball)))
    assert scores[1].organ_iou["slab"] == 1.0

    with pytest.raises(ModelError, match="4 are needed"):
        score_candidates(checker_from_model(IntensityOracle()), perfect[None], condition, ORGANS[:1] * 2 + ("x",), mask_id="u")
    with pytest.raises(GeometryMismatchError):
        score_candidates(checker_from_model(IntensityOracle()), perfect[None, :, :20], condition, ORGANS, mask_id="u")


class _RecordingOracle(IntensityOracle):
    """The intensity oracle that also keeps the (padded) images the checker hands it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen = images.clone()
        return super().forward(images)


def test_an_anisotropic_grid_is_padded_per_axis_to_the_networks_multiple_and_cropped_back():
    """A 20×24×22 grid and a network needing multiples of 8: axis I gets 4 replicated slices and axis K 2 (each
    axis its own padding, F.pad lists them last axis first), the network sees 24³, and the logits come back on
    20×24×22 with the voxels' own values, so the scores stay exact."""
    generator = torch.Generator().manual_seed(0)
    condition = torch.randint(0, 3, (1, 20, 24, 22), generator=generator)
    images = (condition.float() / 2)[None]
    oracle = _RecordingOracle()
    logits = checker_from_model(oracle, input_multiple=8)(images)
    assert oracle.seen.shape == (1, 1, 24, 24, 24)
    assert torch.equal(oracle.seen[..., :20, :, :22], images)
    assert torch.equal(oracle.seen[..., 20:, :, :22], images[..., 19:20, :, :].expand(-1, -1, 4, -1, -1))
    assert torch.equal(oracle.seen[..., :20, :, 22:], images[..., 21:22].expand(-1, -1, -1, -1, 2))
    assert logits.shape == (1, 3, 20, 24, 22)
    assert torch.equal(logits, IntensityOracle()(images))
    scores = score_candidates(checker_from_model(IntensityOracle(), input_multiple=8), images, condition, ORGANS, mask_id="a")
    assert scores[0].organ_iou == {"ball": 1.0, "slab": 1.0}


def test_spatial_augmentation_warps_label_and_image_together():
    label = phantom(105)
    config = CheckerConfig.tiny(spatial_prob=1.0)
    spatial = spatial_transforms(config)
    spatial.set_random_state(seed=3)
    warped = spatial({"label": label.float(), "image": label.float()})
    warped_label, warped_image = warped["label"], warped["image"]
    assert warped_label.shape == warped_image.shape == label.shape
    assert torch.equal(warped_label, warped_label.round())  # nearest: still a label map
    moved = (warped_label != label).float().mean().item()
    agree = (warped_image.round() == warped_label).float().mean().item()
    assert moved > 0.02 and agree > 0.95, (moved, agree)


def test_spatial_augmentation_generalises_to_unseen_poses():
    """Six training maps with the ball at one side; tested mirrored (ball at the other side)."""
    labels = [phantom(seed) for seed in range(6)]
    images = [render(label, SOURCE_LUT, seed) for seed, label in enumerate(labels)]
    iou = {}
    for spatial_prob in (0.0, 0.5):
        torch.manual_seed(0)
        checker = train_checker(labels, len(ORGANS), CheckerConfig.tiny(spatial_prob=spatial_prob), images=images)
        scores = []
        for seed in (110, 111, 112):
            condition = torch.flip(phantom(seed), dims=(1,))
            scores += score_candidates(checker, render(condition, UNSEEN_LUT, seed)[None], condition, ORGANS, mask_id="m")
        iou[spatial_prob] = sum(score.avg_iou for score in scores) / len(scores)
    assert iou[0.5] > iou[0.0] + 0.1, iou


class _NamedIntensityOracle(nn.Module):
    """Logits of a model whose classes are [background, slab, ball]: value 0.5 is the slab, 1.0 the ball."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        classes = (images * 2).round().long().clamp(0, 2)[:, 0]
        return 4.0 * nn.functional.one_hot(classes, 3).permute(0, 4, 1, 2, 3).float()


def _oracle_segmenter():
    from medgen.models.segmentation import SegmentationModel

    return SegmentationModel(_NamedIntensityOracle(), [" Slab", "BALL"], None, (16, 16, 16), None, lambda volume: volume, "oracle")


def test_a_segmentation_model_checks_candidates_on_their_grid_with_organs_matched_by_name():
    """Organs ball (1), slab (2) of the masks are the model's classes 2 and 1; the candidate grid is stored
    left-posterior (the model reads RAS), so a wrong axis mapping or channel order would lose the exact scores."""
    from medgen.synthesis.checker import SegmentationModelChecker

    condition = phantom(105)
    perfect = torch.where(condition == 1, 1.0, torch.where(condition == 2, 0.5, 0.0)).float()
    grid_affine = torch.diag(torch.tensor([-1.5, -1.5, 2.0, 1.0], dtype=torch.float64))
    checker = SegmentationModelChecker(_oracle_segmenter(), ORGANS, grid_affine)
    constant = torch.full_like(perfect, 0.5)  # a collapsed candidate: no organ, and no error
    logits = checker(torch.stack([perfect, constant]))
    assert logits.shape == (2, 3, SIZE, SIZE, SIZE)
    torch.testing.assert_close(logits[0].softmax(0).argmax(0), condition[0])
    scores = score_candidates(checker, torch.stack([perfect, constant]), condition, ORGANS, mask_id="s")
    assert scores[0].organ_iou == {"ball": 1.0, "slab": 1.0}
    assert scores[0].organ_confidence["ball"] == pytest.approx(torch.softmax(torch.tensor([4.0, 0.0, 0.0]), 0)[0].item(), rel=1e-4)
    assert scores[1].organ_iou == {"ball": 0.0, "slab": 0.0} and scores[1].organ_confidence == {"ball": 0.0, "slab": 0.0}
    from medgen.errors import BadInputError

    with pytest.raises(BadInputError, match=r"does not segment the organs \['liver'\]: its classes are \[' Slab', 'BALL'\]"):
        SegmentationModelChecker(_oracle_segmenter(), ("ball", "liver"), grid_affine)
