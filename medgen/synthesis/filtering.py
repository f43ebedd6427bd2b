"""MRGen's automatic acceptance of generated candidates (spec B.5 ``filter_json``), as a pure function.

Per conditioning mask: rank its candidates by average IoU and consider the top 5; if at least 2 pass
the strict thresholds keep the best 2; otherwise lower all four thresholds by 0.10, re-test the same
top 5 and keep at most 1. Following MRGen literally, a mask with exactly one strict pass goes down
the relaxed path, where the first relaxed pass (which may rank above that strict pass) is kept.

Organs absent from the conditioning mask are listed in ``CandidateScore.absent_organs`` and take no
part in any average or threshold. Unlike MRGen's zero filter (quirk QB3), a present organ that the
checker misses entirely (IoU 0) counts as a failure, not as absent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from medgen.errors import BadInputError

PATHS = ("strict", "relaxed", "none")


@dataclasses.dataclass
class CandidateScore:
    """The checker's verdict on one generated candidate.

    Args:
        mask_id: the conditioning mask the candidate was generated from.
        candidate: the candidate's index (e.g. its seed number) within that mask.
        organ_iou, organ_confidence, organ_dice: per organ name, values in [0, 1].
        absent_organs: organs whose conditioning mask is empty (their values, if any, are ignored).
    """

    mask_id: str
    candidate: int
    organ_iou: dict[str, float]
    organ_confidence: dict[str, float]
    organ_dice: dict[str, float]
    absent_organs: tuple[str, ...] = ()

    @property
    def present_organs(self) -> list[str]:
        return [organ for organ in self.organ_iou if organ not in self.absent_organs]

    @property
    def avg_iou(self) -> float:
        """Mean IoU over the organs present in the conditioning mask (0 if none)."""
        return _mean(self.organ_iou, self.present_organs)

    @property
    def avg_confidence(self) -> float:
        """Mean confidence over the organs present in the conditioning mask (0 if none)."""
        return _mean(self.organ_confidence, self.present_organs)

    @property
    def avg_dice(self) -> float:
        return _mean(self.organ_dice, self.present_organs)

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["absent_organs"] = list(self.absent_organs)
        document.update(avg_iou=self.avg_iou, avg_confidence=self.avg_confidence, avg_dice=self.avg_dice)
        return document


#: float rounding allowed below a threshold (scores are ratios of voxel counts or means of a few of them)
_AT_LEAST_SLACK = 1e-9


def _mean(values: dict[str, float], organs: list[str]) -> float:
    return sum(values.get(organ, 0.0) for organ in organs) / len(organs) if organs else 0.0


@dataclasses.dataclass(frozen=True)
class FilterThresholds:
    """Acceptance settings (defaults: MRGen's).

    Args:
        avg_confidence, avg_iou: minimum averages over the present organs.
        organ_iou, organ_confidence: minimum of every present organ.
        top_k: candidates per mask considered, best average IoU first.
        keep_strict: kept when at least this many pass the strict thresholds.
        keep_relaxed: the most kept on the relaxed path.
        relax_by: how much all four thresholds drop on the relaxed path.
    """

    avg_confidence: float = 0.90
    avg_iou: float = 0.80
    organ_iou: float = 0.70
    organ_confidence: float = 0.80
    top_k: int = 5
    keep_strict: int = 2
    keep_relaxed: int = 1
    relax_by: float = 0.10

    def __post_init__(self):
        """Refuse settings that would silently accept or reject everything (NaN passes no ``<`` test; top_k 0
        considers no candidate)."""
        for name in ("avg_confidence", "avg_iou", "organ_iou", "organ_confidence", "relax_by"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise BadInputError(f"Filter threshold {name} must be a number in [0, 1]; got {value!r}.")
        for name, least in (("top_k", 1), ("keep_strict", 1), ("keep_relaxed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BadInputError(f"Filter setting {name} must be a whole number >= {least}; got {value!r}.")

    def relaxed(self) -> "FilterThresholds":
        """The same settings with the four thresholds lowered by ``relax_by``, not below 0 (scores are), rounded to
        12 decimals so 0.8 - 0.1 is 0.7 and not 0.7000000000000001."""
        def lowered(value: float) -> float:
            return max(0.0, round(value - self.relax_by, 12))

        return dataclasses.replace(
            self, avg_confidence=lowered(self.avg_confidence), avg_iou=lowered(self.avg_iou),
            organ_iou=lowered(self.organ_iou), organ_confidence=lowered(self.organ_confidence),
        )

    def failures(self, score: CandidateScore) -> list[str]:
        """Why ``score`` fails these thresholds; empty when it passes. A value passes when it is at least the
        threshold, up to float rounding (``_AT_LEAST_SLACK``): a mean of 0.75, 0.8 and 0.85 meets 0.8."""
        organs = score.present_organs
        if not organs:
            return ["no organ is present in the conditioning mask"]
        reasons = []
        if score.avg_confidence < self.avg_confidence - _AT_LEAST_SLACK:
            reasons.append(f"average confidence {score.avg_confidence:.3f} < {self.avg_confidence:.2f}")
        if score.avg_iou < self.avg_iou - _AT_LEAST_SLACK:
            reasons.append(f"average IoU {score.avg_iou:.3f} < {self.avg_iou:.2f}")
        for organ in organs:
            if score.organ_iou.get(organ, 0.0) < self.organ_iou - _AT_LEAST_SLACK:
                reasons.append(f"{organ} IoU {score.organ_iou.get(organ, 0.0):.3f} < {self.organ_iou:.2f}")
            if score.organ_confidence.get(organ, 0.0) < self.organ_confidence - _AT_LEAST_SLACK:
                reasons.append(
                    f"{organ} confidence {score.organ_confidence.get(organ, 0.0):.3f} < {self.organ_confidence:.2f}"
                )
        return reasons


@dataclasses.dataclass
class FilterDecision:
    """The outcome for one conditioning mask.

    Args:
        mask_id: the conditioning mask.
        accepted: kept candidates, best average IoU first.
        path: ``"strict"``, ``"relaxed"`` (relaxed thresholds kept one) or ``"none"`` (nothing kept).
        rejected: candidate index -> why it was not kept.
    """

    mask_id: str
    accepted: list[CandidateScore]
    path: str
    rejected: dict[int, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mask_id": self.mask_id,
            "path": self.path,
            "accepted": [score.to_dict() for score in self.accepted],
            "rejected": {str(candidate): reason for candidate, reason in self.rejected.items()},
        }


def select_candidates(scores: Sequence[CandidateScore], thresholds: FilterThresholds = FilterThresholds()) -> FilterDecision:
    """Accept candidates of ONE conditioning mask (spec B.5 acceptance, see the module docstring).

    Ties in average IoU keep the candidates' input order.

    Raises:
        BadInputError: ``scores`` mix several masks, or repeat a candidate index.
    """
    mask_ids = {score.mask_id for score in scores}
    if len(mask_ids) > 1:
        raise BadInputError(f"select_candidates takes the candidates of one mask; got masks {sorted(mask_ids)}. Use filter_all.")
    candidates = [score.candidate for score in scores]
    if len(set(candidates)) != len(candidates):
        raise BadInputError(f"Candidate indices must be unique per mask; got {candidates}.")
    mask_id = next(iter(mask_ids)) if mask_ids else ""
    ranked = sorted(scores, key=lambda score: -score.avg_iou)
    considered = ranked[: thresholds.top_k]
    rejected = {
        score.candidate: f"ranked {rank} by average IoU, outside the top {thresholds.top_k}"
        for rank, score in enumerate(ranked[thresholds.top_k :], start=thresholds.top_k + 1)
    }
    strict_failures = {score.candidate: thresholds.failures(score) for score in considered}
    strict_pass = [score for score in considered if not strict_failures[score.candidate]]
    if len(strict_pass) >= thresholds.keep_strict:
        accepted, path = strict_pass[: thresholds.keep_strict], "strict"
        for score in considered:
            if score not in accepted:
                rejected[score.candidate] = _reason(strict_failures[score.candidate], thresholds.keep_strict, "strict")
    else:
        relaxed = thresholds.relaxed()
        relaxed_failures = {score.candidate: relaxed.failures(score) for score in considered}
        relaxed_pass = [score for score in considered if not relaxed_failures[score.candidate]]
        accepted = relaxed_pass[: thresholds.keep_relaxed]
        path = "relaxed" if accepted else "none"
        for score in considered:
            if score not in accepted:
                rejected[score.candidate] = _reason(relaxed_failures[score.candidate], thresholds.keep_relaxed, "relaxed")
    return FilterDecision(mask_id, accepted, path, dict(sorted(rejected.items())))


def _reason(failures: list[str], keep: int, path: str) -> str:
    if failures:
        return f"fails the {path} thresholds: " + "; ".join(failures)
    return f"passes the {path} thresholds but {keep} better candidate(s) were kept"


def filter_all(
    scores: Sequence[CandidateScore], thresholds: FilterThresholds = FilterThresholds()
) -> dict[str, FilterDecision]:
    """:func:`select_candidates` for every conditioning mask, in order of first appearance."""
    by_mask: dict[str, list[CandidateScore]] = {}
    for score in scores:
        by_mask.setdefault(score.mask_id, []).append(score)
    return {mask_id: select_candidates(group, thresholds) for mask_id, group in by_mask.items()}


def acceptance_rate(decisions: dict[str, FilterDecision]) -> float:
    """Fraction of conditioning masks with at least one accepted candidate (0 when there are none)."""
    return sum(bool(d.accepted) for d in decisions.values()) / len(decisions) if decisions else 0.0
