"""CKA: invariances, a plain float64 numpy reference, estimators, caches (field notes R-3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import featlab
import featlab.testing as ft
from featlab.analysis import similarity as sim
from featlab.analysis._representations import batch_plan, represent, sample_positions
from featlab.cache.joins import identity_difference
from featlab.errors import CacheError, ConfigError
from featlab.models import BackboneSpec

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)


# ---- an independent reference: Gram matrices and Kornblith's centring, plain numpy ------------
def ref_center(k: np.ndarray, unbiased: bool) -> np.ndarray:
    k = k.copy()
    n = k.shape[0]
    if unbiased:   # Szekely & Rizzo (2014) U-centring, as in Kornblith et al.'s reference code
        np.fill_diagonal(k, 0)
        means = k.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        k -= means[:, None] + means[None, :]
        np.fill_diagonal(k, 0)
        return k
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ k @ h


def ref_cka(kx: np.ndarray, ky: np.ndarray, debiased: bool = False) -> float:
    kx, ky = ref_center(kx, debiased), ref_center(ky, debiased)
    return float((kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum()))


def ref_linear(x, y, debiased=False):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return ref_cka(x @ x.T, y @ y.T, debiased)


def ref_rbf_gram(x, bandwidth):
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    sigma = bandwidth * np.median(d[np.triu_indices(len(x), 1)])
    return np.exp(-d ** 2 / (2 * sigma ** 2))


def ref_hsic1(k, l):
    """Nguyen et al. (2021) eq. 3, written out with explicit loops-free numpy."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def ref_minibatch(x, y, batches):
    xy = xx = yy = 0.0
    for rows in batches:
        kx, ky = x[rows] @ x[rows].T, y[rows] @ y[rows].T
        xy, xx, yy = xy + ref_hsic1(kx, ky), xx + ref_hsic1(kx, kx), yy + ref_hsic1(ky, ky)
    return xy / np.sqrt(xx * yy)


def correlated(n=120, d1=10, d2=7, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    x = z @ rng.normal(size=(4, d1)) + 0.5 * rng.normal(size=(n, d1)) + 3.0
    y = z @ rng.normal(size=(4, d2)) + rng.normal(size=(n, d2))
    return x, y


def orthogonal(d, seed=1):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0]


# ---- properties ------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_linear_self_symmetry_and_invariances(estimator):
    x, y = correlated()
    assert sim.linear_cka(x, x, estimator=estimator) == pytest.approx(1.0, abs=1e-12)
    v = sim.linear_cka(x, y, estimator=estimator)
    assert 0.2 < v < 0.99
    assert sim.linear_cka(y, x, estimator=estimator) == pytest.approx(v, abs=1e-12)
    q = orthogonal(x.shape[1])
    assert sim.linear_cka(7.5 * x @ q, y, estimator=estimator) == pytest.approx(v, abs=1e-10)
    assert sim.linear_cka(x + 100.0, y, estimator=estimator) == pytest.approx(v, abs=1e-10)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_rbf_self_and_invariances(estimator):
    x, y = correlated(n=80)
    assert sim.rbf_cka(x, x, estimator=estimator) == pytest.approx(1.0, abs=1e-12)
    v = sim.rbf_cka(x, y, bandwidth=0.8, estimator=estimator)
    q = orthogonal(x.shape[1])
    assert sim.rbf_cka(0.01 * x @ q, y, bandwidth=0.8, estimator=estimator) == pytest.approx(
        v, abs=1e-10)
    assert sim.rbf_cka(y, x, bandwidth=0.8, estimator=estimator) == pytest.approx(v, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d", [(150, 12), (20, 60)])   # feature form and Gram form
def test_linear_matches_numpy_reference(n, d, debiased):
    x, y = correlated(n=n, d1=d, d2=d // 2 + 1, seed=n)
    estimator = "debiased" if debiased else "biased"
    assert sim.linear_cka(x, y, estimator=estimator) == pytest.approx(
        ref_linear(x, y, debiased), abs=1e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_matches_numpy_reference(debiased):
    x, y = correlated(n=60)
    for bw in (0.5, 1.0, 2.0):
        ref = ref_cka(ref_rbf_gram(x, bw), ref_rbf_gram(y, bw), debiased)
        got = sim.rbf_cka(x, y, bandwidth=bw, estimator="debiased" if debiased else "biased")
        assert got == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
@pytest.mark.parametrize("n", [40, 400])
def test_feature_and_gram_forms_agree(n, estimator):
    rng = np.random.default_rng(n)
    xs = [rng.normal(size=(n, d)) * s for d, s in ((3, 1.0), (50, 1e-3), (120, 1e3))]
    a, _, fa = sim.cka_arrays(xs, estimator=estimator, form="feature")
    b, _, fb = sim.cka_arrays(xs, estimator=estimator, form="gram")
    assert (fa, fb) == ("feature", "gram")
    np.testing.assert_allclose(a, b, atol=1e-8, rtol=0)


def test_matrix_is_symmetric_and_matches_pairwise_calls():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(90, 3))
    xs = [np.hstack([z, rng.normal(size=(90, d))]) for d in (2, 5, 9, 1)]
    m, reasons, _ = sim.cka_arrays(xs)
    assert reasons == {}
    np.testing.assert_allclose(m, m.T, atol=1e-14)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    for i in range(4):
        for j in range(4):
            assert m[i, j] == pytest.approx(ref_linear(xs[i], xs[j]), abs=1e-6)
    cross, _, _ = sim.cka_arrays(xs[:2], xs[1:])
    np.testing.assert_allclose(cross, m[:2, 1:], atol=1e-12)


def test_float16_inputs_accumulate_in_float64():
    x, y = correlated(n=300, d1=40, d2=30)
    x16, y16 = x.astype(np.float16), y.astype(np.float16)
    ref = ref_linear(x16.astype(np.float64), y16.astype(np.float64))
    assert sim.linear_cka(x16, y16) == pytest.approx(ref, abs=1e-10)
    assert sim.linear_cka(torch.from_numpy(x16), torch.from_numpy(y16)) == pytest.approx(
        ref, abs=1e-10)


def test_debiased_cka_of_independent_gaussians_is_near_zero():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(256, 64)), rng.normal(size=(256, 64))
    assert abs(sim.linear_cka(x, y, estimator="debiased")) < 0.05
    assert sim.linear_cka(x, y) > 0.15     # the biased estimator is not (wide features, small n)
    assert abs(sim.minibatch_cka(x, y, batch_size=64)) < 0.05


def test_minibatch_matches_reference_and_ignores_batch_order():
    x, y = correlated(n=100, d1=6, d2=9)
    plan = batch_plan(100, 32, seed=3)
    assert sorted(np.concatenate(plan).tolist()) == list(range(100))
    assert all(len(b) >= 4 for b in plan)
    assert sim.minibatch_cka(x, y, batch_size=32, seed=3) == pytest.approx(
        ref_minibatch(x, y, plan), abs=1e-6)
    forward, backward = sim.MinibatchAccumulator(), sim.MinibatchAccumulator()
    for rows in plan:
        forward.update([x[rows], y[rows]])
    for rows in plan[::-1]:
        backward.update([x[rows], y[rows]])
    a, _ = forward.result(["x", "y"], ["x", "y"])
    b, _ = backward.result(["x", "y"], ["x", "y"])
    np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)
    np.testing.assert_allclose(np.diag(a), 1.0, atol=1e-12)
    # another seed, another composition: a slightly different estimate
    assert sim.minibatch_cka(x, y, batch_size=32, seed=4) != sim.minibatch_cka(
        x, y, batch_size=32, seed=3)


def test_minibatch_needs_four_samples_per_batch():
    x = np.zeros((20, 3))
    with pytest.raises(ConfigError, match=">= 4"):
        sim.minibatch_cka(x, x, batch_size=3)
    with pytest.raises(ConfigError, match=">= 4 samples"):
        batch_plan(5, 4, seed=0)
    with pytest.raises(ConfigError, match="at least 4"):
        sim.linear_cka(np.eye(3), np.eye(3), estimator="debiased")


def test_nan_only_with_a_named_reason():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    m, reasons, _ = sim.cka_arrays([x, np.full((30, 2), 3.0)], names=["a", "const"])
    assert reasons == {"rows/const": "zero_variance", "columns/const": "zero_variance"}
    assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all() and m[0, 0] == pytest.approx(1)
    # a debiased self-HSIC at or below zero has no square root: NaN with its reason
    hab = torch.tensor([[0.5, 0.2], [0.1, 0.3]], dtype=torch.float64)
    m, reasons = sim._ratio(hab, torch.tensor([1.0, -0.2], dtype=torch.float64),
                            torch.tensor([1.0, 1.0], dtype=torch.float64), [False, False],
                            [False, False], ["a", "b"], ["c", "d"])
    assert reasons == {"rows/b": "negative_hsic"}
    assert np.isnan(m[1]).all() and m[0].tolist() == [0.5, 0.2]
    with pytest.raises(ConfigError, match="same samples"):
        sim.linear_cka(x, x[:10])
    with pytest.raises(ConfigError, match=r"\[n, d\]"):
        sim.linear_cka(np.zeros((3, 4, 5)), np.zeros((3, 4)))


def test_representations():
    feats = np.arange(2 * 3 * 4 * 4, dtype=np.float16).reshape(2, 3, 4, 4)
    gap, _ = represent(feats, "gap")
    np.testing.assert_allclose(gap, feats.astype(np.float64).mean((2, 3)))
    assert represent(feats, "flatten")[0].shape == (2, 48)
    point = featlab.SkipPoint("p", 0, "p", 3, (4, 4), 4, 7, 4, 2)   # unit centres 4u + 1
    coords = np.array([[[0, 0], [15, 15]], [[5, 9], [2, 6]]])
    x, how = represent(feats, "pixels", point=point, coords=coords, input_size=(16, 16))
    assert how == "rf_centre" and x.shape == (4, 3)
    # input pixel 5 -> centre 5 (u=1); 9 -> u=2; 15 -> u=3 (clipped); 2 -> u=0 (nearest 1)
    np.testing.assert_array_equal(x[2], feats[1, :, 1, 2])
    np.testing.assert_array_equal(x[1], feats[0, :, 3, 3])
    np.testing.assert_array_equal(x[3], feats[1, :, 0, 1])
    pooled = featlab.SkipPoint("q", 0, "q", 3, (8, 8), 2, 7, 2, 3)   # stored 4x4 of 8x8
    x, how = represent(feats, "pixels", point=pooled, coords=coords, input_size=(16, 16))
    assert how == "cell_centre"   # footprint of stored cell u: input rows [4u, 4u + 4)
    np.testing.assert_array_equal(x[2], feats[1, :, 1, 2])
    np.testing.assert_array_equal(x[3], feats[1, :, 0, 1])
    pos = sample_positions(10, (16, 8), 5, seed=0)
    assert pos.shape == (10, 5, 2) and pos[..., 1].max() < 8
    np.testing.assert_array_equal(pos, sample_positions(10, (16, 8), 5, seed=0))


# ---- caches ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cka")
    ds = featlab.load_dataset("shapes", split="val", size=32, length=24)
    other = featlab.load_dataset("shapes", split="val", size=32, length=24, seed=1)
    for name, model, data in (("a", ft.TinyResNet(seed=0), ds), ("b", ft.TinyResNet(seed=1), ds),
                              ("c", ft.TinyResNet(seed=0), other)):
        featlab.extract(model, data, "all", tmp / f"{name}.h5", spec=SPEC, batch_size=8,
                        dtype="float16", num_workers=0, progress=False)
    return {k: featlab.open_cache(tmp / f"{k}.h5") for k in "abc"}


def test_cka_matrix_on_a_cache_matches_arrays(caches):
    cache = caches["a"]
    result = sim.cka_matrix(cache, progress=False, device="cpu")
    assert result.names == cache.point_names == result.columns
    xs = [cache[n][:].astype(np.float64).mean((2, 3)) for n in cache.point_names]
    for i, j in [(0, 3), (3, 4), (1, 4)]:
        assert result.matrix[i, j] == pytest.approx(ref_linear(xs[i], xs[j]), abs=1e-6)
    assert result.cache["ids_sha256"] == cache.ids_sha256 and result.num_samples == 24
    assert result.versions["featlab"] == featlab.__version__
    rows = result.rows()
    assert list(rows[0])[0] == "point" and rows[1]["point"] == cache.point_names[1]
    again = sim.CKAResult.from_dict(json.loads(json.dumps(result.to_dict())))
    np.testing.assert_array_equal(again.matrix, result.matrix)
    with pytest.raises(ConfigError, match="unknown"):
        sim.CKAResult.from_dict({**result.to_dict(), "extra": 1})


def test_cka_matrix_pixels_and_minibatch(caches):
    cache = caches["a"]
    pix = sim.cka_matrix(cache, spatial="pixels", positions=6, seed=2, progress=False,
                         points=["conv1", "layer1.1"], device="cpu")
    assert pix.num_samples == 24 * 6 and pix.settings["alignment"]["layer1.1"] == "rf_centre"
    coords = sample_positions(24, (32, 32), 6, seed=2)
    xs = [represent(cache[n][:], "pixels", point=cache.point(n), coords=coords,
                    input_size=(32, 32))[0] for n in ("conv1", "layer1.1")]
    assert pix.matrix[0, 1] == pytest.approx(ref_linear(xs[0], xs[1]), abs=1e-6)
    flat = sim.cka_matrix(cache, spatial="flatten", points=["conv1", "layer1.1"],
                          progress=False, device="cpu")
    xs = [cache[n][:].astype(np.float64).reshape(24, -1) for n in ("conv1", "layer1.1")]
    assert flat.form == "gram" and flat.matrix[0, 1] == pytest.approx(
        ref_linear(xs[0], xs[1]), abs=1e-6)
    mb = sim.cka_matrix(cache, kind="minibatch", batch_size=8, seed=1, progress=False,
                        device="cpu")
    xs = [cache[n][:].astype(np.float64).mean((2, 3)) for n in cache.point_names]
    plan = batch_plan(24, 8, seed=1)
    assert mb.estimator == "debiased" and mb.settings["batch_size"] == 8
    assert mb.matrix[2, 4] == pytest.approx(ref_minibatch(xs[2], xs[4], plan), abs=1e-6)
    with pytest.raises(ConfigError, match="unbiased"):
        sim.cka_matrix(cache, kind="minibatch", estimator="biased", progress=False)


def test_cka_on_a_cache_of_channel_subsets(tmp_path):
    ds = featlab.load_dataset("shapes", split="val", size=32, length=12)
    featlab.extract(ft.TinyResNet(), ds, ["conv1", "layer1.1"], tmp_path / "c.h5", spec=SPEC,
                    max_channels=6, dtype="float32", num_workers=0, progress=False)
    with featlab.open_cache(tmp_path / "c.h5") as cache:
        flat = sim.cka_matrix(cache, spatial="flatten", progress=False, device="cpu")
        xs = [cache[n][:].astype(np.float64).reshape(12, -1) for n in cache.point_names]
        assert [x.shape[1] for x in xs] == [6 * 16 * 16, 6 * 8 * 8]
    assert flat.matrix[0, 1] == pytest.approx(ref_linear(xs[0], xs[1]), abs=1e-6)
    # the result says which subset it saw: another channel seed is another cache
    assert (flat.cache["max_channels"], flat.cache["channel_seed"]) == (6, 0)
    featlab.extract(ft.TinyResNet(), ds, ["conv1", "layer1.1"], tmp_path / "d.h5", spec=SPEC,
                    max_channels=6, channel_seed=1, dtype="float32", num_workers=0,
                    progress=False)
    other = sim.cka_matrix(tmp_path / "d.h5", spatial="flatten", progress=False, device="cpu")
    assert identity_difference(flat.cache, other.cache) == "channel_seed"


def test_cross_model_cka(caches):
    a, b = caches["a"], caches["b"]
    result = sim.cka_matrix(a, b, points="stages", progress=False, device="cpu")
    assert result.names == a.select("stages") and result.cache2["path"] == str(b.path)
    xa = a["layer1.1"][:].astype(np.float64).mean((2, 3))
    xb = b["layer1.0"][:].astype(np.float64).mean((2, 3))
    assert result.value("layer1.1", "layer1.0") == pytest.approx(ref_linear(xa, xb), abs=1e-6)
    assert "b:layer1.0" in result.rows()[0]
    same = sim.cka_matrix(a, a, points="stages", progress=False, device="cpu")
    np.testing.assert_allclose(np.diag(same.matrix), 1.0, atol=1e-12)
    with pytest.raises(CacheError, match="same samples"):
        sim.cka_matrix(a, caches["c"], progress=False)


def test_write_result_refuses_to_overwrite(caches, tmp_path):
    result = sim.cka_matrix(caches["a"], points="stages", progress=False, device="cpu")
    paths = sim.write_result(result, tmp_path / "r")
    assert [p.name for p in paths] == ["r.json", "r.csv"]
    assert json.loads(paths[0].read_text())["names"] == result.names
    assert paths[1].read_text().splitlines()[0] == "point,layer1.0,layer1.1"
    with pytest.raises(ConfigError, match="--force"):
        sim.write_result(result, tmp_path / "r")
    sim.write_result(result, tmp_path / "r", force=True)


class _Spy:
    """A cache proxy that records how many rows each feature read asks for."""

    def __init__(self, cache):
        self._cache, self.largest = cache, 0

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def __len__(self):
        return len(self._cache)

    def __getitem__(self, name):
        spy, array = self, self._cache[name]

        class Rows:
            def __getitem__(self, rows):
                spy.largest = max(spy.largest, len(np.atleast_1d(rows)))
                return array[rows]

        return Rows()


def test_minibatch_reads_one_batch_at_a_time(caches):
    spy = _Spy(caches["a"])
    result = sim.cka_matrix(spy, kind="minibatch", batch_size=6, progress=False, device="cpu")
    assert spy.largest == 6 and result.num_images == 24
    direct = sim.cka_matrix(caches["a"], kind="minibatch", batch_size=6, progress=False,
                            device="cpu")
    np.testing.assert_array_equal(result.matrix, direct.matrix)


def test_memory_guards_refuse_before_reading(caches):
    """The full kinds hold every sample's float64 representation, minibatch one batch's: what
    would not fit under max_bytes is refused with the bytes and the fix, before any read."""
    cache = caches["a"]
    widths = [len(cache.stored_channels(n)) * int(np.prod(cache.stored_size(n)))
              for n in ("conv1", "layer1.1")]
    need = 2 * 8 * 24 * sum(widths) + 8 * 24 * 24 * 2  # centred copies; one n x n Gram each
    kwargs = dict(spatial="flatten", points=["conv1", "layer1.1"], progress=False, device="cpu")
    spy = _Spy(cache)
    with pytest.raises(ConfigError, match=f"24 samples x 2 points need about {need:,} bytes. "
                                          "Fix: use kind='minibatch'"):
        sim.cka_matrix(spy, max_bytes=need - 1, **kwargs)
    assert spy.largest == 0
    sim.cka_matrix(cache, max_bytes=need, **kwargs)
    batch = 8 * 8 * sum(widths)  # minibatch: 8 images at a time
    with pytest.raises(ConfigError, match=f"a batch of 8 samples x 2 points need about "
                                          f"{batch:,} bytes. Fix: spatial='gap'"):
        sim.cka_matrix(spy, kind="minibatch", batch_size=8, max_bytes=batch - 1, **kwargs)
    assert spy.largest == 0
    sim.cka_matrix(cache, kind="minibatch", batch_size=8, max_bytes=batch, **kwargs)
    for bad in (0, 1.5e9, "12G", True):
        with pytest.raises(ConfigError, match="max_bytes must be an int >= 1"):
            sim.cka_matrix(spy, max_bytes=bad, **kwargs)


def test_the_default_memory_cap_follows_the_available_memory(monkeypatch):
    from featlab import allocator
    from featlab.analysis._cka_cache import default_max_bytes

    monkeypatch.setattr(allocator, "available_memory", lambda: 10 << 30)
    assert default_max_bytes() == int(0.8 * (10 << 30))
    monkeypatch.setattr(allocator, "available_memory", lambda: None)
    assert default_max_bytes() == 8 << 30
