"""How many neurons each site has: the one rule, read by the calibration, the SNN, the files and inspect.

The encoding sites (no spiking neuron between them and the image) have m = ceil(encoding_levels / T) neurons
per channel (functional.population_count); with encoding_levels <= T, T alone resolves the levels and they
have one. The hidden sites the calibration chose under its neuron budget have the m it chose for each (at
most the encoding sites' m); every other site has one.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..observe.sites import Site


def population_size(time_steps: int, encoding_levels: int) -> int:
    """Neurons per channel of a population-coded site: ceil(levels/T), or 1 when T alone resolves the levels."""
    return 1 if encoding_levels <= time_steps else -(-encoding_levels // time_steps)


def populations(sites: Iterable[Site], time_steps: int, encoding_levels: int,
                chosen: Mapping[str, int] | None = None) -> dict[str, int]:
    """Neurons per channel of every site at T: the encoding sites' population size if it encodes the image,
    its `chosen` size if it is a hidden site the calibration chose, else 1."""
    size, chosen = population_size(time_steps, encoding_levels), chosen or {}
    return {s.name: size if s.encoding else chosen.get(s.name, 1) for s in sites}
