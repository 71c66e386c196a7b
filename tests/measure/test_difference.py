"""The paired SNN − ANN top-1 difference and its adjusted Wald interval (measure/difference.py)."""

from __future__ import annotations

import math
import random

import pytest

from pconv.measure.difference import PairedDifference


def test_the_interval_is_bonett_and_prices_formula_by_hand():
    # 1,000 images, 30 right only by the ANN, 26 only by the SNN: p_b = 31/1002, p_c = 27/1002
    diff = PairedDifference(1000, ann_only=30, snn_only=26)
    assert diff.points == pytest.approx(-0.4)
    d = (27 - 31) / 1002
    half = 1.959963984540054 * math.sqrt((58 / 1002 - d * d) / 1002)
    low, high = diff.interval()
    assert low == pytest.approx(100 * (d - half), abs=1e-12) and high == pytest.approx(100 * (d + half), abs=1e-12)
    assert low == pytest.approx(-1.889, abs=1e-3) and high == pytest.approx(1.090, abs=1e-3)


def test_more_disagreement_fewer_images_or_a_higher_level_widen_it():
    def width(n, b, c):
        low, high = PairedDifference(n, b, c).interval()
        return high - low

    assert width(1000, 30, 26) < width(1000, 60, 56) < width(500, 60, 56)
    low, high = PairedDifference(1000, 30, 26).interval(0.99)
    assert high - low > width(1000, 30, 26)


def test_no_discordant_image_still_leaves_an_interval_around_zero():
    low, high = PairedDifference(250, 0, 0).interval()
    assert PairedDifference(250, 0, 0).points == 0.0
    assert low == pytest.approx(-high) and 0 < high < 2.0


def test_halves_add_up_and_bad_counts_are_refused():
    total = PairedDifference(250, 9, 3) + PairedDifference(250, 5, 3)
    assert (total.num_images, total.ann_only, total.snn_only) == (500, 14, 6)
    assert total.points == pytest.approx(-1.6)
    with pytest.raises(ValueError):
        PairedDifference(10, 6, 5)


def test_the_95_interval_covers_the_true_difference_about_95_times_in_100():
    # simulated pairs with a known difference: right only by the ANN with p = 0.04, only by the SNN with 0.03
    rng = random.Random(0)
    trials, n, covered = 2000, 500, 0
    for _ in range(trials):
        draws = [rng.random() for _ in range(n)]
        b = sum(u < 0.04 for u in draws)
        c = sum(0.04 <= u < 0.07 for u in draws)
        low, high = PairedDifference(n, b, c).interval()
        covered += low <= -1.0 <= high
    assert 0.93 <= covered / trials <= 0.97
