"""How many neurons each site has: the one rule, read by the calibration, the SNN, the files and inspect.

A population of m neurons per channel gives a site m*T levels (functional.population_count); no site has
more than ceil(encoding_levels / T) (with encoding_levels <= T, T alone resolves the levels and every site
has one). Under a neuron budget the calibration chooses each site's m, the encoding sites' (no spiking neuron
between them and the image) included; a site it chose has that m. Without a choice (no budget, or a file
written before format version 6 for an encoding site) an encoding site has ceil(encoding_levels / T) and a
hidden site one.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..observe.sites import Site


def population_size(time_steps: int, encoding_levels: int) -> int:
    """Neurons per channel of a population-coded site: ceil(levels/T), or 1 when T alone resolves the levels."""
    return 1 if encoding_levels <= time_steps else -(-encoding_levels // time_steps)


def populations(sites: Iterable[Site], time_steps: int, encoding_levels: int,
                chosen: Mapping[str, int] | None = None) -> dict[str, int]:
    """Neurons per channel of every site at T: its `chosen` size if the calibration chose one, else the
    encoding sites' population size for a site that encodes the image and 1 for a hidden site."""
    size, chosen = population_size(time_steps, encoding_levels), chosen or {}
    return {s.name: chosen.get(s.name, size if s.encoding else 1) for s in sites}
