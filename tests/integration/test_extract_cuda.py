"""featlab.extract on a GPU: pinned slots, asynchronous copies handed over one batch late, and
statistics computed on the device -- checked against the same forward through featlab.capture.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/integration/
test_extract_cuda.py``.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import featlab
import featlab.testing as ft
from featlab.cache import schema
from featlab.cache.verify import verify
from featlab.cache.writer import extract
from featlab.data import load_dataset
from featlab.errors import FeatlabWarning
from featlab.models import BackboneSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)


@pytest.fixture(autouse=True)
def same_kernels():
    """The reference and the extraction run the same convolution algorithms (cuDNN's choice
    can otherwise differ from call to call, and with it the last bits)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def reference(model, spec, ds, names, batch_size, device="cuda"):
    """Float32 activations of the same batches by featlab.capture, on ``device``."""
    out = {name: [] for name in names}
    with torch.inference_mode(), featlab.capture(model, names) as acts:
        for start in range(0, len(ds), batch_size):
            stop = min(len(ds), start + batch_size)
            x = torch.stack([ds[i]["image"] for i in range(start, stop)]).to(device)
            model(spec.normalize(x))
            for name in names:
                out[name].append(acts[name].cpu())
    return {name: torch.cat(v) for name, v in out.items()}


@pytest.mark.slow
def test_a_gpu_extraction_stores_what_the_gpu_computed(tmp_path):
    model, spec = featlab.get_backbone("resnet18", weights="none")  # stays on the CPU
    ds = load_dataset("shapes", "val", size=64, length=11)  # batches of 4, 4, 3
    result = extract(model, ds, "all", tmp_path / "c.h5", batch_size=4, device="cuda",
                     save_images=True, num_workers=2, progress=False)
    assert next(model.parameters()).device.type == "cpu"  # moved for the call, moved back
    names = list(result.points)
    assert len(names) == 12 and result.written == 11
    model.cuda()
    ref = reference(model, spec, ds, names, batch_size=4)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert [i.decode() for i in f[schema.IDS][:]] == ds.ids
        assert f[schema.WRITTEN][:].all()
        for name in names:  # every row of every batch, the last one too: no slot reused early
            np.testing.assert_array_equal(f[f"points/{name}"][:], ref[name].half().numpy(),
                                          err_msg=name)
        np.testing.assert_array_equal(f[schema.LABELS][:],
                                      np.stack([ds[i]["mask"].numpy() for i in range(11)]))
        np.testing.assert_array_equal(f[schema.IMAGES][:], np.stack(
            [ds.sample(i)[0].transpose(2, 0, 1) for i in range(11)]))
        # the bound, computed on the device: half numpy's float16 spacing at the largest |value|
        largest = [np.abs(f[f"points/{n}"][:]).reshape(11, -1).max(1) for n in names]
        bound = np.stack([np.spacing(m).astype(np.float32) / 2 for m in largest], axis=1)
        np.testing.assert_array_equal(f[schema.ABS_ERROR][:], bound)
        assert (f[schema.NONFINITE][:] == 0).all()
        assert json.loads(f.attrs["runtime"])["device"].startswith("cuda")
    assert verify(tmp_path / "c.h5", progress=False).ok

    # the same cache made on the CPU agrees to float16 and TF32 precision, point by point
    cpu = extract(model.cpu(), ds, "all", tmp_path / "cpu.h5", batch_size=4, device="cpu",
                  num_workers=0, progress=False)
    assert cpu.points == result.points
    with h5py.File(tmp_path / "c.h5", "r") as g, h5py.File(tmp_path / "cpu.h5", "r") as c:
        for name in names:
            a = g[f"points/{name}"][:].astype(np.float64)
            b = c[f"points/{name}"][:].astype(np.float64)
            assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b), name


@pytest.mark.slow
def test_gpu_pooling_channel_subsets_and_the_exact_error(tmp_path):
    model = ft.TinyResNet().cuda()
    ds = load_dataset("shapes", "val", size=32, length=7)
    names = ["conv1", "layer1.1"]
    ref = reference(model, SPEC, ds, names, batch_size=3)
    extract(model, ds, names, tmp_path / "e.h5", spec=SPEC, batch_size=3, error_stat="exact",
            num_workers=0, progress=False)
    with h5py.File(tmp_path / "e.h5", "r") as f:
        for k, name in enumerate(names):
            np.testing.assert_array_equal(f[f"points/{name}"][:], ref[name].half().numpy())
            exact = (ref[name] - ref[name].half().float()).abs().flatten(1).amax(1).numpy()
            np.testing.assert_array_equal(f[schema.ABS_ERROR][:, k], exact)
    extract(model, ds, names, tmp_path / "p.h5", spec=SPEC, batch_size=3, dtype="float32",
            max_size=4, max_channels=5, channel_seed=1, num_workers=0, progress=False)
    with featlab.open_cache(tmp_path / "p.h5") as cache:
        for name in names:
            kept = cache.stored_channels(name).tolist()
            x = ref[name][:, kept]
            n, c, h, w = x.shape
            blocks = x.reshape(n, c, 4, h // 4, 4, w // 4).mean(dim=(3, 5))
            torch.testing.assert_close(cache[name][:], blocks.numpy(), rtol=1e-5, atol=1e-6)
        assert (cache.abs_error[:] == 0).all()


def test_gpu_nonfinite_values_are_counted_per_point_and_sample(tmp_path):
    class Sqrt(nn.Module):
        def forward(self, x):
            return torch.sqrt(x)

    class Net(nn.Module):  # sqrt of x - 0.4: NaN wherever the normalised value is below 0.4
        def __init__(self):
            super().__init__()
            self.sqrt = Sqrt()

        def forward(self, x):
            return self.sqrt(x - 0.4).mean((2, 3))

    ds = load_dataset("shapes", "val", size=16, length=5)
    with pytest.warns(FeatlabWarning, match="NaN/Inf"):
        result = extract(Net(), ds, "all", tmp_path / "c.h5", spec=SPEC, batch_size=2,
                         device="cuda", num_workers=0, progress=False)
    x = torch.stack([SPEC.normalize(ds[i]["image"]) for i in range(5)])
    expected = (x < 0.4).flatten(1).sum(1).tolist()
    assert sum(expected) > 0
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f[schema.NONFINITE][:, 0].tolist() == expected
        assert np.isfinite(f[schema.ABS_ERROR][:]).all()  # measured over the finite values
    assert result.nonfinite == tuple(sorted(("sqrt", ds.ids[i], c) for i, c in enumerate(expected)
                                            if c))
