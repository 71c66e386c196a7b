"""One frozen, validated configuration: its defaults, its per-T plan, and what the files say ran."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import nets
import pconv
from pconv import CalibrationConfig, ConfigError
from pconv.calibration import CALIBRATIONS
from pconv.config import AUTO_FIT_MAX_T, DEFAULT_ENCODING_LEVELS, DEFAULT_METHOD, DEFAULT_POPULATION_BUDGET
from pconv.files.format import read_metadata


def test_defaults_come_from_one_place():
    config = CalibrationConfig()
    assert config.method == DEFAULT_METHOD and config.encoding_levels == DEFAULT_ENCODING_LEVELS
    assert config.population_budget == DEFAULT_POPULATION_BUDGET and str(config.threshold) == "max"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method = "fit"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(time_steps=[]), "no T given"),
    (dict(time_steps=[0]), "between 1 and"),
    (dict(method="fitt"), "did you mean 'fit'"),
    (dict(threshold="percentile:200"), "percentile"),
    (dict(encoding_levels=-1), "encoding levels"),
    (dict(population_budget=True), "population budget"),
    (dict(bins=3), "histogram bins"),
])
def test_bad_choices_are_refused_once(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        CalibrationConfig(**kwargs)


def test_auto_resolves_per_T_and_other_methods_do_not():
    auto = CalibrationConfig(time_steps=(4, AUTO_FIT_MAX_T, 2 * AUTO_FIT_MAX_T), threshold="percentile:99.9")
    assert AUTO_FIT_MAX_T == 32
    assert {T: str(step) for T, step in auto.plan.items()} == {4: "percentile:99.9/fit", 32: "percentile:99.9/fit",
                                                               64: "mse/none"}
    assert auto.needs_histogram
    fit = CalibrationConfig(time_steps=(4, 16), method="fit")
    assert {str(step) for step in fit.plan.values()} == {"max/fit"} and not fit.needs_histogram


def test_round_trip_through_a_dict():
    config = CalibrationConfig(time_steps=(8, 4), threshold="mse", method="refit", encoding_levels=32,
                               population_budget=0.25)
    assert config.time_steps == (4, 8)
    again = CalibrationConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ConfigError):
        CalibrationConfig.from_dict({**config.to_dict(), "version": 99})
    with pytest.raises(ConfigError):
        CalibrationConfig.from_dict({"method": "fit"})


def test_every_registered_method_describes_itself():
    for name in CALIBRATIONS.names():
        method = CALIBRATIONS.get(name)
        assert method.name == name and method.summary and callable(method.run)


def test_an_snn_file_says_what_ran_at_its_T(tmp_path):
    """With auto, T=64 runs the mse threshold and no calibration: the file and its config say so."""
    model = nets.vgg_small()
    model.pconv_source = pconv.ModelSource("factory", "nets:vgg_small")
    images = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    calibration = pconv.calibrate(model, images, time_steps=[4, 64], population_budget=0)
    snn64 = pconv.save(pconv.convert(model, calibration, 64), tmp_path / "t64.safetensors")
    snn4 = pconv.save(pconv.convert(model, calibration, 4), tmp_path / "t4.safetensors")
    calib = pconv.save_calibration(calibration, tmp_path / "c.safetensors")
    meta64, meta4, metac = (read_metadata(p)[0] for p in (snn64, snn4, calib))
    assert (meta64.threshold, meta64.method) == ("mse", "none")
    assert (meta4.threshold, meta4.method) == ("max", "fit")
    assert meta64.config == meta4.config == metac.config == calibration.config
    assert (metac.threshold, metac.method) == ("max", "auto")  # a calibration file: the configured choices
    assert pconv.load_calibration(calib).config == calibration.config


def test_choices_as_fields_or_as_a_config_not_both():
    images = [torch.randn(4, 3, 32, 32)]
    config = CalibrationConfig(time_steps=(4,), method="none", population_budget=0)
    a = pconv.calibrate(nets.vgg_small(), images, config)
    b = pconv.calibrate(nets.vgg_small(), images, time_steps=[4], method="none", population_budget=0)
    assert a.config == b.config
    assert all(torch.equal(a.params[4][n].theta, b.params[4][n].theta) for n in a.params[4])
    with pytest.raises(ConfigError, match="not both"):
        pconv.calibrate(nets.vgg_small(), images, config, method="fit")
