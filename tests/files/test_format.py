"""The file format's description: what older files hold is read as they meant it."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

import nets
import pconv
from pconv.files.format import read_header


def test_a_calibration_file_without_a_config_entry_reads_its_choices(tmp_path):
    """Files written before the config was recorded give their choices entry by entry."""
    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    calibration = pconv.calibrate(nets.vgg_small(), images, time_steps=[4, 16], threshold="mse", method="fit",
                                  encoding_levels=32, population_budget=0.25, overflow_sites=0.0)
    path = pconv.save_calibration(calibration, tmp_path / "c.safetensors")
    meta = dict(read_header(path).metadata)
    del meta["config"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=meta)
    assert pconv.load_calibration(old).config == calibration.config
