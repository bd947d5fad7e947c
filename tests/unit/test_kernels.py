"""Property tests: every Numba kernel computes what its numpy reference computes (float ops within 1e-6), on random
shapes and values, edge shapes included (batch 1, odd sizes, crop equal to size, NaN and infinities)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.utils import murmurhash3_32

from ferry.kernels.hashing import hash_buckets, hash_buckets_ref, pack_strings
from ferry.kernels.image import ImageSpec, image_to_nchw, image_to_nchw_ref
from ferry.kernels.stats import empty_moments, histogram, histogram_ref, merge_moments, merge_moments_ref, moments_ref
from ferry.kernels.tabular import FeatureSteps, feature_map, feature_map_ref, one_hot, one_hot_ref

# Numba compiles (or loads from its cache) on the first example of each kernel: no per-example deadline.
PROPERTY = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FLOATS = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)


def assert_close(kernel: np.ndarray, reference: np.ndarray) -> None:
    assert kernel.dtype == reference.dtype and kernel.shape == reference.shape
    np.testing.assert_array_equal(np.isnan(kernel), np.isnan(reference))
    np.testing.assert_allclose(kernel, reference, rtol=1e-6, atol=1e-6)


def read_only(array: np.ndarray) -> np.ndarray:
    """As a request's tensor arrives: a read-only view of the message's bytes."""
    view = np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)
    assert not view.flags.writeable
    return view


@st.composite
def image_cases(draw: st.DrawFn) -> tuple[np.ndarray, ImageSpec]:
    n = draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 19)), draw(st.integers(1, 19))
    c = draw(st.sampled_from([1, 3, 4]))
    resize = draw(st.none() | st.tuples(st.integers(1, 27), st.integers(1, 27)))
    size = resize or (h, w)
    crop = draw(
        st.none()
        | st.just(size)  # crop equal to the size
        | st.tuples(st.integers(1, size[0]), st.integers(1, size[1]))
    )
    orders = draw(
        st.sampled_from([("RGB", "RGB"), ("BGR", "BGR")] + ([("RGB", "BGR"), ("BGR", "RGB")] if c == 3 else []))
    )
    spec = ImageSpec.build(
        h,
        w,
        c,
        resize=resize,
        crop=crop,
        scale=draw(st.sampled_from([1.0, 1 / 255, 2.5])),
        mean=draw(st.lists(st.floats(-2, 2), min_size=c, max_size=c)),
        std=draw(st.lists(st.floats(0.05, 3), min_size=c, max_size=c)),
        input_order=orders[0],
        output_order=orders[1],
    )
    images = draw(hnp.arrays(np.uint8, (n, h, w, c)))
    return (read_only(images) if draw(st.booleans()) else images), spec


@PROPERTY
@given(image_cases())
def test_image_kernel_equals_reference(case: tuple[np.ndarray, ImageSpec]) -> None:
    images, spec = case
    out = image_to_nchw(images, spec)
    assert out.shape == (len(images), *spec.output_shape)
    assert_close(out, image_to_nchw_ref(images, spec))


def test_image_geometry_and_channel_order() -> None:
    """Known answers: crop takes the centered window; BGR input reaches an RGB model with its channels reversed;
    resizing a constant image keeps it constant, and resizing to the same size is the identity."""
    images = np.arange(2 * 5 * 6 * 3, dtype=np.uint8).reshape(2, 5, 6, 3)
    spec = ImageSpec.build(5, 6, 3, crop=(3, 2), input_order="BGR", output_order="RGB")
    out = image_to_nchw(images, spec)
    np.testing.assert_array_equal(out, images[:, 1:4, 2:4, ::-1].transpose(0, 3, 1, 2).astype(np.float32))
    flat = np.full((1, 7, 9, 1), 200, dtype=np.uint8)
    resized = image_to_nchw(flat, ImageSpec.build(7, 9, 1, resize=(13, 4), scale=0.5))
    np.testing.assert_array_equal(resized, np.full((1, 1, 13, 4), 100, dtype=np.float32))
    same = ImageSpec.build(5, 6, 3, resize=(5, 6))
    one_number = ImageSpec.build(5, 6, 3, mean=0.5, std=2.0)  # broadcast to every channel
    assert one_number.mean.tolist() == [0.5] * 3 and one_number.std.tolist() == [2.0] * 3
    np.testing.assert_array_equal(image_to_nchw(images, same), images.transpose(0, 3, 1, 2).astype(np.float32))


def test_image_resize_uses_half_pixel_centers() -> None:
    """Upscaling [0, 100] by 2 along x, OpenCV INTER_LINEAR gives [0, 25, 75, 100]: samples at -0.25 (clamped),
    0.25, 0.75 and 1.25 (clamped)."""
    row = np.array([0, 100], dtype=np.uint8).reshape(1, 1, 2, 1)
    out = image_to_nchw(row, ImageSpec.build(1, 2, 1, resize=(1, 4)))
    np.testing.assert_array_equal(out.reshape(-1), [0, 25, 75, 100])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop": (9, 2)}, "crop \\[9, 2\\] does not fit in the size \\[8, 8\\]"),
        ({"resize": (4, 4), "crop": (5, 5)}, "does not fit in the resized size \\[4, 4\\]"),
        ({"mean": [0.5, 0.5]}, "mean has 2 values for 3 channels"),
        ({"std": [1.0, 0.0, 1.0]}, "std must be finite and > 0"),
        ({"input_order": "GBR"}, "input_order must be one of"),
    ],
)
def test_image_spec_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageSpec.build(8, 8, 3, **kwargs)  # type: ignore[arg-type]


@st.composite
def feature_cases(draw: st.DrawFn) -> tuple[np.ndarray, FeatureSteps]:
    rows, width = draw(st.integers(1, 17)), draw(st.integers(1, 33))
    vectors = hnp.arrays(np.float32, width, elements=st.floats(-100, 100, width=32))
    positive = hnp.arrays(np.float32, width, elements=st.floats(0.0625, 100, width=32))
    steps: list[tuple[str, list[np.ndarray]]] = []
    for name in draw(st.lists(st.sampled_from(["impute", "clip", "standardize", "minmax"]), min_size=1, max_size=5)):
        if name == "impute":
            steps.append((name, [draw(vectors)]))
        elif name == "clip":
            lo = draw(vectors)
            steps.append((name, [lo, lo + draw(positive) * draw(st.sampled_from([0, 1]))]))  # lo == hi allowed
        elif name == "standardize":
            steps.append((name, [draw(vectors), draw(positive)]))
        else:
            lo = draw(vectors)
            steps.append((name, [lo, lo + draw(positive)]))
    special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0])
    x = draw(hnp.arrays(np.float32, (rows, width), elements=FLOATS | special))
    return (read_only(x) if draw(st.booleans()) else x), FeatureSteps.build(steps, width)


@PROPERTY
@given(feature_cases())
def test_feature_map_equals_reference(case: tuple[np.ndarray, FeatureSteps]) -> None:
    x, steps = case
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf and overflow are data here
        assert_close(feature_map(x, steps), feature_map_ref(x, steps))


def test_feature_steps_nan_policy() -> None:
    """impute replaces NaN only; clip and the scalers let NaN through (a NaN stays a NaN without impute)."""
    x = np.array([[np.nan, 1.0, 50.0], [2.0, np.nan, -50.0]], dtype=np.float32)
    fill, lo, hi = np.array([9.0, 8.0, 7.0]), np.full(3, -10.0), np.full(3, 10.0)
    imputed = feature_map(x, FeatureSteps.build([("impute", [fill]), ("clip", [lo, hi])], 3))
    np.testing.assert_array_equal(imputed, [[9, 1, 10], [2, 8, -10]])
    passed = feature_map(x, FeatureSteps.build([("clip", [lo, hi]), ("standardize", [np.zeros(3), np.ones(3)])], 3))
    np.testing.assert_array_equal(np.isnan(passed), np.isnan(x))


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([("standardize", [np.zeros(2), np.array([1.0, 0.0])])], "std must be finite and > 0, got 0.0 at feature 1"),
        ([("minmax", [np.ones(2), np.ones(2)])], "max - min must be finite and > 0"),
        ([("clip", [np.ones(2), np.zeros(2)])], "lower bound 1.0 exceeds upper bound 0.0 at feature 0"),
        ([("impute", [np.array([0.0, np.nan])])], "fill values must be finite"),
        ([("impute", [np.zeros(3)])], "impute takes 1 vector\\(s\\) of 2 values"),
        ([("scale", [np.zeros(2)])], "unknown step 'scale'"),
    ],
)
def test_feature_steps_reject(steps: list[tuple[str, list[np.ndarray]]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureSteps.build(steps, 2)


@PROPERTY
@given(st.data())
def test_one_hot_equals_reference(data: st.DataObject) -> None:
    cards = np.array(data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=6)), dtype=np.int64)
    rows = data.draw(st.integers(1, 20))
    codes = np.stack([data.draw(hnp.arrays(np.int64, rows, elements=st.integers(-2, int(c) + 1))) for c in cards], 1)
    out = one_hot(codes, cards)
    np.testing.assert_array_equal(out, one_hot_ref(codes, cards))
    known = (codes >= 0) & (codes < cards)
    np.testing.assert_array_equal(out.sum(axis=1), known.sum(axis=1))  # unknown categories set nothing


@PROPERTY
@given(st.lists(st.text(max_size=40), max_size=30), st.integers(1, 2**32), st.integers(0, 2**32 - 1))
def test_hash_buckets_equal_reference_and_sklearn(items: list[str], buckets: int, seed: int) -> None:
    data, offsets = pack_strings(items)
    expected = [murmurhash3_32(s.encode("utf-8"), seed, positive=True) % buckets for s in items]
    np.testing.assert_array_equal(hash_buckets(data, offsets, buckets, seed), expected)
    np.testing.assert_array_equal(hash_buckets_ref(data, offsets, buckets, seed), expected)


def test_hash_is_stable_across_processes() -> None:
    """Fixed values (MurmurHash3 x86 32 of the UTF-8 bytes, seed 0): Python's salted hash() would change per run."""
    data, offsets = pack_strings(["cat", "dog", ""])
    np.testing.assert_array_equal(hash_buckets(data, offsets, 2**32), [0x68649727, 0xB1C109DB, 0])


@st.composite
def edge_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    rows, features, bins = draw(st.integers(1, 30)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    steps = draw(hnp.arrays(np.float64, (features, bins), elements=st.floats(0.01, 10)))
    edges = np.concatenate([draw(hnp.arrays(np.float64, (features, 1), elements=st.floats(-20, 0))), steps], 1)
    edges = np.cumsum(edges, axis=1)
    on_edge = st.sampled_from(edges.reshape(-1).astype(np.float32).tolist())  # values exactly on an edge
    special = st.sampled_from([np.nan, np.inf, -np.inf])
    x = draw(hnp.arrays(np.float32, (rows, features), elements=st.floats(-30, 60, width=32) | on_edge | special))
    return x, edges


@PROPERTY
@given(edge_cases())
def test_histogram_equals_reference(case: tuple[np.ndarray, np.ndarray]) -> None:
    x, edges = case
    counts = histogram(x, edges)
    np.testing.assert_array_equal(counts, histogram_ref(x, edges))
    np.testing.assert_array_equal(counts.sum(axis=1), (~np.isnan(x)).sum(axis=0))  # NaN skipped, nothing else


def test_histogram_bins_are_half_open_and_the_last_closed() -> None:
    edges = np.array([[0.0, 1.0, 2.0]])
    x = np.array([[-0.5], [0.0], [0.5], [1.0], [2.0], [2.5], [np.nan]], dtype=np.float32)
    np.testing.assert_array_equal(histogram(x, edges), [[1, 2, 2, 1]])  # below, [0, 1), [1, 2], above


@PROPERTY
@given(st.data())
def test_merged_moments_equal_reference_and_one_pass(data: st.DataObject) -> None:
    features = data.draw(st.integers(1, 5))
    values = st.floats(-1e3, 1e3, width=32) | st.just(np.nan)
    batches = data.draw(
        st.lists(hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.just(features)), elements=values), max_size=5)
    )
    state = reference = empty_moments(features)
    for batch in batches:
        state, reference = merge_moments(state, batch), merge_moments_ref(reference, batch)
        for got, want in zip(state, reference, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if batches:  # merging batch by batch equals one pass over every row (Chan's merge is exact up to rounding)
        whole = moments_ref(np.concatenate(batches))
        for got, want in zip(state, whole, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_merge_moments_leaves_the_state_alone() -> None:
    state = empty_moments(2)
    merged = merge_moments(state, np.array([[1.0, np.nan], [3.0, np.nan]], dtype=np.float32))
    assert state[0].tolist() == [0, 0]
    count, mean, m2 = merged
    assert count.tolist() == [2, 0] and mean.tolist() == [2.0, 0.0] and m2.tolist() == [2.0, 0.0]
