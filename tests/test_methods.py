"""Methods: bit budgets map to codebooks, impossible budgets fail early, and the fits are faithful."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vqcompress.coded import CodedWeight
from vqcompress.errors import VQCError
from vqcompress.methods import get_method, make_config

KMEANS, RTN = get_method("kmeans"), get_method("rtn")


def dk(bits, shape=(1024, 1024), **options):
    s = KMEANS.settings(shape, bits, make_config(KMEANS, options))
    return s["dim"], s["k"]


# -- kmeans budget mapping -----------------------------------------------------------------------

@pytest.mark.parametrize("bits, expected", [(1, (8, 256)), (2, (4, 256)), (3, (2, 64)), (4, (2, 256)),
                                            (0.5, (16, 256)), (1.5, (4, 64)), (8, (1, 256)), (6, (1, 64))])
def test_budget_mapping(bits, expected):
    assert dk(bits) == expected
    d, k = expected
    assert KMEANS.layout((1024, 1024), KMEANS.settings((1024, 1024), bits, KMEANS.config())).bits / d == bits


def test_budget_needs_d_dividing_the_inputs():
    assert dk(2, shape=(4096, 6)) == (3, 64)   # d = 4 does not divide 6
    assert dk(1, shape=(4096, 12)) == (6, 64)  # d = 8 does not divide 12
    assert dk(2, shape=(512, 3, 3, 3)) == (3, 64)  # conv: inputs are 3·3·3 = 27


@pytest.mark.parametrize(("shape", "expected"), [((1024, 1024), (8, 256)), ((32, 144), (4, 16)), ((16, 9), (1, 2))])
def test_budget_keeps_codebooks_under_a_quarter_of_the_index_bits(shape, expected):
    assert dk(1, shape=shape) == expected
    d, k = expected
    assert 16 * k * d <= 0.25 * shape[0] * math.prod(shape[1:])


@pytest.mark.parametrize(("bits", "shape", "expected"), [
    (0.3, (64, 64), (4, 2)),           # no whole index width: 0.25 bits is the closest below
    (1.9, (1024, 1024), (4, 128)),     # 1.75 bits: k ≤ 256 rules out d = 5
    (1.5, (16, 1, 3, 3), (1, 2)),      # 9 inputs: no d gives 1.5 bits exactly
])
def test_budget_is_a_ceiling(bits, shape, expected):
    assert dk(bits, shape=shape) == expected
    d, k = expected
    assert math.log2(k) / d <= bits


def test_a_small_kernel_gets_fewer_codewords_where_the_full_width_has_no_room():
    """A 3×3 depthwise kernel of 16 channels (144 weights): 16 codewords of d = 1 would cost more
    than a quarter of the index bits, 8 do not; a layer with room keeps the full width."""
    assert dk(4, shape=(16, 1, 3, 3)) == (1, 8)
    assert dk(4, shape=(512, 1, 3, 3)) == (1, 16)


def test_explicit_dim_and_k_override_the_budget():
    assert dk(2, dim=3, k=100) == (3, 100)
    assert dk(None, dim=2, k=16) == (2, 16)


@pytest.mark.parametrize("bits, dim, expected_k", [(2, 3, 64), (1.5, 4, 64), (1, 16, 1 << 16), (0.25, 4, 2)])
def test_only_dim_given(bits, dim, expected_k):
    assert dk(bits, dim=dim) == (dim, expected_k)


@pytest.mark.parametrize("bits, k, expected_dim", [(2, 16, 2), (1, 256, 8), (0.5, 4, 4)])
def test_only_k_given(bits, k, expected_dim):
    assert dk(bits, k=k) == (expected_dim, k)


@pytest.mark.parametrize("bits, options", [
    (0, {}), (-2, {}), (0.01, {}), (None, {}),
    (3, {"k": 256}),              # d = 8/3
    (1, {"k": 100}),              # log2(100) is not whole
    (0.3, {"dim": 4}),            # 1.2 bits per index
    (2, {"dim": 9}),              # k = 2^18
    (None, {"dim": 4}),
    (0, {"k": 16}),
])
def test_impossible_budgets_raise(bits, options):
    with pytest.raises(VQCError):
        KMEANS.settings((64, 64), bits, make_config(KMEANS, options))


def test_unknown_options_and_methods_raise():
    with pytest.raises(VQCError, match="dims"):
        KMEANS.settings((64, 64), 2, make_config(KMEANS, {"dims": 4}))
    with pytest.raises(VQCError, match="groupsize"):
        RTN.settings((64, 64), 4, make_config(RTN, {"groupsize": 32}))
    with pytest.raises(VQCError):
        KMEANS.settings((64, 64), 2, make_config(KMEANS, {"scale": "column"}))
    with pytest.raises(VQCError, match="nope"):
        get_method("nope")


# -- rtn -------------------------------------------------------------------------------------------

@st.composite
def rtn_cases(draw):
    rows = draw(st.integers(2, 6))
    group = draw(st.sampled_from([1, 2, 4, 8, 16]))
    cols = group * draw(st.integers(1, 4))
    # the layout check wants at least k = 2^bits weights per layer, even for rtn's fixed grid
    bits = draw(st.integers(1, min(8, (rows * cols).bit_length() - 1)))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    weight = torch.randn(rows, cols, generator=gen) * magnitude + draw(st.sampled_from([0.0, 2.0]))
    if draw(st.booleans()):
        weight[0] = draw(st.sampled_from([0.0, 0.3, -5.0]))  # a constant row: zero range
    return weight, bits, group


def assert_rtn_within_half_step(weight, bits, group):
    code = RTN.fit(weight, RTN.settings(tuple(weight.shape), bits, RTN.config(group_size=group)), 0)
    assert code.layout.bits == bits and code.layout.dim == 1
    decoded = code.decode()
    assert torch.isfinite(decoded).all()
    scale = code.scale.float().repeat_interleave(group, 1)
    group_max = weight.reshape(weight.shape[0], -1, group).abs().amax(-1).repeat_interleave(group, 1)
    fp16 = 2**-10 * group_max + 1e-7  # stored scale and offset are fp16
    assert ((decoded - weight).abs() <= scale / 2 + fp16).all()
    codes = code.code_matrix()
    assert codes.max() < 2**bits
    return code


@settings(max_examples=80, deadline=None)
@given(rtn_cases())
def test_rtn_error_within_half_a_step(case):
    assert_rtn_within_half_step(*case)


def test_rtn_zero_and_constant_groups():
    weight = torch.randn(4, 32)
    weight[0] = 0.0
    weight[1, :16] = 0.25
    weight[2] = 1e-9
    code = assert_rtn_within_half_step(weight, 4, 16)
    assert torch.equal(code.decode()[0], torch.zeros(32))


def test_rtn_uses_the_whole_grid():
    weight = torch.linspace(-1, 1, 64).reshape(1, 64)
    code = RTN.fit(weight, RTN.settings((1, 64), 2, RTN.config(group_size=64)), 0)
    assert sorted(set(code.code_matrix().flatten().tolist())) == [0, 1, 2, 3]
    assert code.decode()[0, 0] == pytest.approx(-1, abs=1e-3) and code.decode()[0, -1] == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("bits", [2.5, 0, 9, None, -1])
def test_rtn_rejects_bad_bits(bits):
    with pytest.raises(VQCError):
        RTN.settings((64, 64), bits, RTN.config())


@pytest.mark.parametrize("group", [7, 0, -4, 128])
def test_rtn_rejects_group_sizes_that_do_not_divide(group):
    with pytest.raises(VQCError):
        RTN.settings((64, 64), 4, RTN.config(group_size=group))


@pytest.mark.parametrize(("cols", "expected"), [(25, 25), (9, 9), (16, 16), (64, 64), (4096, 64), (72, 36),
                                                (100, 50), (96, 48), (4099, 4099), (2 * 4099, 4099)])
def test_rtn_picks_a_group_size_that_divides_the_inputs(cols, expected):
    """Not asked for a group size, rtn takes 64 where it divides the inputs, else the largest
    divisor below it if that is at least 32, else the smallest above it (a prime count: the row)."""
    settings = RTN.settings((8, cols), 8, RTN.config())
    assert settings["group_size"] == expected and cols % expected == 0
    RTN.layout((8, cols), settings).validate()


def test_rtn_storage_cost():
    s = RTN.settings((16, 64), 3, RTN.config(group_size=32))
    code = RTN.fit(torch.randn(16, 64), s, 0)
    # 3 bits per weight + fp16 scale and offset per 32 weights + the 8-entry codebook
    assert code.nbits() == 16 * 64 * 3 + 16 * 2 * 2 * 16 + 8 * 16


# -- kmeans fits -----------------------------------------------------------------------------------

def kmeans_fit(weight, bits, seed=0, **options) -> CodedWeight:
    s = KMEANS.settings(tuple(weight.shape), bits, make_config(KMEANS, options))
    KMEANS.layout(tuple(weight.shape), s).validate()
    return KMEANS.fit(weight, s, seed)


def relative_error(code, weight):
    return ((code.decode() - weight).norm() / weight.norm()).item()


def test_more_bits_lower_error():
    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    errors = [relative_error(kmeans_fit(weight, bits), weight) for bits in (1, 2, 4)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25


def test_same_seed_same_codes():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    a, b = kmeans_fit(weight, 2, seed=5), kmeans_fit(weight, 2, seed=5)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook)


def test_codes_are_nearest_stored_codewords():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    code = kmeans_fit(weight, None, dim=2, k=16, scale="none")
    points = weight.reshape(-1, 2)
    distance = torch.cdist(points.double(), code.codebook[0].double())
    chosen = distance.gather(1, code.code_matrix().reshape(-1, 1))[:, 0]
    torch.testing.assert_close(chosen, distance.min(1).values, rtol=1e-5, atol=1e-6)


def test_row_scale_and_groups():
    gen = torch.Generator().manual_seed(3)
    # rows of very different magnitude: a per-row scale lets one codebook serve them all
    weight = torch.randn(64, 32, generator=gen) * torch.logspace(-2, 1, 64)[:, None]
    plain = kmeans_fit(weight, None, dim=2, k=16, scale="none")
    scaled = kmeans_fit(weight, None, dim=2, k=16)  # the default
    row_error = lambda c: ((c.decode() - weight).norm(dim=1) / weight.norm(dim=1)).max().item()  # noqa: E731
    assert row_error(scaled) < 0.5 < row_error(plain)
    assert scaled.scale.shape == (64, 1) and scaled.scale.dtype == torch.float16
    grouped = kmeans_fit(weight, None, dim=2, k=16, groups=4, scale="none")
    assert grouped.codebook.shape == (4, 16, 2)
    assert relative_error(grouped, weight) < relative_error(plain, weight)


def test_row_scale_with_a_zero_row():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    weight[5] = 0.0
    code = kmeans_fit(weight, None, dim=2, k=16, scale="row")
    decoded = code.decode()
    assert torch.isfinite(decoded).all()
    assert decoded[5].abs().max() < 1e-6


@pytest.mark.parametrize(("shape", "options"), [((4, 8), {"dim": 4, "k": 9}), ((4, 8), {"dim": 4, "k": 5, "groups": 2})])
def test_kmeans_refuses_more_codewords_than_sub_vectors(shape, options):
    kmeans = get_method("kmeans")
    with pytest.raises(VQCError, match="exceed"):
        kmeans.layout(shape, kmeans.settings(shape, None, make_config(kmeans, options)))


def test_rtn_fixed_grid_fits_small_layers():
    rtn = get_method("rtn")
    weight = torch.randn(16, 8)
    code = rtn.fit(weight, rtn.settings((16, 8), 8, rtn.config(group_size=8)), seed=0)
    assert (code.decode() - weight).abs().max() < 0.02


def test_kmeans_fits_a_large_layer_from_its_sample_alone():
    """The sub-vectors of weight / row scale, read a few rows at a time, give the very codebook
    that the whole normalised copy (each sub-vector weighted by its mean importance) gives."""
    import numpy as np

    from vqcompress.codebook import kmeans
    from vqcompress.methods.kmeans import _sub_vectors

    weight = torch.randn(1000, 96) * torch.rand(1000, 1)
    scale, importance = weight.pow(2).mean(1, keepdim=True).sqrt(), torch.rand(1, 96)
    source = _sub_vectors(weight, scale, importance.expand(weight.shape), 2)
    whole = (weight / scale).reshape(-1, 2).numpy()
    weights = (importance * scale.square()).reshape(-1, 2).mean(-1).numpy()
    assert source.count == len(whole)
    index = np.array([0, 47, 48, 30_000, len(whole) - 1])
    points, taken = source.take(index)
    assert np.array_equal(points, whole[index]) and np.array_equal(taken, weights[index])
    assert np.array_equal(source.energies(40, 5000), np.einsum("ij,ij->i", whole[40:5000], whole[40:5000]) * weights[40:5000])
    assert np.array_equal(kmeans(source, 64, seed=3, max_points_per_centroid=16),
                          kmeans(whole, 64, seed=3, max_points_per_centroid=16, weights=weights))


def test_method_options_are_typed_and_checked_where_the_config_is_made():
    from vqcompress.methods.jlcm import JLCMConfig
    from vqcompress.methods.kmeans import KMeansConfig

    assert KMeansConfig(dim=4, scale="row").given() == {"dim": 4, "scale": "row"}
    for bad in ({"dim": "4"}, {"dim": 4.5}, {"dim": 0}, {"scale": "column"}, {"k": True}):
        with pytest.raises(VQCError, match="kmeans option"):
            KMeansConfig(**bad)
    with pytest.raises(VQCError, match="lr must be a finite number"):
        JLCMConfig(lr=float("nan"))


def test_a_pipeline_setting_given_as_a_method_option_says_where_it_goes():
    with pytest.raises(VQCError, match="finetune_steps is a pipeline setting"):
        make_config(KMEANS, {"finetune_steps": 3})


# -- small kernels: every method codes them or leaves them dense and says so ----------------------

class SmallKernels(torch.nn.Module):
    """The convolutions of a mobile CNN: depthwise 5×5 and 3×3, pointwise, grouped 3×3."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.convs = torch.nn.Sequential(
            conv(240, 240, 5, padding=2, groups=240),  # (240, 1, 5, 5): 25 inputs, prime to most d
            conv(240, 16, 1),                          # (16, 240, 1, 1)
            conv(16, 16, 3, padding=1, groups=16),     # (16, 1, 3, 3): 144 weights, 9 inputs
            conv(16, 64, 1),                           # (64, 16, 1, 1)
            conv(64, 32, 3, padding=1, groups=8),      # (32, 8, 3, 3): 72 inputs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


@pytest.fixture(scope="module")
def universal_book(tmp_path_factory) -> str:
    from vqcompress import universal

    torch.manual_seed(1)
    source = {"src": torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))}
    path = tmp_path_factory.mktemp("books") / "u.vqcb"
    universal.save_codebook(universal.build(source, 4, 64, per_layer=1024), path)
    return str(path)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("method", ["rtn", "kmeans", "jlcm", "qswd", "vq4all"])
def test_every_method_codes_small_kernels_or_leaves_them_dense_and_says_so(method, bits, universal_book):
    """Every layer is planned (none too small): each is coded, or left dense with the reason its
    method cannot take it (a universal codebook of d = 4 and a 5×5 kernel's 25 inputs); never an
    exception, never the whole run refused; the large depthwise kernel is coded by every method
    whose sub-vectors can be as short as one weight."""
    import vqcompress as vqc
    from vqcompress.compress import compress_with_summary
    from vqcompress.layers import CodedConv2d

    torch.manual_seed(0)
    model = SmallKernels().eval()
    x = torch.randn(1, 240, 8, 8)
    options = {"codebook": universal_book} if method == "vq4all" else {}
    compressed, summary = compress_with_summary(model, method, bits=bits, plan=vqc.Plan(min_weights=0), progress=False,
                                                **options)
    dense = {entry.name: entry.reason for entry in summary.left_dense}
    for index, conv in enumerate(compressed.convs):
        name = f"convs.{index}"
        assert isinstance(conv, CodedConv2d) != (name in dense)
        assert name not in dense or dense[name].startswith(f"{method} cannot take it: ")
    assert isinstance(compressed.convs[0], CodedConv2d) or method == "vq4all"
    with torch.no_grad():
        assert torch.isfinite(compressed(x)).all()


def test_an_explicit_group_size_that_does_not_divide_is_refused_in_one_line():
    import vqcompress as vqc

    with pytest.raises(VQCError, match="rtn group size 64 does not divide the 25 inputs of shape"):
        vqc.compress(SmallKernels(), "rtn", bits=8, group_size=64, progress=False)


def test_rtn_at_8_bits_codes_a_5x5_depthwise_kernel_with_the_whole_row_as_its_group():
    import vqcompress as vqc

    compressed = vqc.compress(SmallKernels(), "rtn", bits=8, progress=False)
    assert compressed.convs[0].weight_code.recipe == {"method": "rtn", "bits": 8, "group_size": 25}
