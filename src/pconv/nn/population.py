"""How many neurons each site has: the one rule, read by the calibration, the SNN, the files and inspect.

A population-coded site has m = ceil(encoding_levels / T) neurons per channel (functional.population_count);
the sites that are population-coded are the encoding sites (no spiking neuron between them and the image)
and the hidden sites the calibration chose under its neuron budget. Every other site has one. With
encoding_levels <= T, T alone resolves the levels, and every site has one.
"""

from __future__ import annotations

from typing import Collection, Iterable

from ..observe.sites import Site


def population_size(time_steps: int, encoding_levels: int) -> int:
    """Neurons per channel of a population-coded site: ceil(levels/T), or 1 when T alone resolves the levels."""
    return 1 if encoding_levels <= time_steps else -(-encoding_levels // time_steps)


def populations(sites: Iterable[Site], time_steps: int, encoding_levels: int,
                chosen: Collection[str] = ()) -> dict[str, int]:
    """Neurons per channel of every site at T: population-coded if it encodes the image or is in `chosen`."""
    size = population_size(time_steps, encoding_levels)
    return {s.name: size if s.encoding or s.name in chosen else 1 for s in sites}
