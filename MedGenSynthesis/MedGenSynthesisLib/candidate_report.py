"""The accepted/rejected candidate table, the summary line and the per-mask progress of a ``maskgen`` job,
from its report and progress events (plain data for the panel; no ``qt`` and no scene here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class CandidateRow:
    """One row of the accepted/rejected table: a candidate, or a mask that produced none.

    Args:
        mask: the conditioning mask's id.
        candidate: the candidate's index within its mask; None for a mask row (skipped, nothing generated).
        avg_iou, avg_confidence: checker averages over the organs present in the mask (None for a mask row).
        organ_scores: organ name -> ``{"iou", "dice", "confidence"}``; an organ absent from the mask maps to None.
        decision: ``accepted``, ``rejected`` or the mask's status (e.g. ``skipped: empty mask``).
        detail: the acceptance path (``strict``/``relaxed``) of an accepted candidate, why a rejected one
            was not kept, or empty.
    """

    mask: str
    candidate: int | None
    avg_iou: float | None
    avg_confidence: float | None
    organ_scores: dict[str, dict[str, float] | None]
    decision: str
    detail: str = ""


def candidate_rows(report: dict[str, Any]) -> list[CandidateRow]:
    """The table rows of a ``maskgen`` report: every candidate of every mask, in report order; a mask
    with no candidates (skipped) gets one row carrying its status."""
    rows = []
    for mask in report["masks"]:
        if not mask.get("candidates"):
            rows.append(CandidateRow(mask["mask_id"], None, None, None, {}, mask["status"]))
            continue
        for candidate in mask["candidates"]:
            absent = set(candidate.get("absent_organs", []))
            scores = {
                organ: None if organ in absent else {
                    "iou": candidate["organ_iou"][organ], "dice": candidate["organ_dice"][organ],
                    "confidence": candidate["organ_confidence"][organ],
                }
                for organ in candidate["organ_iou"]
            }
            detail = mask["path"] if candidate["decision"] == "accepted" else candidate["reason"]
            rows.append(CandidateRow(mask["mask_id"], int(candidate["candidate"]), float(candidate["avg_iou"]),
                                     float(candidate["avg_confidence"]), scores, candidate["decision"], detail))
    return rows


def table_cells(rows: Sequence[CandidateRow]) -> tuple[list[str], list[list[str]]]:
    """Column headers and text cells of the candidate table (one ``IoU / conf.`` column per organ).

    Returns:
        ``(headers, cells)``: scores with 3 decimals, ``absent`` for an organ missing from the mask,
        empty cells where a mask row has no scores.
    """
    organs = list(dict.fromkeys(organ for row in rows for organ in row.organ_scores))
    headers = ["Mask", "Candidate", "Avg IoU", "Avg conf.", *(f"{organ} IoU / conf." for organ in organs), "Decision"]
    cells = []
    for row in rows:
        organ_cells = []
        for organ in organs:
            score = row.organ_scores.get(organ, {})
            organ_cells.append("absent" if score is None else f"{score['iou']:.3f} / {score['confidence']:.3f}" if score else "")
        decision = f"{row.decision} ({row.detail})" if row.detail else row.decision
        cells.append([
            row.mask, "" if row.candidate is None else str(row.candidate),
            "" if row.avg_iou is None else f"{row.avg_iou:.3f}", "" if row.avg_confidence is None else f"{row.avg_confidence:.3f}",
            *organ_cells, decision,
        ])
    return headers, cells


def summary(imported: dict[str, Any]) -> str:
    """One line after a run, e.g. ``4 pairs accepted from 3 masks; none accepted: case_B; skipped: case_C (empty mask)``."""
    report = imported.get("report")
    text = f"{len(imported['pairs'])} pair(s) accepted"
    if not report:
        return text
    masks = report["masks"]
    text += f" from {len(masks)} mask(s)"
    none_accepted = [mask["mask_id"] for mask in masks if mask["status"] == "none accepted"]
    skipped = [f"{mask['mask_id']} ({mask['status'].removeprefix('skipped: ')})" for mask in masks if mask["status"].startswith("skipped")]
    if none_accepted:
        text += f"; none accepted: {', '.join(none_accepted)}"
    if skipped:
        text += f"; skipped: {', '.join(skipped)}"
    return text


class GenerationProgress:
    """Where a ``maskgen`` job is, per mask and per candidate, from its progress events.

    The ``masks`` phase counts finished masks; the phases reported within a mask (``candidates``,
    ``denoising``) start again for every mask, so they are forgotten when a mask finishes.
    """

    def __init__(self) -> None:
        self.mask_step = 0
        self.mask_total = 0
        self.inner: dict[str, tuple[int, int]] = {}
        self.job_dir: Path | None = None

    def record(self, event: dict[str, Any]) -> None:
        """Take one worker event (pass as an ``onEvent`` callback)."""
        if event.get("event") == "started":
            self.job_dir = Path(event["job_dir"])
        if event.get("event") != "progress":
            return
        step, total = int(event.get("step", 0)), int(event.get("total", 0))
        if event.get("phase") == "masks":
            self.inner = {}
            self.mask_step, self.mask_total = step, total
        else:
            self.inner[event.get("phase", "working")] = (step, total)

    def text(self) -> str:
        """E.g. ``masks done 1/5 | candidates 10/20 | denoising 30/50``."""
        parts = [f"masks done {self.mask_step}/{self.mask_total}"] if self.mask_total else []
        parts += [f"{phase} {step}/{total}" for phase, (step, total) in self.inner.items()]
        return " | ".join(parts) or "Waiting for the first mask..."
