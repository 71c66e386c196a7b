"""Issue 4: the default method's accuracy on real checkpoints at T = 4, 8, 16, 32, against the ANN and against
the paper's method, on the splits of bench/accuracy.py (docs/accuracy.md).

The floors sit 1.5 points below the figures measured with bench/accuracy.py (1,000 test images: one image is
0.1 point, and a change of summation order, e.g. 1 vs 2 threads, moves a few borderline images), so a real
regression fails while float noise does not. Skipped with a reason when ../shared/data is absent.
"""

import pytest
import torch

import pconv
import realdata
from pconv.config import DEFAULT_ENCODING_LEVELS, DEFAULT_METHOD, DEFAULT_POPULATION_BUDGET, DEFAULT_THRESHOLD

STEPS = [4, 8, 16, 32]
# measured (docs/accuracy.md, max/auto, 64 encoding levels, population budget 0.5, every site's population
# size chosen, the encoding site's included, 2026-12-04; fit at T = 16 and 32 since 2026-12-05): 90.2 / 90.0 /
# 90.2 / 90.7 against the ANN's 90.4; 90.5 / 89.9 / 90.4 / 90.0 when fit searched 32,768 positions per channel
# (2026-12-05, night: which positions were drawn moved ResNet-20 by a few tenths either way); 89.5 / 90.8 /
# 90.8 / 90.3 since fit searches a histogram of every position (2026-12-05, evening)
RESNET20_FLOOR = {4: 88.0, 8: 89.3, 16: 89.3, 32: 88.8}
# KL(ANN || SNN) at T=4 measured 0.087 with the stem's population chosen too, 0.190 when the stem took
# ceil(64/T) = 16 neurons per channel outright, 0.32-0.35 when every chosen site had 16: the bound fails if
# the choice falls back to either
RESNET20_T4_KL = 0.13
# the paper's method (max/da, one neuron per channel) measured 64.0 / 84.6 / 89.3 / 91.0
PAPER_T4_MARGIN = 15.0
# the snntoolbox CIFAR-10 CNN, which pconv's methods were not chosen on: 83.7 / 83.8 / 83.7 / 83.4 (ANN 82.9;
# 2026-12-04 and, fit at T = 16 and 32, 2026-12-05; KL 0.002 / 0.002 / 0.001 / 0.001); 83.6 / 83.3 / 83.6 / 83.4
# with 32,768 positions per channel, the same KL; 83.7 / 83.5 / 83.2 / 83.6 with fit's histogram of every
# position (2026-12-05, evening), the same KL
CNN_FLOOR = {4: 82.2, 8: 82.0, 16: 81.7, 32: 82.1}
# KL(ANN || SNN) of ResNet-20 at T=16 measured 0.024 with the budget, 0.036 without it (fit at T=16, 2026-12-05;
# 0.045 without it when T=16 ran the mse thresholds)
BUDGET_KL_RATIO = 0.8


def load(name, tmp_path_factory):
    model = realdata.load_zoo_model(name)
    calib, test = realdata.cifar10_split(tmp_path_factory.mktemp(name), model)
    return model, calib, test


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory):
    return load("cifar10_resnet20_akamaster", tmp_path_factory)


def default_accuracy(model, calib, test):
    calibration = pconv.calibrate(model, calib, time_steps=STEPS)
    return calibration, {T: realdata.top1(pconv.convert(model, calibration, time_steps=T), test) for T in STEPS}


@pytest.mark.slow
def test_default_method_holds_its_measured_accuracy(resnet20):
    model, calib, test = resnet20
    assert (DEFAULT_THRESHOLD, DEFAULT_METHOD, DEFAULT_ENCODING_LEVELS, DEFAULT_POPULATION_BUDGET) == \
        ("max", "auto", 64, 0.5)
    calibration, accs = default_accuracy(model, calib, test)
    assert {T: str(step) for T, step in calibration.config.plan.items()} == {T: "max/fit" for T in STEPS}
    assert calibration.provenance["fit_images"] == 1000
    # the stem's population is chosen with the rest (4 at T=8 and 4 at T=4 measured), not ceil(64/T) outright
    assert calibration.populations(8)["relu"] == calibration.populated[8]["relu"] < 8
    assert calibration.populated[4]["relu"] < 16
    ann = realdata.top1(model, test)
    assert ann == 90.4
    print(f"ResNet-20 default: ANN {ann:.1f}, SNN " + ", ".join(f"T={T} {a:.1f}" for T, a in accs.items()))
    for T in STEPS:
        assert accs[T] >= RESNET20_FLOOR[T], f"T={T}: {accs[T]:.1f} < {RESNET20_FLOOR[T]}"
    assert any(m < 16 for m in calibration.populated[4].values()), "the budget gives smaller populations too"
    kl = kl_from_ann(model, pconv.convert(model, calibration, time_steps=4), test)
    assert kl <= RESNET20_T4_KL, f"KL(ANN || SNN) at T=4: {kl:.3f} > {RESNET20_T4_KL}"
    paper = pconv.calibrate(model, calib, time_steps=[4], threshold="max", method="da", encoding_levels=0)
    paper_t4 = realdata.top1(pconv.convert(model, paper, time_steps=4), test)
    assert accs[4] >= paper_t4 + PAPER_T4_MARGIN, f"default {accs[4]:.1f} vs paper {paper_t4:.1f} at T=4"


@pytest.mark.slow
def test_population_coding_of_the_stem_pays_at_low_t(resnet20):
    """The same `fit` at T=4 with one neuron per stem channel measured 82.3 against 85.1 with eight (80.5
    before the search sampled every image alike)."""
    model, calib, test = resnet20
    plain = pconv.calibrate(model, calib, time_steps=[4], method="fit", encoding_levels=0, population_budget=0)
    coded = pconv.calibrate(model, calib, time_steps=[4], method="fit", population_budget=0)
    plain_acc = realdata.top1(pconv.convert(model, plain, time_steps=4), test)
    coded_acc = realdata.top1(pconv.convert(model, coded, time_steps=4), test)
    assert coded_acc >= plain_acc + 2.0, f"population {coded_acc:.1f} vs one neuron {plain_acc:.1f}"


def kl_from_ann(model, snn, test) -> float:
    """Mean KL(ANN || SNN) of the softmax outputs: label-free, and far steadier than a top-1 difference."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, _ in test:
            p, q = model(x).log_softmax(dim=1), snn(x).log_softmax(dim=1)
            total += (p.exp() * (p - q)).sum().item()
            count += x.shape[0]
    return total / count


@pytest.mark.slow
def test_population_budget_brings_the_snn_closer_to_the_ann(resnet20):
    model, calib, test = resnet20
    kl = {}
    for budget in (0.0, DEFAULT_POPULATION_BUDGET):
        calibration = pconv.calibrate(model, calib, time_steps=[16], population_budget=budget)
        kl[budget] = kl_from_ann(model, pconv.convert(model, calibration, time_steps=16), test)
        assert bool(calibration.populated) == (budget > 0)
    assert kl[DEFAULT_POPULATION_BUDGET] <= BUDGET_KL_RATIO * kl[0.0], kl


@pytest.mark.slow
def test_default_method_on_a_model_it_was_not_chosen_on(tmp_path_factory):
    model, calib, test = load("cifar10_avgpool_cnn_snntoolbox", tmp_path_factory)
    _, accs = default_accuracy(model, calib, test)
    assert realdata.top1(model, test) == 82.9
    for T in STEPS:
        assert accs[T] >= CNN_FLOOR[T], f"T={T}: {accs[T]:.1f} < {CNN_FLOOR[T]}"


# one neuron per channel (the paper's network) with recon, default 300 steps, at T=8: measured 89.9 and 88.3 (ANN
# 90.4) in two runs that differ only by float rounding, KL(ANN || SNN) 0.133 and 0.137 against fit's 0.180, at
# 0.221x the ANN's energy per image (docs/accuracy.md); with QDrop (2026-12-02) 89.2, KL 0.135, at 0.206x.
# Top-1 on 1,000 images moves by a point with rounding, so the floor only catches a broken method; the KL bound
# is what tells recon from fit.
RECON_T8_FLOOR = 87.5
RECON_KL_RATIO = 0.9
RECON_T8_ENERGY_RATIO = 0.25


def _kl(ann_logits, snn_logits):
    ann, snn = ann_logits.log_softmax(dim=1), snn_logits.log_softmax(dim=1)
    return float((ann.exp() * (ann - snn)).sum(dim=1).mean())


def _logits(net, test):
    with torch.inference_mode():
        return torch.cat([net(x).float() for x, _ in test])


@pytest.mark.slow
def test_recon_with_one_neuron_per_channel_at_t8_is_close_to_the_ann_at_a_fifth_of_its_energy(resnet20):
    from pconv.measure.evaluate import evaluate

    model, calib, test = resnet20
    one = dict(time_steps=[8], threshold="max", encoding_levels=0, population_budget=0)
    recon = pconv.convert(model, pconv.calibrate(model, calib, method="recon", **one), time_steps=8)
    fit = pconv.convert(model, pconv.calibrate(model, calib, method="fit", **one), time_steps=8)
    accuracy = realdata.top1(recon, test)
    assert accuracy >= RECON_T8_FLOOR, f"{accuracy:.1f} < {RECON_T8_FLOOR}"
    ann = _logits(model, test)
    kl_recon, kl_fit = _kl(ann, _logits(recon, test)), _kl(ann, _logits(fit, test))
    assert kl_recon <= RECON_KL_RATIO * kl_fit, (kl_recon, kl_fit)
    x, y = test[0]
    cost = evaluate(recon, [(x[:50], y[:50])], sop_images=50, warmup=False).to_dict()
    assert cost["energy_ratio"] <= RECON_T8_ENERGY_RATIO, cost["energy_ratio"]
