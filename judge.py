"""VLM judges on the paper's rubric (Table 2). SKELETON: the judge helper owns and completes this file."""

from __future__ import annotations

from dataclasses import dataclass

FULFILMENT_MAX, QUALITY_MAX, PRESERVATION_MAX = 4, 3, 3  # the paper's Table 2 rubric


@dataclass(frozen=True)
class Verdict:
    """One judged edit: the three rubric sub-scores, their total (0-10), and the judge's reason."""

    fulfilment: float  # 0-4: did the edit accomplish the request
    quality: float  # 0-3: is the edited image realistic and coherent
    preservation: float  # 0-3: are unrelated parts preserved
    reason: str = ""

    @property
    def total(self) -> float:
        return self.fulfilment + self.quality + self.preservation
