"""The coordinator's weighted mean equals Flower's ``aggregate_arrayrecords`` on real records,
reads replies without copying, and handles integer counters and delta updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from hcc_fl.server.aggregate import (
    all_finite,
    array_view,
    mean_and_distances,
    npy_header,
    npy_view,
    sq_distance,
    weighted_mean,
)


def _record(rng: np.random.Generator, n: float) -> RecordDict:
    arrays = ArrayRecord({"conv.weight": torch.from_numpy(rng.normal(size=(8, 3, 3, 3))
                                                          .astype(np.float32)),
                          "bn.num_batches_tracked": torch.tensor(int(rng.integers(1, 9))),
                          "fc.bias": torch.from_numpy(rng.normal(size=5))})  # float64
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})


def test_weighted_mean_matches_flower_aggregation() -> None:
    rng = np.random.default_rng(0)
    records = [_record(rng, n) for n in (10, 30, 7, 1)]
    ref = aggregate_arrayrecords(records, "num-examples")
    updates = [{k: array_view(v) for k, v in r["arrays"].items()} for r in records]
    out = weighted_mean(updates, [10, 30, 7, 1])
    assert list(out) == list(ref.keys())
    for key, (dt, shape, data) in out.items():
        expected = ref[key].numpy()
        got = Array(dtype=str(dt), shape=shape, stype="numpy.ndarray", data=data).numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
    assert out["bn.num_batches_tracked"][0] == np.float64  # Flower's behaviour for counters


def test_views_are_zero_copy_and_the_header_is_numpys() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    arr = Array(a)
    view = npy_view(arr.data)
    np.testing.assert_array_equal(view, a)
    assert not view.flags.writeable and np.shares_memory(view, np.frombuffer(arr.data, np.uint8))
    assert arr.data.startswith(npy_header(np.dtype(np.float32), (3, 4)))
    fortran = Array(np.asfortranarray(a))
    np.testing.assert_array_equal(npy_view(fortran.data), a)
    with pytest.raises(ValueError):
        npy_view(b"not an npy file at all")


def test_output_dtype_follows_the_global_model_and_delta_mode_adds_the_base() -> None:
    base = {"w": np.full((2, 3), 1.0, np.float32)}
    d1, d2 = {"w": np.full((2, 3), 0.5, np.float16)}, {"w": np.full((2, 3), -0.25, np.float16)}
    out = weighted_mean([d1, d2], [3, 1], {"w": np.dtype(np.float32)}, base=base)
    dt, shape, data = out["w"]
    assert dt == np.float32 and shape == (2, 3)
    np.testing.assert_allclose(npy_view(data), 1.0 + (3 * 0.5 - 0.25) / 4)
    # weights plain: fp16 updates averaged into a float32 model
    out = weighted_mean([d1, d2], [1, 1], {"w": np.dtype(np.float32)})
    np.testing.assert_allclose(npy_view(out["w"][2]), 0.125)


def test_distance_and_finiteness() -> None:
    g = {"w": np.zeros(4, np.float32), "n": np.array(3)}
    u = {"w": np.array([3, 4, 0, 0], np.float32), "n": np.array(5)}
    assert sq_distance(u, g) == pytest.approx(25.0)  # integer counters are not parameters
    assert sq_distance(u, None) == pytest.approx(25.0)
    bad = {"w": np.array([np.nan, 0, 0, 0], np.float32)}
    assert not np.isfinite(sq_distance(bad, g)) and not all_finite(bad)
    with pytest.raises(ValueError):
        weighted_mean([u], [0.0])


@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_one_pass_mean_and_distances_equal_the_two_pass_ones(chunk: int) -> None:
    rng = np.random.default_rng(1)
    records = [_record(rng, n) for n in (10, 30, 7)]
    updates = [{k: array_view(v) for k, v in r["arrays"].items()} for r in records]
    ref = {k: v + 0.1 for k, v in updates[0].items()}
    dtypes = {k: v.dtype for k, v in ref.items()}
    mean, sq = mean_and_distances(updates, [10, 30, 7], ref, dtypes, chunk=chunk)
    two = weighted_mean(updates, [10, 30, 7], dtypes)
    assert list(mean) == list(two)
    for k in two:
        assert mean[k][:2] == two[k][:2]
        np.testing.assert_allclose(npy_view(mean[k][2]), npy_view(two[k][2]), rtol=1e-6)
    np.testing.assert_allclose(sq, [sq_distance(u, ref) for u in updates], rtol=1e-5)
    fp16 = [{"w": np.full(10, 0.5, np.float16)}, {"w": np.full(10, 1.5, np.float16)}]
    mean, sq = mean_and_distances(fp16, [1, 1], {"w": np.ones(10, np.float32)},
                                  {"w": np.dtype(np.float32)}, chunk=chunk)
    np.testing.assert_allclose(npy_view(mean["w"][2]), 1.0)
    np.testing.assert_allclose(sq, [2.5, 2.5])


@pytest.mark.parametrize("chunk", [5, 1 << 16])
def test_coordinatewise_median_and_trimmed_mean_equal_numpys(chunk: int) -> None:
    from hcc_fl.server.aggregate import coordinatewise

    rng = np.random.default_rng(2)
    updates = [{"w": rng.normal(size=(7, 3)).astype(np.float32),
                "n": np.array([3 + i], np.int64)} for i in range(6)]
    stack = np.stack([u["w"] for u in updates])
    dtypes = {"w": np.dtype(np.float32), "n": np.dtype(np.int64)}
    med = coordinatewise(updates, "median", dtypes=dtypes, chunk=chunk)
    np.testing.assert_allclose(npy_view(med["w"][2]), np.median(stack, axis=0), rtol=1e-6)
    assert med["n"][0] == np.int64 and int(npy_view(med["n"][2])[0]) == 6  # median 5.5 -> 6
    trim = coordinatewise(updates, "trimmed_mean", 0.2, dtypes, chunk=chunk)
    expected = np.sort(stack, axis=0)[1:-1].mean(axis=0)
    np.testing.assert_allclose(npy_view(trim["w"][2]), expected, rtol=1e-6)
    with pytest.raises(ValueError):
        coordinatewise(updates, "mode")


def test_integer_counters_keep_the_global_models_dtype_when_asked() -> None:
    u = [{"n": np.array(4, np.int64)}, {"n": np.array(7, np.int64)}]
    out = weighted_mean(u, [1, 1], {"n": np.dtype(np.int64)})
    assert out["n"][0] == np.int64 and int(npy_view(out["n"][2])) == 6  # 5.5 rounds to even
    mean, _ = mean_and_distances(u, [1, 2], None, {"n": np.dtype(np.int64)})
    assert int(npy_view(mean["n"][2])) == 6
