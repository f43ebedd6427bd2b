"""MRGen's candidate acceptance (spec B.10 oracle 7 a-e) and the DSC convention (oracle 9)."""

from __future__ import annotations

import json

import pytest
import torch

from medgen.errors import BadInputError
from medgen.metrics import dice_with_convention
from medgen.synthesis.filtering import CandidateScore, FilterThresholds, acceptance_rate, filter_all, select_candidates

ORGANS = ("liver", "kidney", "spleen")
STRICT = FilterThresholds()
RELAXED = STRICT.relaxed()


def score(candidate: int, iou: float, confidence: float, mask_id: str = "mask-0", absent=(), **organ_overrides) -> CandidateScore:
    """A fake record: every organ at ``iou``/``confidence`` unless overridden as ``organ=(iou, confidence)``."""
    values = {organ: organ_overrides.get(organ, (iou, confidence)) for organ in ORGANS}
    return CandidateScore(
        mask_id, candidate,
        organ_iou={organ: v[0] for organ, v in values.items()},
        organ_confidence={organ: v[1] for organ, v in values.items()},
        organ_dice={organ: 2 * v[0] / (1 + v[0]) for organ, v in values.items()},
        absent_organs=tuple(absent),
    )


def passes(record: CandidateScore, thresholds: FilterThresholds) -> bool:
    return not thresholds.failures(record)


def random_records(generator: torch.Generator, mask_id: str, count: int) -> list[CandidateScore]:
    values = 0.55 + 0.45 * torch.rand((count, len(ORGANS), 2), generator=generator)
    return [
        score(i, 0, 0, mask_id, **{organ: (float(values[i, j, 0]), float(values[i, j, 1])) for j, organ in enumerate(ORGANS)})
        for i in range(count)
    ]


def test_oracle7a_at_most_two_kept_per_mask():
    generator = torch.Generator().manual_seed(0)
    records = [record for m in range(30) for record in random_records(generator, f"mask-{m}", 20)]
    records += [score(i, 0.95, 0.97, "all-pass") for i in range(20)]
    decisions = filter_all(records)
    assert len(decisions) == 31
    assert all(len(decision.accepted) <= 2 for decision in decisions.values())
    assert len(decisions["all-pass"].accepted) == 2 and decisions["all-pass"].path == "strict"
    assert {decision.path for decision in decisions.values()} >= {"strict", "relaxed", "none"}
    assert 0 < acceptance_rate(decisions) < 1
    json.dumps({mask_id: decision.to_dict() for mask_id, decision in decisions.items()})


def test_oracle7b_strict_path_keeps_only_strict_passes():
    records = [
        score(0, 0.99, 0.85),  # best IoU but confidence below 0.90
        score(1, 0.90, 0.95),
        score(2, 0.88, 0.99, spleen=(0.69, 0.99)),  # one organ below 0.70
        score(3, 0.85, 0.93),
        score(4, 0.84, 0.97),
    ]
    decision = select_candidates(records)
    assert decision.path == "strict"
    assert [record.candidate for record in decision.accepted] == [1, 3]
    assert all(passes(record, STRICT) for record in decision.accepted)
    assert "confidence" in decision.rejected[0] and "spleen IoU" in decision.rejected[2]
    assert "better candidate" in decision.rejected[4]


def test_one_unsure_organ_fails_strict_even_with_a_high_average_confidence():
    """The spleen at 0.79 confidence (< 0.80 per organ) while the average is (0.99 + 0.99 + 0.79) / 3 = 0.923
    (>= 0.90): only the per-organ confidence check rejects it, and the reason names that organ and value."""
    unsure = score(0, 0.95, 0.99, spleen=(0.95, 0.79))
    assert unsure.avg_confidence >= STRICT.avg_confidence and unsure.avg_iou >= STRICT.avg_iou
    assert STRICT.failures(unsure) == ["spleen confidence 0.790 < 0.80"]
    assert passes(unsure, RELAXED)
    decision = select_candidates([unsure, score(1, 0.90, 0.95), score(2, 0.85, 0.95)])
    assert decision.path == "strict" and [record.candidate for record in decision.accepted] == [1, 2]
    assert decision.rejected == {0: "fails the strict thresholds: spleen confidence 0.790 < 0.80"}


def test_oracle7c_relaxed_path_keeps_at_most_one():
    records = [
        score(0, 0.95, 0.95),  # the only strict pass
        score(1, 0.97, 0.85),  # relaxed pass ranked above it
        score(2, 0.75, 0.85),  # relaxed pass
        score(3, 0.65, 0.99),  # fails even relaxed
    ]
    decision = select_candidates(records)
    assert decision.path == "relaxed" and len(decision.accepted) == 1
    kept = decision.accepted[0]
    assert passes(kept, RELAXED) and kept.avg_iou >= 0.70 and kept.avg_confidence >= 0.80
    # MRGen literally: one strict pass is not enough, the first relaxed pass (best IoU) is kept
    assert kept.candidate == 1
    assert RELAXED.avg_confidence == pytest.approx(0.80) and RELAXED.organ_iou == pytest.approx(0.60)

    nothing = select_candidates([score(0, 0.65, 0.99), score(1, 0.95, 0.75)])
    assert nothing.path == "none" and nothing.accepted == [] and set(nothing.rejected) == {0, 1}


def test_thresholds_are_inclusive_despite_float_rounding():
    assert (RELAXED.avg_iou, RELAXED.organ_iou, RELAXED.organ_confidence) == (0.7, 0.6, 0.7)
    at_the_relaxed_boundary = score(0, 7 / 10, 0.8)  # IoU 7/10 from voxel counts, confidence 0.8
    assert passes(at_the_relaxed_boundary, RELAXED) and not passes(at_the_relaxed_boundary, STRICT)
    decision = select_candidates([at_the_relaxed_boundary], STRICT)
    assert decision.path == "relaxed" and [s.candidate for s in decision.accepted] == [0]
    # a mean that float arithmetic puts just below the threshold: (0.75 + 0.8 + 0.85) / 3 = 0.7999999999999999
    rounded_down = score(0, 0.8, 0.95, liver=(0.75, 0.95), spleen=(0.85, 0.95))
    assert rounded_down.avg_iou < 0.8 and passes(rounded_down, STRICT)
    assert not passes(score(0, 0.7999, 0.95), STRICT)


def test_oracle7d_only_top5_by_average_iou_are_considered():
    records = [score(i, 0.99 - 0.01 * i, 0.70) for i in range(5)]  # top 5: high IoU, low confidence
    records.append(score(5, 0.90, 0.99))  # passes strict, but ranks 6th
    records.append(score(6, 0.89, 0.99))
    decision = select_candidates(records)
    assert decision.accepted == [] and decision.path == "none"
    assert "outside the top 5" in decision.rejected[5]
    # with top_k = 7 the same passing candidates are kept
    wider = select_candidates(records, FilterThresholds(top_k=7))
    assert [record.candidate for record in wider.accepted] == [5, 6]


@pytest.mark.parametrize("setting", [{"top_k": 0}, {"keep_strict": 0}, {"keep_relaxed": -1}, {"top_k": 2.5},
                                     {"avg_iou": float("nan")}, {"organ_confidence": 1.2}, {"relax_by": -0.1}])
def test_settings_that_would_accept_or_reject_everything_are_refused(setting):
    """top_k 0 would consider no candidate, a NaN threshold passes every score (NaN fails no ``<``)."""
    with pytest.raises(BadInputError, match=f"Filter (threshold|setting) {next(iter(setting))} must be"):
        FilterThresholds(**setting)


def test_relaxed_thresholds_stop_at_zero():
    relaxed = FilterThresholds(avg_iou=0.05, organ_iou=0.0).relaxed()
    assert (relaxed.avg_iou, relaxed.organ_iou, relaxed.avg_confidence) == (0.0, 0.0, 0.8)


def test_oracle7e_absent_organs_are_ignored_in_every_check():
    # the spleen is absent from the conditioning mask: its zero IoU/confidence must not count
    record = score(0, 0.9, 0.95, absent=("spleen",), spleen=(0.0, 0.0))
    assert record.present_organs == ["liver", "kidney"]
    assert record.avg_iou == pytest.approx(0.9) and record.avg_confidence == pytest.approx(0.95)
    assert passes(record, STRICT)
    other = score(1, 0.85, 0.92, absent=("spleen",), spleen=(0.0, 0.0))
    decision = select_candidates([other, record])
    assert decision.path == "strict" and [r.candidate for r in decision.accepted] == [0, 1]
    assert "spleen" not in json.dumps(decision.rejected)
    # a present organ that the checker misses entirely is a failure, not "absent"
    missed = score(2, 0.9, 0.95, spleen=(0.0, 0.0))
    assert any("spleen IoU" in reason for reason in STRICT.failures(missed))
    # a record without any present organ can never pass
    assert not passes(score(3, 1.0, 1.0, absent=ORGANS), RELAXED)
    with pytest.raises(BadInputError, match="one mask"):
        select_candidates([score(0, 0.9, 0.9, "a"), score(1, 0.9, 0.9, "b")])


def test_oracle9_dice_convention():
    reference = torch.zeros(6, 6, 6, dtype=torch.int64)
    prediction = torch.zeros_like(reference)
    reference[:2, :2, :2] = 1  # liver: 8 voxels
    prediction[:2, :2, :1] = 1  # 4 of them predicted
    reference[3:, 3:, 3:4] = 2  # right kidney: 9 voxels
    prediction[3:, 3:, 3:4] = 3  # predicted as left kidney
    prediction[5, 0, 0] = 4  # spleen predicted where the reference has none
    scores = dice_with_convention(
        prediction, reference,
        {"liver": 1, "kidney": (2, 3), "right kidney": 2, "spleen": 4, "pancreas": 5},
    )
    assert scores["liver"] == pytest.approx(2 * 4 / (8 + 4))
    assert scores["kidney"] == 1.0  # composite label = union of 2 and 3
    assert scores["right kidney"] == 0.0
    assert scores["spleen"] == 0.0  # reference empty, prediction not
    assert scores["pancreas"] == 1.0  # both empty
    with pytest.raises(BadInputError, match="shape"):
        dice_with_convention(prediction, reference[:5], {"liver": 1})
