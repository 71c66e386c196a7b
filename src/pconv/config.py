"""The defaults of every choice pconv makes, and the checks of the values a user gives, in one place.

The choices themselves travel together in `pconv.calibration.CalibrationConfig`; this module is the
bottom layer it (and the command line) take their defaults and validators from.
"""

from __future__ import annotations

from typing import Any, Iterable

from .errors import ConfigError

#: Largest T accepted: beyond this the point of few-step conversion is lost and the spike engine explodes.
MAX_TIME_STEPS = 4096

DEFAULT_THRESHOLD = "max"
DEFAULT_METHOD = "auto"
#: `auto` runs `fit` (on the --threshold values) up to this T, and the mse threshold without shifts above it.
#: docs/accuracy.md: `fit` gains most at low T, and up to T=32 it lowers the KL divergence from the ANN by about a
#: third on the two ImageNet models pconv was not tuned on (EfficientNet-Lite1/2) and matches `mse` on the others;
#: no T above 32 was measured, so there the mse threshold stays (it costs seconds where `fit` costs minutes).
AUTO_FIT_MAX_T = 32
#: Encoding sites (no neuron between them and the image) resolve at least this many levels at any T,
#: with ceil(levels/T) neurons per channel (nn.population); 0 turns population coding off.
DEFAULT_ENCODING_LEVELS = 64
#: Hidden sites may be population-coded too (as many neurons per channel as the encoding sites), the most
#: sensitive ones first, while the added neurons stay within this fraction of the network's.
DEFAULT_POPULATION_BUDGET = 0.5
#: The last this fraction of the activation sites (in network order, at least one) get an overflow neuron per
#: channel: up to T more levels above the site's top one, for what unseen images bring above the range the
#: calibration images set (docs/accuracy.md). By default only with population coding on (encoding levels and a
#: population budget above 0): --encoding-levels 0 --population-budget 0 stays one neuron per channel.
DEFAULT_OVERFLOW_SITES = 0.25
#: Histogram resolution: percentile and error-minimising thresholds are exact to max/BINS.
DEFAULT_BINS = 2048
#: Adam steps per block of the `recon` method (docs/accuracy.md: the gain against calibration time).
DEFAULT_RECON_STEPS = 300
MAX_RECON_STEPS = 100_000
#: QDrop's probability (Wei et al., ICLR 2022, their 0.5) that `recon` passes an activation of the block it
#: trains unrounded: measured on ResNet-20 with the default populations against no dropping, KL(ANN || SNN)
#: 0.240 / 0.096 against 0.321 / 0.090 at T = 4 / 8; a little worse on the small unseen CNNs (docs/accuracy.md).
DEFAULT_RECON_DROP = 0.5
DEFAULT_T = 8
#: Calibration images the CLI takes from a folder when --num-images is not given (all of them, up to this).
DEFAULT_CALIBRATION_IMAGES = 512


def check_time_steps(time_steps: Any) -> int:
    if isinstance(time_steps, bool) or not isinstance(time_steps, int):
        raise ConfigError(f"T must be an integer, got {time_steps!r}", "for example T=8")
    if not 1 <= time_steps <= MAX_TIME_STEPS:
        raise ConfigError(f"T must be between 1 and {MAX_TIME_STEPS}, got {time_steps}", "typical values are 4 to 32")
    return time_steps


def check_time_step_list(time_steps: int | Iterable[int]) -> list[int]:
    """One T or several: sorted, distinct, each checked."""
    steps = [time_steps] if isinstance(time_steps, int) else list(time_steps)
    if not steps:
        raise ConfigError("no T given", "for example time_steps=[4, 8, 16]")
    return sorted({check_time_steps(t) for t in steps})


def check_encoding_levels(levels: Any) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels <= MAX_TIME_STEPS:
        raise ConfigError(f"encoding levels must be an integer between 0 and {MAX_TIME_STEPS}, got {levels!r}",
                          f"for example {DEFAULT_ENCODING_LEVELS}, or 0 for one neuron per channel everywhere")
    return levels


def check_population_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= float(budget) <= 100.0:
        raise ConfigError(f"the population budget must be a number between 0 and 100, got {budget!r}",
                          "it is the fraction of extra neurons allowed, for example 0.25; 0 turns it off")
    return float(budget)


def check_overflow_sites(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) <= 1.0:
        raise ConfigError(f"the overflow sites must be a fraction from 0 to 1, got {fraction!r}",
                          f"for example {DEFAULT_OVERFLOW_SITES} (the last quarter of the sites); 0 turns them off")
    return float(fraction)


def default_overflow_sites(encoding_levels: int, population_budget: float) -> float:
    """DEFAULT_OVERFLOW_SITES with population coding on, else 0 (one neuron per channel everywhere)."""
    return DEFAULT_OVERFLOW_SITES if encoding_levels > 0 and population_budget > 0 else 0.0


def check_recon_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_RECON_STEPS:
        raise ConfigError(f"recon steps must be an integer between 0 and {MAX_RECON_STEPS}, got {steps!r}",
                          f"for example {DEFAULT_RECON_STEPS}")
    return steps


def check_recon_drop(drop: Any) -> float:
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= float(drop) <= 1.0:
        raise ConfigError(f"the recon drop probability must be a number from 0 to 1, got {drop!r}",
                          f"for example {DEFAULT_RECON_DROP}; 0 trains every block on rounded activations only")
    return float(drop)


def check_bins(bins: Any) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or not 16 <= bins <= 1 << 16:
        raise ConfigError(f"histogram bins must be an integer from 16 to 65536, got {bins!r}",
                          f"for example {DEFAULT_BINS}")
    return bins
