"""Reliability, inputs: property-based tests (hypothesis) of φ's forward and of a perturbed classifier.

What holds (the README's Reliability section counts these):
- a finite input (|x| ≤ 1e6, float32, float64 or bfloat16, any small shape, training or evaluation, sampled or
  expected noise, with or without clamp) gives a finite output of the same shape and dtype, and finite statistics;
- NaN/Inf in the features is a ValueError that says so (at a site: naming the site); NaN/Inf in a noise draw or in
  running statistics is either refused the same way or propagates only to the positions / channels it touches;
- a wrong rank, statistics shape, dtype (non-float) or Python type is a ValueError/TypeError; at a site of a
  PerturbedModel a wrong rank, channel count, dtype or device names the site.
Only the public behaviour of `MetaPerturbModel.forward` is used (its internals are being rewritten).
"""

from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, add_perturbation
from metaperturb_hf.modeling_metaperturb import NonFiniteFeaturesError

SETTINGS = settings(max_examples=30, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
MAGNITUDES = [0.0, 1e-30, 1e-3, 1.0, 1e3, 1e6]   # largest |x| of a drawn input (1e-30: subnormal in float32)
NON_FINITE = [float("nan"), float("inf"), float("-inf")]


pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def _phi_weights(std: float) -> dict:
    torch.manual_seed(0)
    return MetaPerturbModel(MetaPerturbConfig(initializer_range=std)).state_dict()


def make_phi(std: float = 0.1, dtype=torch.float32) -> MetaPerturbModel:
    """φ with N(0, std) weights: 0.01 is the init, 0.1-0.3 the size of meta-trained weights, 1.0 far beyond."""
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=std))
    phi.load_state_dict(_phi_weights(std))
    return phi.to(dtype)


@st.composite
def shapes(draw, flat=None):
    flat = draw(st.booleans()) if flat is None else flat
    batch, channels = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    return (batch, channels) if flat else (batch, channels, draw(st.integers(1, 7)), draw(st.integers(1, 7)))


@st.composite
def finite_tensors(draw, shape, dtype, magnitude=None):
    """A tensor whose every element hypothesis chooses (float32 values, then cast), all finite, |x| ≤ magnitude."""
    magnitude = float(np.float32(draw(st.sampled_from(MAGNITUDES)) if magnitude is None else magnitude))
    elements = st.floats(-magnitude, magnitude, width=32, allow_nan=False, allow_infinity=False)
    values = draw(arrays(np.float32, shape, elements=elements))
    return torch.from_numpy(values).to(dtype)


@st.composite
def phi_calls(draw, flat=None):
    """Everything φ's forward takes, finite, with the dtype, mode and options hypothesis picks."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes(flat))
    channels = shape[1]
    hidden = draw(finite_tensors(shape, dtype))
    stats = [draw(finite_tensors((channels, 4), torch.float32, magnitude=1e6)) for _ in range(2)]
    return {
        "std": draw(st.sampled_from([0.01, 0.1, 1.0])),
        "dtype": dtype,
        "training": draw(st.booleans()),
        "args": (hidden, stats[0], stats[1].abs(), float(draw(st.integers(1, 512))), float(draw(st.integers(1, 64)))),
        "kwargs": {
            "noise_coeff": draw(st.floats(0.0, 1.0)),
            "noise": draw(st.none() | finite_tensors(shape, dtype, magnitude=5.0)),
            "clip_value": draw(st.none() | st.floats(1e-3, 1e3)),
            "expected_noise": draw(st.booleans()),
        },
    }


def run_phi(call, hidden=None, running_mean=None, running_var=None, **overrides):
    phi = make_phi(call["std"], call["dtype"]).train(call["training"])
    h, mean, var, channel_norm, spatial_norm = call["args"]
    args = (h if hidden is None else hidden, (mean if running_mean is None else running_mean).clone(),
            (var if running_var is None else running_var).clone(), channel_norm, spatial_norm)
    with torch.no_grad():
        return phi(*args, **{**call["kwargs"], **overrides}), args


# ---------------------------------------------------------------------------------------------- φ, finite inputs
@SETTINGS
@given(phi_calls())
def test_finite_input_gives_finite_output_of_the_same_shape_and_dtype(call):
    out, (h, mean, var, *_) = run_phi(call)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert torch.isfinite(out).all(), f"non-finite output for |h| ≤ {h.abs().max().item():g}"
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    if call["kwargs"]["clip_value"] is not None and call["training"]:
        assert out.max() <= call["kwargs"]["clip_value"] * (1 + 1e-2)  # bfloat16 rounding


# ------------------------------------------------------------------------------------------ φ, non-finite inputs
@SETTINGS
@given(phi_calls(), st.sampled_from(NON_FINITE), st.data())
def test_nan_or_inf_in_the_features_is_a_clear_error(call, bad, data):
    h = call["args"][0].clone()
    h.view(-1)[data.draw(st.integers(0, h.numel() - 1))] = bad
    with pytest.raises(NonFiniteFeaturesError, match="NaN or Inf"):  # its own type, from eager and kernels alike
        run_phi(call, hidden=h)


@SETTINGS
@given(phi_calls(), st.sampled_from(NON_FINITE), st.data())
def test_nan_or_inf_in_a_noise_draw_is_refused_or_stays_where_it_is(call, bad, data):
    """Documented propagation: a non-finite ε can only spoil the output at its own positions."""
    h = call["args"][0]
    noise = data.draw(finite_tensors(tuple(h.shape), h.dtype, magnitude=5.0))
    bad_positions = torch.zeros(h.shape, dtype=torch.bool)
    for index in data.draw(st.lists(st.integers(0, h.numel() - 1), min_size=1, max_size=3)):
        noise.view(-1)[index] = bad
        bad_positions.view(-1)[index] = True
    try:
        out, _ = run_phi(call, noise=noise, expected_noise=False)
    except ValueError as error:
        assert "NaN" in str(error) or "Inf" in str(error)
        return
    assert torch.isfinite(out[~bad_positions]).all()


@SETTINGS
@given(phi_calls(), st.sampled_from(NON_FINITE), st.data())
def test_nan_or_inf_in_running_statistics_is_refused_or_stays_in_its_channels(call, bad, data):
    """In evaluation the running statistics scale their own channel only; in training they are not used."""
    h, mean, var = call["args"][:3]
    channels = h.shape[1]
    channel = data.draw(st.integers(0, channels - 1))
    which = data.draw(st.sampled_from(["mean", "var"]))
    broken = (mean if which == "mean" else var).clone()
    broken[channel, data.draw(st.integers(0, 3))] = bad
    try:
        out, _ = run_phi(call, **{f"running_{which}": broken})
    except ValueError as error:
        assert "NaN" in str(error) or "Inf" in str(error)
        return
    others = [c for c in range(channels) if c != channel]
    assert torch.isfinite(out[:, others]).all()


# ------------------------------------------------------------------------------------------------ φ, wrong inputs
@SETTINGS
@given(st.integers(0, 6).filter(lambda rank: rank not in (2, 4)), st.sampled_from(DTYPES))
def test_a_wrong_rank_is_a_value_error(rank, dtype):
    phi = make_phi(dtype=dtype)
    h = torch.randn((2, 3, 4, 4, 2, 2)[:rank], dtype=dtype)
    with pytest.raises(ValueError, match="shape"):
        phi(h, torch.zeros(3, 4), torch.ones(3, 4), 8.0, 8.0)


@SETTINGS
@given(shapes(), st.integers(1, 8), st.integers(1, 6), st.booleans())
def test_statistics_for_another_channel_count_are_a_value_error(shape, rows, columns, in_mean):
    assume((rows, columns) != (shape[1], 4))
    phi = make_phi()
    good, bad = torch.zeros(shape[1], 4), torch.zeros(rows, columns)
    with pytest.raises(ValueError, match=r"running_(mean|var) must have shape"):
        phi(torch.randn(shape), bad if in_mean else good, good if in_mean else bad, 8.0, 8.0)


@SETTINGS
@given(shapes(), st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]))
def test_a_non_float_dtype_is_a_type_error(shape, dtype):
    phi = make_phi()
    h = torch.ones(shape, dtype=dtype)
    with pytest.raises(TypeError, match="floating point"):
        phi(h, torch.zeros(shape[1], 4), torch.ones(shape[1], 4), 8.0, 8.0)


@pytest.mark.parametrize("value", [None, 1.0, [[1.0, 2.0]], np.ones((2, 3, 4, 4), dtype=np.float32)])
def test_a_non_tensor_is_a_type_error(value):
    with pytest.raises(TypeError, match="torch.Tensor"):
        make_phi()(value, torch.zeros(3, 4), torch.ones(3, 4), 8.0, 8.0)


@SETTINGS
@given(shapes(), st.data())
def test_a_noise_of_another_shape_is_a_value_error(shape, data):
    other = data.draw(shapes().filter(lambda s: s != shape))
    with pytest.raises(ValueError, match="noise must have the shape"):
        make_phi()(torch.randn(shape), torch.zeros(shape[1], 4), torch.ones(shape[1], 4), 8.0, 8.0,
                   noise=torch.randn(other))


# ------------------------------------------------------------------------------------------------ perturbed models
class SmallNet(nn.Module):
    """conv → ReLU (a site) → conv → BatchNorm → ReLU (a site) → pool → linear; takes unbatched (C, H, W)
    too."""

    def __init__(self, width: int, classes: int = 3, norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.act2 = nn.ReLU()
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.act2(self.norm(self.conv2(self.act1(self.conv1(x)))))
        return self.head(x.mean(dim=(-2, -1)))


def perturbed_net(width: int, size: int, std: float = 0.1, norm: bool = True, dtype=torch.float32):
    torch.manual_seed(width)
    model = add_perturbation(SmallNet(width, norm=norm), make_phi(std), input_size=(3, size, size))
    assert [site.name for site in model.sites] == ["act1", "act2"]
    return model.to(dtype)


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 4), st.sampled_from(DTYPES), st.booleans(),
       st.sampled_from(["sample", "mean"]), st.sampled_from([0.01, 0.1, 1.0]), st.data())
def test_a_perturbed_classifier_gives_finite_logits_for_finite_images(width, size, batch, dtype, training, mode,
                                                                      std, data):
    assume(not training or batch * size * size > 1)  # BatchNorm cannot train on one value per channel
    model = perturbed_net(width, size, std, dtype=dtype).train(training)
    model.set_noise_mode(mode)
    magnitude = data.draw(st.sampled_from(MAGNITUDES[:5]))
    images = data.draw(finite_tensors((batch, 3, size, size), dtype, magnitude=magnitude))
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (batch, 3) and logits.dtype == dtype
    assert torch.isfinite(logits).all()
    for statistics in model.site_statistics.values():
        assert torch.isfinite(statistics.running_mean).all() and torch.isfinite(statistics.running_var).all()


@SETTINGS
@given(st.integers(1, 6), st.integers(2, 6), st.sampled_from(NON_FINITE), st.booleans(), st.data())
def test_nan_or_inf_in_the_images_is_an_error_naming_the_first_site(width, size, bad, training, data):
    model = perturbed_net(width, size).train(training)
    images = torch.rand(2, 3, size, size)
    images.view(-1)[data.draw(st.integers(0, images.numel() - 1))] = bad
    with pytest.raises(NonFiniteFeaturesError, match=r"At perturbation site 'act1' .*NaN or Inf"):
        model(images)


@SETTINGS
@given(st.integers(1, 6), st.integers(2, 6), st.booleans())
def test_features_of_a_wrong_rank_at_a_site_name_it(width, size, training):
    model = perturbed_net(width, size, norm=False).train(training)
    with pytest.raises(ValueError, match=r"At perturbation site 'act1' .*shape \(B, C, H, W\) or \(B, C\)"):
        model(torch.rand(3, size, size))  # unbatched: Conv2d accepts it, the site gets (C, H, W)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(2, 6), st.booleans())
def test_a_channel_count_the_site_was_not_built_for_names_it(built, actual, size, training):
    assume(built != actual)
    model = perturbed_net(built, size).train(training)
    model.model.conv1 = nn.Conv2d(3, actual, 3, padding=1)  # the network changed after it was wrapped
    model.model.conv2 = nn.Conv2d(actual, built, 3, padding=1)
    with pytest.raises(ValueError, match=rf"At perturbation site 'act1' \({built} channels\).*for {actual} channels"):
        model(torch.rand(2, 3, size, size))


@SETTINGS
@given(st.sampled_from(DTYPES), st.sampled_from(DTYPES), st.booleans())
def test_a_classifier_cast_alone_is_a_type_error_naming_the_site(classifier_dtype, phi_dtype, training):
    assume(classifier_dtype != phi_dtype)
    model = perturbed_net(4, 5).train(training)
    model.perturbation.to(phi_dtype)
    model.model.to(classifier_dtype)
    with pytest.raises(TypeError, match=rf"At perturbation site 'act1' .*features are {classifier_dtype} but φ is "
                                        rf"{phi_dtype}"):
        model(torch.rand(2, 3, 5, 5, dtype=classifier_dtype))


def test_under_autocast_mixed_dtypes_are_allowed():
    model = perturbed_net(4, 5).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.rand(2, 3, 5, 5))
    assert torch.isfinite(logits).all()


def test_a_classifier_moved_alone_to_another_device_names_the_site():
    model = perturbed_net(4, 5)
    model.model.to("meta")  # a device every machine has; features arrive there, φ and the statistics stay on cpu
    with pytest.raises(ValueError, match=r"At perturbation site 'act1' .*features are on meta.*perturbed\.to"):
        model(torch.rand(2, 3, 5, 5, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_classifier_moved_alone_to_cuda_names_the_site_and_moving_all_works():
    model = perturbed_net(4, 5)
    model.model.to("cuda")
    with pytest.raises(ValueError, match=r"At perturbation site 'act1' .*features are on cuda"):
        model(torch.rand(2, 3, 5, 5, device="cuda"))
    model.to("cuda")
    assert torch.isfinite(model(torch.rand(2, 3, 5, 5, device="cuda"))).all()
