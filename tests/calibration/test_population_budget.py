"""Population coding of every site, the encoding sites included, under a neuron budget
(calibration/population.py, docs/math.md §3c).

The choice is a greedy knapsack on a label-free first-order estimate; these tests check the estimate
against the change it predicts, the choice against its definition, and that a chosen site is a population
in every engine and survives both file kinds.
"""

import copy

import pytest
import torch
from torch import nn

import nets
import pconv
from pconv.nn import functional as PF
from pconv.errors import ConfigError
from pconv.calibration.population import choose_populated, population_choices, site_sensitivity
from pconv.observe.sites import Site, find_sites
from test_pipeline import qcfs_network
from crafted import assert_refused, snn_file_with_metadata


def _site(name: str, encoding: bool = False) -> Site:
    return Site(name, "relu", 4, 4, None, encoding)


def test_population_choices_are_the_geometric_sizes_up_to_the_largest():
    assert population_choices(1) == [1]
    assert population_choices(4) == [1, 2, 3, 4]
    assert population_choices(16) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert population_choices(22) == [1, 2, 3, 4, 6, 8, 12, 16, 22]


def test_choice_takes_the_best_gain_per_added_neuron_step_by_step_within_the_pool():
    sites = [_site("stem", encoding=True), _site("a"), _site("b"), _site("c"), _site("d")]
    neurons = {"stem": 100, "a": 100, "b": 400, "c": 100, "d": 300}  # 1,000 neurons in all
    T, largest = 8, 4  # m = 1, 2, 3, 4: 8, 16, 24, 32 levels
    # without a budget the stem would take largest - 1 = 3 more neurons per channel: a pool of 300 neurons
    sens = {}
    for name, at in {"a": (3.0, 0.75, 0.33, 0.19),   # per added neuron: 1->2 0.0225, then 2->3 0.0042
                     "b": (6.0, 1.5, 0.67, 0.375),   # 1->2 0.01125 (400 neurons), 2->3 0.0021
                     "c": (1.2, 0.3, 0.13, 0.075),   # 1->2 0.009, 2->3 0.0017
                     "d": (0.5, 0.6, 0.6, 0.6)}.items():  # no gain: never chosen
        sens.update({(name, m * T): s for m, s in zip((1, 2, 3, 4), at)})

    def choose(budget, top=largest, stem=(9.0, 9.0, 9.0, 9.0)):  # by default the stem gains nothing
        sens.update({("stem", m * T): s for m, s in zip((1, 2, 3, 4), stem)})
        chosen = choose_populated(sites, sens, neurons, T, top, budget)
        if chosen:  # the pool is never overdrawn
            assert sum((m - 1) * neurons[n] for n, m in chosen.items()) <= budget * 1000 + (top - 1) * 100
        return chosen

    assert choose(0.0) == {}  # no budget, no choice: the stem keeps `largest`
    # the stem's 300 neurons go where they gain most, the stem itself listed with its one neuron
    assert choose(0.01) == {"stem": 1, "a": 3, "c": 2}  # b's step (400) does not fit; a deepens after c
    assert choose(0.3) == {"stem": 1, "a": 2, "b": 2, "c": 2}  # b (0.01125) before c (0.009); a's next is 700
    assert choose(0.4) == {"stem": 1, "a": 3, "b": 2, "c": 2}
    assert choose(10.0) == {"stem": 1, "a": 4, "b": 4, "c": 4}  # every gaining step, never beyond the largest
    assert choose(10.0, top=2) == {"stem": 1, "a": 2, "b": 2, "c": 2}
    assert choose(10.0, top=1) == {}  # no population at this T
    # a sensitive stem competes like any site: 1->2 gains 0.06 per neuron (first), 2->3 0.01 (after a's 0.0225,
    # before c's 0.009); 2->4 gains 0.01 too, and a tie goes to the smaller m
    assert choose(0.01, stem=(8.0, 2.0, 1.0, 0.0)) == {"stem": 3, "a": 2}


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(8, 5)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_sensitivity_predicts_the_change_of_the_predicted_class_log_probability():
    model = _Tiny().double().eval()
    images = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sites = find_sites(model, images[:1])
    channel_max = {}
    for s in sites:
        seen = []
        h = model.get_submodule(s.name).register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            model(images)
        h.remove()
        channel_max[s.name] = seen[0].transpose(0, 1).flatten(1).amax(dim=1)
    levels = 64
    sens, neurons = site_sensitivity(model, sites, channel_max, [images], [4, levels], budget=2**30)
    assert neurons == {"act1": 8 * 64, "act2": 8 * 64}
    with torch.no_grad():
        ann = model(images).log_softmax(dim=1)
        own = ann.argmax(dim=1, keepdim=True)
    for s in sites:
        # quantize this one site, and measure how the predicted class's log-probability really moves
        qnet = copy.deepcopy(model)
        theta = channel_max[s.name]
        zero = torch.zeros_like(theta)
        qnet.get_submodule(s.name).forward = lambda x: PF.qcfs(x, theta, zero, zero, levels)
        with torch.no_grad():
            moved = (qnet(images).log_softmax(dim=1) - ann).gather(1, own)
        actual = (moved ** 2).mean().item()
        assert actual > 0
        assert sens[(s.name, levels)] == pytest.approx(actual, rel=0.2)  # first order, small error
        assert sens[(s.name, 4)] > 4 * sens[(s.name, levels)]  # fewer levels, much larger error


def test_a_budget_population_codes_hidden_sites_in_every_engine_and_file(tmp_path):
    model = nets.vgg_small().eval()
    model.pconv_source = pconv.ModelSource("factory", "nets:vgg_small")
    images = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    calibration = pconv.calibrate(model, images, time_steps=[16, 64], method="none", population_budget=1.0)
    chosen = calibration.populated[16]
    assert 1 <= chosen.pop("features.2") <= 4  # the encoding site: its size is chosen too, and always listed
    assert chosen and all(2 <= m <= 4 for m in chosen.values())  # hidden sites: only those with a population
    assert 64 not in calibration.populated  # at T >= 64 levels there is no population to give
    assert calibration.provenance["population_budget"] == 1.0
    chosen = calibration.populated[16]
    name = next(n for n in chosen if n != "features.2")
    assert calibration.populations(16)[name] == chosen[name]
    again = pconv.load_calibration(pconv.save_calibration(calibration, tmp_path / "c.safetensors"))
    assert again.populated == calibration.populated
    snn = pconv.convert(model, again, time_steps=16)
    assert snn.info.populated == chosen and snn.neurons()[name].population == chosen[name]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        counts = snn(x)
        assert torch.equal(counts, qcfs_network(model, again, 16)(x))  # the QCFS network, bit for bit
        loaded = pconv.load(pconv.save(snn, tmp_path / "s.safetensors"), trust_factory=True)
        assert loaded.info.populated == chosen and torch.equal(loaded(x), counts)
    snn.set_engine("spikes")
    with torch.inference_mode():
        torch.testing.assert_close(snn(x), counts, rtol=1e-5, atol=1e-5)


def test_no_budget_changes_nothing_and_bad_budgets_are_refused():
    model = nets.vgg_small().eval()
    images = [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))]
    plain = pconv.calibrate(model, images, time_steps=[4], method="none", population_budget=0)
    assert plain.populated == {} and "population_budget" not in plain.provenance
    for bad in (-0.1, True, "0.5", 101):
        with pytest.raises(ConfigError, match="population budget"):
            pconv.calibrate(model, images, time_steps=[4], population_budget=bad)


@pytest.mark.parametrize("entry", ['["features.6"]', "{not json", '{"4": 2}', '{"no_such_site": 2}',
                                   '{"features.2": 0}', '{"features.2": 17}', '{"features.6": 1}',
                                   '{"features.6": 17}', '{"features.6": true}', '{"features.6": 2.0}'])
def test_a_corrupt_populated_entry_is_refused(tmp_path, entry):
    # a version-6 SNN file at T=4: the encoding site features.2 with 1 to 16 neurons per channel, hidden sites
    # with 2 to 16
    assert_refused(snn_file_with_metadata(tmp_path, "populated", entry), "populated")


def test_a_version_4_list_gives_each_listed_site_the_encoding_population(tmp_path):
    for folder in ("v4", "v4map", "v5", "v5stem", "v6"):
        (tmp_path / folder).mkdir()
    old = snn_file_with_metadata(tmp_path / "v4", "populated", '["features.6"]', {"pconv.format_version": "4"})
    snn = pconv.load(old, trust_factory=True)
    assert snn.info.populated == {"features.6": 16} and snn.neurons()["features.6"].population == 16
    assert snn.neurons()["features.2"].population == 16  # an encoding site not listed: ceil(64/T)
    assert_refused(snn_file_with_metadata(tmp_path / "v4map", "populated", '{"features.6": 2}',
                                          {"pconv.format_version": "4"}),
                   "populated")
    given = pconv.load(snn_file_with_metadata(tmp_path / "v5", "populated", '{"features.6": 3}',
                                              {"pconv.format_version": "5"}), trust_factory=True)
    assert given.neurons()["features.6"].population == 3 and given.neurons()["features.9"].population == 1
    assert given.neurons()["features.2"].population == 16
    # before version 6 an encoding site is never listed; since, its listed size is the one it has
    assert_refused(snn_file_with_metadata(tmp_path / "v5stem", "populated", '{"features.2": 3}',
                                          {"pconv.format_version": "5"}),
                   "populated")
    chosen = pconv.load(snn_file_with_metadata(tmp_path / "v6", "populated", '{"features.2": 1, "features.6": 3}'),
                        trust_factory=True)
    assert [chosen.neurons()[n].population for n in ("features.2", "features.6", "features.9")] == [1, 3, 1]
