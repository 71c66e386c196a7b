"""The whole pipeline on small seeded networks: engines, DA calibration, export round trips, API errors."""

import copy

import pytest
import torch

import nets
import pconv
from pconv.models import replace_weights
from pconv import ConfigError, DataError, OutputExistsError
from pconv.calibration import CALIBRATIONS
from pconv.nn.qcfs import QCFSMode, quantize

NETS = {
    "timm_test_resnet": lambda: nets.timm_resnet(),
    "vgg_small": lambda: nets.vgg_small(),
    "concat_net": lambda: nets.concat_net(),
}


def calib_batches(n=3, b=8, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(n)]


def qcfs_network(model, calibration, T):
    """The DA-QCFS network built independently of the SNN: the same thresholds and shifts in QCFS modules,
    and the same refitted layers."""
    qnet = copy.deepcopy(model)
    replace_weights(qnet, calibration.weights.get(T, {}))
    params = calibration.params[T]
    modules = quantize(qnet, calibration.sites, {n: p.theta for n, p in params.items()}, T,
                       calibration.populations(T), calibration.overflow)
    for name, module in modules.items():
        module.delta_in.copy_(params[name].delta_in)
        module.delta_out.copy_(params[name].delta_out)
    return qnet


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("T", [4, 16])
def test_spike_domain_snn_equals_da_qcfs_network(name, T):
    model = NETS[name]().double()
    calibration = pconv.calibrate(model, [b.double() for b in calib_batches()], time_steps=[T],
                                  threshold="percentile:99.9")
    for p in calibration.params[T].values():  # float64 parameters everywhere: ties cannot flip
        p.theta, p.delta_in, p.delta_out = p.theta.double(), p.delta_in.double(), p.delta_out.double()
    snn = pconv.pipeline.build_snn(model, calibration, T)
    qnet = qcfs_network(model, calibration, T).double()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.inference_mode():
        reference = qnet(x)
        counts = snn.set_engine("counts")(x)
        steps = snn.set_engine("spikes").forward_steps(x)
        spikes = snn(x)
    assert torch.equal(counts, reference)  # the count engine is the QCFS network, bit for bit
    assert torch.allclose(spikes, reference, atol=1e-9, rtol=0)
    assert steps.shape == (T, 6, 10)
    assert torch.allclose(steps.mean(0), spikes, atol=1e-12, rtol=0)
    assert reference.std() > 0.01  # not a degenerate network


def test_da_calibration_matches_exact_means():
    """Each site's delta_in is the exact mean of (x_ref - x_q) given its calibrated predecessors, and
    delta_out the exact mean of (y_ref - y_q) before the amplitude moved."""
    model = nets.vgg_small().double()
    batches = [b.double() for b in calib_batches(n=2)]
    T = 4
    calibration = pconv.calibrate(model, batches, time_steps=[T], threshold="max", method="da")
    params = calibration.params[T]
    qnet = qcfs_network(model, calibration, T)
    ref = qcfs_network(model, calibration, T)
    captured = {}
    for net, tag in ((qnet, "q"), (ref, "ref")):
        for site in calibration.sites:
            module = net.get_submodule(site.name)
            if tag == "ref":
                module.mode = QCFSMode.CLIP

            def tap(x, y, key=(tag, site.name), module=module):
                # y with delta_out = 0, as seen during calibration
                y0 = pconv.nn.functional.qcfs(x, module.theta, module.delta_in, torch.zeros_like(module.delta_out),
                                           module.levels, population=module.population, overflow=module.overflow,
                                           cap=module.cap) \
                    if module.mode is QCFSMode.QUANT else y
                captured.setdefault(key, []).append((x.clone(), y0.clone()))

            module.tap = tap
    with torch.inference_mode():
        for x in batches:
            qnet(x)
            ref(x)
    nonzero = 0
    for site in calibration.sites:
        xq = torch.cat([x for x, _ in captured[("q", site.name)]]).transpose(0, 1).flatten(1)
        yq = torch.cat([y for _, y in captured[("q", site.name)]]).transpose(0, 1).flatten(1)
        xr = torch.cat([x for x, _ in captured[("ref", site.name)]]).transpose(0, 1).flatten(1)
        yr = torch.cat([y for _, y in captured[("ref", site.name)]]).transpose(0, 1).flatten(1)
        p = params[site.name]
        assert torch.allclose((xr - xq).mean(1), p.delta_in.double(), atol=1e-6, rtol=0)
        floor = p.theta.double() * (1e-3 - 1)
        assert torch.allclose(torch.maximum((yr - yq).mean(1), floor), p.delta_out.double(), atol=1e-6, rtol=0)
        nonzero += int((p.delta_in != 0).any())
    assert torch.equal(params[calibration.sites[0].name].delta_in, torch.zeros(16))  # nothing quantized before it
    assert nonzero >= 3


def test_calibration_methods_registry():
    assert {"none", "da"} <= set(CALIBRATIONS.names())
    model = nets.vgg_small()
    plain = pconv.calibrate(model, calib_batches(n=1), time_steps=[4], method="none")
    assert all(torch.equal(p.delta_in, torch.zeros_like(p.delta_in)) for p in plain.params[4].values())


def test_convert_accepts_pairs_generators_and_num_images():
    model = nets.vgg_small()
    pairs = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib_batches(n=3)]
    snn = pconv.convert(model, iter(pairs), time_steps=8, num_images=20)
    assert snn.info.provenance["num_images"] == 20
    assert snn.time_steps == 8 and snn.info.neuron == "parallel"
    assert snn(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convert_does_not_modify_the_source_model():
    model = nets.vgg_small()
    before = copy.deepcopy(model.state_dict())
    modules_before = [type(m) for m in model.modules()]
    pconv.convert(model, calib_batches(n=1), time_steps=4)
    assert [type(m) for m in model.modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_to_ann_gives_back_the_source_network():
    model = nets.timm_resnet()
    snn = pconv.convert(model, calib_batches(n=1), time_steps=4)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(snn.to_ann()(x), model(x))


def test_serial_baseline_shares_parameters():
    model = nets.vgg_small()
    snn = pconv.convert(model, calib_batches(n=1), time_steps=8)
    serial = snn.with_neuron("serial")
    assert serial.engine == "spikes" and serial.info.neuron == "serial"
    for name, n in serial.neurons().items():
        assert torch.equal(n.bias, snn.neurons()[name].bias)
    with pytest.raises(ConfigError):
        serial.set_engine("counts")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        out_serial, out_parallel = serial(x), snn(x)
    assert out_serial.shape == out_parallel.shape
    assert not torch.equal(out_serial, out_parallel)  # time-varying inputs: the classic conversion error


@pytest.mark.parametrize("bad", [0, -1, 5000, 2.5, "8", True])
def test_bad_time_steps(bad):
    with pytest.raises(ConfigError, match="T must"):
        pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=bad)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ConfigError, match="did you mean 'serial'"):
        pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=4, neuron="seriall")
    with pytest.raises(ConfigError, match="did you mean 'da'"):
        pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=4, method="daa")
    with pytest.raises(ConfigError, match="unknown engine"):
        pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=4).set_engine("gpu")


def test_empty_or_short_calibration_data():
    with pytest.raises(DataError, match="no calibration images"):
        pconv.convert(nets.vgg_small(), [], time_steps=4)
    with pytest.raises(DataError, match="only 8 are available"):
        pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=4, num_images=9)


def test_calibration_for_several_T_and_missing_T():
    model = nets.vgg_small()
    calibration = pconv.calibrate(model, calib_batches(n=1), time_steps=[8, 4, 4])
    assert calibration.time_steps == [4, 8]
    with pytest.raises(ConfigError, match="no parameters for T=16"):
        pconv.convert(model, calibration, time_steps=16)
    assert pconv.convert(model, calibration, time_steps=8).time_steps == 8


# --- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [nets.timm_resnet, nets.vgg_small], ids=["timm", "factory"])
@pytest.mark.parametrize("neuron", ["parallel", "serial"])
def test_save_load_round_trip_is_bit_exact(tmp_path, make, neuron):
    model = make()
    if not hasattr(model, "pconv_source") and make is nets.timm_resnet:
        model = pconv.create_model("test_resnet", num_classes=10, random_weights=True)
        model.load_state_dict(nets.timm_resnet().state_dict())
    snn = pconv.convert(model, calib_batches(), time_steps=8, neuron=neuron)
    path = pconv.save(snn, tmp_path / "snn.safetensors")
    loaded = pconv.load(path, trust_factory=True)
    assert loaded.info.neuron == neuron and loaded.time_steps == 8
    assert [s.name for s in loaded.info.sites] == [s.name for s in snn.info.sites]
    assert loaded.info.source == snn.info.source
    for key, value in snn.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(4, 3, 32, 32)
    for engine in pconv.NEURONS.get(neuron).engines:
        with torch.inference_mode():
            assert torch.equal(loaded.set_engine(engine)(x), snn.set_engine(engine)(x))
    with torch.inference_mode():
        assert torch.equal(pconv.load(path, trust_factory=True).to_ann()(x), model(x))  # the source ANN travels in the file


def test_save_refuses_to_overwrite(tmp_path):
    snn = pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=4)
    path = tmp_path / "snn.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        pconv.save(snn, path)
    assert path.read_bytes() == b"precious"
    pconv.save(snn, path, force=True)
    assert pconv.load(path, trust_factory=True).time_steps == 4


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    import pconv.files.export as export

    snn = pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=4)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pconv.save(snn, tmp_path / "snn.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_calibration_file_round_trip(tmp_path):
    model = nets.vgg_small()
    calibration = pconv.calibrate(model, calib_batches(n=1), time_steps=[4, 8])
    path = pconv.save_calibration(calibration, tmp_path / "calib.safetensors")
    loaded = pconv.load_calibration(path)
    assert loaded.time_steps == [4, 8] and loaded.threshold == calibration.threshold
    x = torch.randn(2, 3, 32, 32)
    for T in (4, 8):
        with torch.inference_mode():
            assert torch.equal(pconv.convert(model, loaded, time_steps=T)(x), pconv.convert(model, calibration, time_steps=T)(x))
    with pytest.raises(pconv.FormatError, match="calibration file, not an SNN"):
        pconv.load(path, trust_factory=True)


def test_unimportable_model_cannot_be_saved(tmp_path):
    class Local(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            return self.relu(self.fc(x))

    snn = pconv.convert(Local().eval(), [torch.randn(4, 4)], time_steps=4)
    with pytest.raises(pconv.PconvError, match="rebuild its architecture"):
        pconv.save(snn, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_serial_step_engine_equals_layerwise_serial():
    """T sequential passes with stateful neurons = the layer-by-layer serial run."""
    model = nets.timm_resnet().double()
    serial = pconv.convert(model, [b.double() for b in calib_batches(n=1)], time_steps=6).with_neuron("serial")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    counts = []
    for neuron in serial.neurons().values():
        neuron.count_hook = lambda k, neurons: counts.append(k.sum().item())
    with torch.inference_mode():
        layerwise = serial.set_engine("spikes").forward_steps(x)
        stepwise = serial.set_engine("steps").forward_steps(x)
        again = serial(x)
    assert torch.allclose(layerwise, stepwise, atol=1e-9, rtol=0)
    assert torch.allclose(again, stepwise.mean(0), atol=1e-12, rtol=0)  # state was reset between batches
    n = len(serial.info.sites)
    assert counts[:n] == counts[n:2 * n] and sum(counts[:n]) > 0
    with pytest.raises(ConfigError):
        pconv.convert(model, [b.double() for b in calib_batches(n=1)], time_steps=6).set_engine("steps")


def test_spike_engine_in_bounded_chunks():
    snn = pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=8).set_engine("spikes")
    x = torch.randn(10, 3, 32, 32)
    with torch.inference_mode():
        whole = snn(x)
        snn.spike_batch_limit = 24  # 3 images x 8 steps per pass
        chunked = snn(x)
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=0)


def test_calibration_streams_past_the_image_budget():
    """Past its share of the memory budget a re-iterable source is read again each pass; the result is the
    same as with the images held."""
    model = nets.vgg_small()
    data = calib_batches(n=3)
    held = pconv.calibrate(model, data, time_steps=[4], threshold="percentile:99")
    reads = []

    class Source:  # a re-iterable that counts how often it is read
        def __iter__(self):
            reads.append(1)
            return iter(data)

    streamed = pconv.calibrate(model, Source(), time_steps=[4], threshold="percentile:99", num_images=20,
                               memory_budget="256KiB")
    assert len(reads) > 5 and streamed.provenance["num_images"] == 20
    partial = pconv.calibrate(model, data, time_steps=[4], threshold="percentile:99", num_images=20)
    for name, p in partial.params[4].items():
        assert torch.equal(streamed.params[4][name].theta, p.theta)
        assert torch.allclose(streamed.params[4][name].delta_in, p.delta_in, atol=1e-6)
    assert held.provenance["num_images"] == 24


def test_saved_file_has_the_usual_permissions(tmp_path):
    import os

    snn = pconv.convert(nets.vgg_small(), calib_batches(n=1), time_steps=4)
    path = pconv.save(snn, tmp_path / "snn.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
