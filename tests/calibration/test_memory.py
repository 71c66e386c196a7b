"""Calibration in bounded memory: every registered method uses every image, holds no more for 4N images than
for N, and gives the parameters of a whole-set calibration."""

from __future__ import annotations

import pytest
import torch

import nets
import pconv
import pconv.calibration.fit
from pconv import ConfigError
from pconv.data.batches import ImageBatches
from pconv.calibration import CALIBRATIONS
from pconv.utils.memory import GiB, MiB, TensorMeter, default_budget, parse_budget, physical_memory

METHODS = CALIBRATIONS.names()


def images(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Reread:
    """A re-iterable source of batches (as a DataLoader is), counting how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def calibrate(data, method, budget, dtype=torch.float32, **kwargs):
    model = nets.vgg_small().to(dtype)
    if method == "recon":
        kwargs.setdefault("recon_steps", 4)
    return pconv.calibrate(model, data, time_steps=[4], threshold="percentile:99.9" if method == "none" else "max",
                           method=method, memory_budget=budget, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_peak_memory_does_not_grow_with_the_number_of_images(method, monkeypatch):
    # recon's steps take BATCH images on average whatever N: 8, so that 24 images do not all join every step
    monkeypatch.setattr(pconv.calibration.recon, "BATCH", 8)
    n = 24
    small, large = (calibrate(list(images(k).split(8)), method, "3MiB") for k in (n, 4 * n))
    assert small.provenance["num_images"] == n and large.provenance["num_images"] == 4 * n
    if method in ("fit", "refit", "auto", "recon"):  # the streamed schedule ran, and saw every image
        assert large.provenance["fit_schedule"].startswith("rounds") and large.provenance["fit_images"] == 4 * n
    assert large.provenance["peak_tensor_mb"] < 1.2 * small.provenance["peak_tensor_mb"], (small.provenance,
                                                                                           large.provenance)


@pytest.mark.parametrize("method", METHODS)
def test_streamed_calibration_equals_the_whole_set(method):
    """Images re-read from the source in batches of 8, statistics in rounds of a few images, against all 40
    images as one batch in one pass; float64, so only sums re-associated differ (and by rounding only)."""
    data = images(40, seed=3, dtype=torch.float64)
    whole = calibrate([data], method, 2 * GiB, dtype=torch.float64, population_budget=1.0)
    source = Reread(list(data.split(8)))
    streamed = calibrate(source, method, "1MiB", dtype=torch.float64, population_budget=1.0)
    assert source.reads > 3  # the images were not held: read again for every pass
    if method == "recon":
        assert whole.provenance["recon_schedule"] == "inputs kept"
        assert streamed.provenance["recon_schedule"] == "inputs recomputed"
    if method in ("fit", "refit", "auto", "recon"):
        assert whole.provenance["fit_schedule"] == "one pass"
        assert streamed.provenance["fit_schedule"].startswith("rounds")
    assert streamed.populated == whole.populated
    for name, p in whole.params[4].items():
        q = streamed.params[4][name]
        assert torch.allclose(q.theta, p.theta, rtol=1e-6, atol=0), name
        assert torch.allclose(q.delta_in, p.delta_in, rtol=0, atol=1e-6), name
        assert torch.allclose(q.delta_out, p.delta_out, rtol=0, atol=1e-5), name
    for key, value in whole.weights.get(4, {}).items():  # refitted layers
        assert torch.allclose(streamed.weights[4][key], value, rtol=1e-6, atol=1e-7), key


def test_every_image_is_used_past_any_cap():
    """The paired pass once capped its images at a byte limit and dropped the rest; now all count."""
    few = calibrate(list(images(16, seed=1).split(8)), "fit", "2MiB")
    many = calibrate(list(images(16, seed=1).split(8)) + list(images(16, seed=2).split(8)), "fit", "2MiB")
    assert few.provenance["fit_images"] == 16 and many.provenance["fit_images"] == 32
    assert any(not torch.equal(few.params[4][n].theta, many.params[4][n].theta) for n in few.params[4])


def test_held_images_stay_within_half_the_budget():
    data = list(images(64).split(16))  # 64 x 12 KiB
    assert not ImageBatches(Reread(data), hold_bytes=1 * MiB).streaming
    assert ImageBatches(Reread(data), hold_bytes=100 * 1024).streaming
    assert not ImageBatches(iter(data), hold_bytes=100 * 1024).streaming  # one-shot: must be held


def test_budget_parsing_and_default():
    assert parse_budget("4GiB") == 4 * GiB and parse_budget("512M") == 512 * MiB and parse_budget("2.5g") == 2.5 * GiB
    assert parse_budget(64 * MiB) == 64 * MiB
    for bad in ("lots", "4 parsecs", "0", "-3G"):
        with pytest.raises(ConfigError):
            parse_budget(bad)
    total = physical_memory()
    assert 1 * GiB <= default_budget() <= 8 * GiB and (not total or default_budget() <= max(total // 4, GiB))


def test_the_calibration_records_its_peak_memory():
    calibration = calibrate(list(images(8).split(4)), "fit", "64MiB")
    provenance = calibration.provenance
    assert provenance["memory_budget_mb"] == 64.0
    assert 0 < provenance["peak_tensor_mb"] <= provenance["peak_rss_mb"]


def test_tensor_meter_counts_live_tensors():
    meter = TensorMeter()
    with meter:
        a = torch.zeros(1024, 256)  # 1 MiB
        b = torch.ones(1024, 256)
        del a
        c = torch.ones(512, 256)  # reuses nothing the meter knows of: counted from 1 MiB
    assert meter.peak == 2 * MiB and meter.current == MiB + MiB // 2
    del b, c
