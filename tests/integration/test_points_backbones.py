"""Skip points of the 12 supported backbones: discovery checked against a plain forward with hooks,
receptive fields against hand-derived closed forms and the gradient cross-check.

Models are built with random weights (``weights=None`` never downloads), once per module: the
``backbone`` fixture is module-scoped and parametrized, so pytest runs every test of one model
before building the next.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from featlab.errors import InputSizeError
from featlab.points import select_points, skip_points
from featlab.receptive_field import gradient_receptive_field

pytestmark = pytest.mark.slow

MODELS = ["vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50", "resnet101", "densenet121",
          "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
          "regnet_y_400mf"]
SIZE = 128  # stride 32 -> 4x4 at the last point; the second (stride) run is at 64 px


@pytest.fixture(scope="module", params=MODELS)
def backbone(request):
    torch.manual_seed(0)
    model = torchvision.models.get_model(request.param, weights=None).eval()
    return request.param, model, skip_points(model, SIZE)


def test_points_match_a_plain_forward(backbone):
    name, model, points = backbone
    modules = dict(model.named_modules())
    assert [p.index for p in points] == list(range(len(points)))
    assert len({p.name for p in points}) == len(points)
    assert all(p.module == p.name and p.name in modules for p in points)
    calls: dict[str, list[torch.Tensor]] = {p.name: [] for p in points}
    seen: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def record(point_name):
        def hook(_m, _i, out):
            calls[point_name].append(out.detach().clone())
            order.append(point_name)
        return hook

    # the global pool's input: avgpool where it is a module; mobilenet_v2 and densenet121 pool
    # functionally after `features` (densenet121 also applies a functional relu first, which no
    # hook can capture, so its last hookable point is the output of `features`)
    pool = getattr(model, "avgpool", None)
    handles = [modules[p.module].register_forward_hook(record(p.name)) for p in points]
    if pool is not None:
        handles.append(pool.register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("pool", args[0].detach().clone())))
    else:
        handles.append(model.features.register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("pool", out.detach().clone())))
    try:
        with torch.no_grad():
            model(torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
    assert order == [p.name for p in points]  # each fires once, in execution order
    for p in points:
        (out,) = calls[p.name]
        assert out.shape == (1, p.channels, *p.size), p.name
    assert torch.equal(calls[points[-1].name][0], seen["pool"])


def test_strides_and_receptive_fields(backbone):
    name, _, points = backbone
    strides = [p.stride for p in points]
    assert strides == sorted(strides) and strides[-1] == 32
    assert set(strides) <= {1, 2, 4, 8, 16, 32}
    for p in points:
        # the effective stride of the graph arithmetic equals the measured one
        assert p.rf_status.startswith("exact") and p.rf_stride == p.stride, p.name
        assert p.size == (SIZE // p.stride, SIZE // p.stride), p.name
    rf = [p.rf_size for p in points]
    assert rf == sorted(rf)
    se = name in ("mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")
    assert ("global context via SE at" in points[-1].rf_status) == se
    stages = select_points(points, "stages")
    assert [p.stride for p in stages] == sorted(set(strides))
    assert stages[-1] == points[-1]


# hand-derived counts. vgg16: 13 conv + 13 relu + 5 pool; vgg16_bn adds 13 bn. ResNets: stem
# conv1, bn1, relu, maxpool + one point per block (resnet18 2+2+2+2, resnet34/50 3+4+6+3,
# resnet101 3+4+23+3). densenet121: conv0 norm0 relu0 pool0 + 4 blocks + 3 transitions x
# (norm relu conv pool) + norm5. mobilenet_v2: features.0 (conv bn relu6) + features.1 (dw conv
# bn relu6, conv, bn) + 6 first-of-stage blocks x 8 (expand 3, dw 3, conv, bn) + 10 residual
# blocks x 1 + features.18 (3).
COUNTS = {"vgg16": 13 + 13 + 5, "vgg16_bn": 13 * 3 + 5, "resnet18": 4 + 8, "resnet34": 4 + 16,
          "resnet50": 4 + 16, "resnet101": 4 + 33, "densenet121": 4 + 4 + 12 + 1,
          "mobilenet_v2": 3 + 5 + 6 * 8 + 10 + 3}
LAST = {"vgg16": "features.30", "vgg16_bn": "features.43", "resnet18": "layer4.1",
        "resnet34": "layer4.2", "resnet50": "layer4.2", "resnet101": "layer4.2",
        "densenet121": "features.norm5", "mobilenet_v2": "features.18.2"}


@pytest.mark.parametrize("backbone", list(COUNTS), indirect=True)
def test_counts_and_last_point(backbone):
    name, _, points = backbone
    assert len(points) == COUNTS[name]
    assert points[-1].name == LAST[name]


# Araujo et al. closed forms, r = 1 + sum (k-1) * jump, P = sum p * jump, written out:
# resnet18: conv1 7/2 p3 -> r 7, P 3, jump 2; maxpool 3/2 p1 -> r 11, P 5, jump 4;
#   layer1 4 x 3x3 p1 at 4 -> r 43, P 21; layer2 3x3/2 at 4 (r 51, P 25, jump 8) + 3 x at 8 ->
#   r 99, P 49; layer3 at 8 then 3 x at 16 -> r 211, P 105; layer4 at 16 then 3 x at 32 ->
#   r 435, P 217.
# resnet50 (one 3x3 per bottleneck; 1x1s add nothing): stem r 11, P 5; layer1 3 x at 4 -> 35, 17;
#   layer2 at 4 + 3 x at 8 -> 91, 45; layer3 at 8 + 5 x at 16 -> 267, 133;
#   layer4 at 16 + 2 x at 32 -> 427, 213.
# vgg16: conv 3x3 p1 pairs/triples, pool 2/2 p0: r 1+2+2 =5, +1=6 (j2), +4+4=14, +2=16 (j4),
#   +8*3=40, +4=44 (j8), +16*3=92, +8=100 (j16), +32*3=196, +16=212 (j32);
#   P = 1+1 + 2+2 + 4*3 + 8*3 + 16*3 = 90.
# convnext_tiny: stem 4/4 -> r 4 (j4); 3 blocks 7x7 p3 at 4 -> +72 = 76, P 36; down 2/2 -> 80
#   (j8); 3 x at 8 -> 224, P 36+72=108; down -> 232 (j16); 9 x at 16 -> 1096, P 108+432=540;
#   down -> 1112 (j32); 3 x at 32 -> 1688, P 540+288=828.
FIELDS = {"resnet18": ("layer4", 435, 32, 217), "resnet50": ("layer4", 427, 32, 213),
          "vgg16": ("features.30", 212, 32, 90), "convnext_tiny": ("features.7", 1688, 32, 828)}


@pytest.mark.parametrize("backbone", list(FIELDS), indirect=True)
def test_receptive_field_closed_forms(backbone):
    name, _, points = backbone
    selector, rf, jump, padding = FIELDS[name]
    (point,) = select_points(points, selector)
    assert (point.rf_size, point.rf_stride, point.rf_padding) == (rf, jump, padding)


@pytest.mark.parametrize("backbone", ["resnet50"], indirect=True)
def test_resnet50_stage_strides(backbone):
    _, _, points = backbone
    stages = select_points(points, "stages")
    assert [p.stride for p in stages] == [2, 4, 8, 16, 32]
    assert [p.name for p in stages] == ["relu", "layer1.2", "layer2.3", "layer3.5", "layer4.2"]


@pytest.mark.parametrize("backbone", ["resnet18"], indirect=True)
def test_resnet18_gradient_support_equals_theory(backbone):
    # at 128 px the centre unit's field fits inside the image up to layer2 (r 99, P 49: unit 8
    # at stride 8 sees 64-49 = 15 .. 113), so the support must equal the field exactly
    _, model, points = backbone
    for p in select_points(points, "relu, maxpool, layer1.1, layer2.1"):
        emp = gradient_receptive_field(model, p.module, SIZE)
        start = emp.unit[0] * p.rf_stride - p.rf_padding
        assert start >= 0 and start + p.rf_size <= SIZE
        assert emp.start == (start, start) and emp.size == (p.rf_size, p.rf_size), p.name



@pytest.mark.parametrize("backbone", ["vgg16"], indirect=True)
def test_vgg16_too_small_input(backbone):
    # five 2x2 max-pools (floor): 32 -> 16 -> 8 -> 4 -> 2 -> 1, while 31 -> ... -> 1 -> 0 fails
    _, model, _ = backbone
    with pytest.raises(InputSizeError, match="at least 32 px"):
        skip_points(model, 24)
