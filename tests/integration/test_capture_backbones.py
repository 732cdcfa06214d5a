"""featlab.capture on real torchvision backbones (random weights, 64 px): hook capture of every
skip point equals torchvision's FX feature extractor (style pattern 7, R-1.1); capture through
DistributedDataParallel (gloo, one process) and, where CUDA exists, asynchronous copies to the CPU.

Why the FX extractor runs on a copy without in-place ops: ``create_feature_extractor`` returns
the tensors the graph's nodes produced *after the whole graph ran*, so a node followed by an
in-place module (``ReLU(inplace=True)``) comes back rewritten: exactly the silent error capture
guards against. (``out += identity`` is not a problem there: FX records it as an out-of-place
add.) A deep copy with every ``inplace`` flag set False gives the values the modules returned;
``test_fx_extractor_itself_reports_post_inplace_values`` shows the difference on resnet18.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops.misc import ConvNormActivation

import featlab
from featlab.points import skip_points
from featlab.testing import TinyCNN, random_images

MODELS = ["vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50", "resnet101", "densenet121",
          "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
          "regnet_y_400mf"]
SIZE = 64


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    # random init leaves BN/LN statistics at identity; give them values so that a capture of the
    # wrong side of a normalisation layer cannot pass by accident
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def without_inplace(model: nn.Module) -> nn.Module:
    """A copy for the FX extractor: no in-place ops, and no opaque torchvision.ops blocks.

    torchvision's tracer keeps every ``torchvision.ops`` module as one leaf node, so skip points
    inside a ``Conv2dNormActivation`` (``features.0.0`` of mobilenet_v2, ``stem.0`` of regnet)
    have no node; the class is an ``nn.Sequential`` with only a custom ``__init__``, so the copy
    is re-classed to ``nn.Sequential`` and traced through.
    """
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
        if isinstance(m, ConvNormActivation):  # also regnet's SimpleStemIN subclass
            m.__class__ = nn.Sequential
    return clone


def hooks_left(model: nn.Module) -> list[str]:
    return [f"{name}.{attr}" for name, m in model.named_modules()
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                         "_backward_pre_hooks") if getattr(m, attr)]


@pytest.fixture(scope="module", autouse=True)
def flush_denormals():
    # Random-init backbones drive activations into float32 denormals, which make CPU convolutions
    # several times slower (resnet50 at 64 px: 3.4 s vs 0.5 s). Flushing them to zero changes
    # capture and the FX reference alike; restored to torch's default afterwards.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module", params=MODELS)
def backbone(request):
    model = build(request.param)
    return request.param, model, skip_points(model, input_size=SIZE)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


@pytest.mark.slow
def test_capture_equals_fx_extractor(backbone, images):
    name, model, points = backbone
    assert points, f"no skip points found for {name}"
    with torch.no_grad(), featlab.capture(model, points) as acts:
        model(images)
    # a module path is a partial FX node name: torchvision returns the last node inside it
    extractor = create_feature_extractor(without_inplace(model),
                                         return_nodes={p.module: p.name for p in points})
    with torch.no_grad():
        expected = extractor(images)
    assert list(acts) == [p.name for p in points]  # execution order, one entry per point
    for p in points:
        got = acts[p.name]
        assert got.shape[1:] == (p.channels, *p.size), p.name
        torch.testing.assert_close(got, expected[p.name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=p.name: f"{name} {n}: {m}")
    assert hooks_left(model) == []


@pytest.mark.slow
def test_fx_extractor_itself_reports_post_inplace_values(images):
    """Why the reference runs on a copy without in-place ops: on the model as built, the FX
    extractor's ``bn1`` (a skip point of resnet18) comes back rewritten by the
    ``relu(inplace=True)`` after it, while capture returns what ``bn1`` returned."""
    model = build("resnet18")
    names = ["bn1", "relu", "layer1.0.bn1"]
    with torch.no_grad(), featlab.capture(model, names) as acts:
        model(images)
    nodes = {n: n for n in names}
    with torch.no_grad():
        plain = create_feature_extractor(copy.deepcopy(model), return_nodes=nodes)(images)
        clean = create_feature_extractor(without_inplace(model), return_nodes=nodes)(images)
        by_hand = model.bn1(model.conv1(images))
    torch.testing.assert_close(acts["bn1"], by_hand, atol=1e-5, rtol=1e-4)
    for n in names:
        torch.testing.assert_close(acts[n], clean[n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain["bn1"], acts["relu"])  # post-relu, not what bn1 returned
    assert not torch.allclose(plain["bn1"], acts["bn1"], atol=1e-3)
    # ("layer1.0.bn1" survives in `plain` only because the graph is cut after it, so the
    # in-place relu that follows it is dead code there)


def test_distributed_data_parallel_is_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        net = TinyCNN()
        ddp = nn.parallel.DistributedDataParallel(net)
        x = random_images(2, 16)
        with torch.no_grad(), featlab.capture(ddp, ["features.2", "module.features.5"]) as acts:
            ddp(x)
        with torch.no_grad():
            torch.testing.assert_close(acts["features.2"], net.features[:3](x))
        assert acts["module.features.5"].shape == (2, 16, 4, 4)
        assert hooks_left(ddp) == []
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_to_cpu_copies_are_complete_when_the_forward_returns():
    model = build("resnet18").cuda()
    x = torch.rand(4, 3, 128, 128, device="cuda")
    points = skip_points(model, input_size=128)
    with torch.no_grad():
        with featlab.capture(model, points) as on_gpu:
            model(x)
        with featlab.capture(model, points, device="cpu") as on_cpu:
            model(x)
    for p in points:
        assert on_cpu[p.name].device.type == "cpu"
        torch.testing.assert_close(on_cpu[p.name], on_gpu[p.name].cpu())
