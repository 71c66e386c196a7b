"""How sure a top-1 difference between the SNN and its ANN is, from the images they were both run on.

The two networks classify the same images, so their difference is a difference of paired proportions: only
the images one gets right and the other wrong move it. With n images, b of them right only by the ANN and c
right only by the SNN, the difference is (c - b) / n. Its 95 % interval here is Bonett and Price's adjusted
Wald interval for paired proportions (J. Educ. Behav. Stat. 37(4), 2012): one image added to each of the two
discordant counts and two to n,

    p_b = (b + 1) / (n + 2),   p_c = (c + 1) / (n + 2),   d = p_c - p_b
    d  +-  z * sqrt((p_b + p_c - d^2) / (n + 2)),          z = 1.96 for 95 %

which, unlike the plain Wald interval, does not shrink to a point when the two networks never disagree on
correctness, and keeps close to its nominal coverage on a few hundred images. Written out here because the
formula is four lines and no library pconv depends on offers it (scipy and statsmodels are not dependencies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

#: Two-sided confidence level of every interval pconv reports.
LEVEL = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """SNN top-1 minus ANN top-1 on the same images, in percentage points, with its confidence interval."""

    num_images: int
    ann_only: int  # images the ANN classifies right and the SNN wrong
    snn_only: int  # images the SNN classifies right and the ANN wrong

    def __post_init__(self):
        if self.num_images < 0 or self.ann_only < 0 or self.snn_only < 0 \
                or self.ann_only + self.snn_only > self.num_images:
            raise ValueError(f"inconsistent counts: {self.ann_only} + {self.snn_only} discordant images "
                             f"of {self.num_images}")

    @property
    def points(self) -> float:
        """(c - b) / n in percentage points (0 for no images)."""
        return 100.0 * (self.snn_only - self.ann_only) / self.num_images if self.num_images else 0.0

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        """The adjusted Wald interval, in percentage points, clipped to [-100, 100]."""
        z = NormalDist().inv_cdf(0.5 + level / 2)
        m = self.num_images + 2
        p_b, p_c = (self.ann_only + 1) / m, (self.snn_only + 1) / m
        d = p_c - p_b
        half = z * math.sqrt(max(p_b + p_c - d * d, 0.0) / m)
        return max(-100.0, 100.0 * (d - half)), min(100.0, 100.0 * (d + half))

    def __add__(self, other: "PairedDifference") -> "PairedDifference":
        """The counts of two disjoint sets of images together (e.g. the two halves of a split)."""
        return PairedDifference(self.num_images + other.num_images, self.ann_only + other.ann_only,
                                self.snn_only + other.snn_only)
