"""Receptive-field rules against hand-derived closed forms and the gradient cross-check."""

from __future__ import annotations

import random

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.ops import SqueezeExcitation

import featlab.testing as ft
from featlab.errors import ConfigError, SkipPointNotFoundError
from featlab.points import skip_points
from featlab.receptive_field import RFAxis, gradient_receptive_field, graph_receptive_fields


def expected_support(point, unit: int, size: int) -> tuple[int, int]:
    """Theory: unit u sees [u*S - P, u*S - P + r - 1], clipped to the image."""
    start = unit * point.rf_stride - point.rf_padding
    return max(0, start), min(size - 1, start + point.rf_size - 1)


def assert_gradient_matches(model: nn.Module, size: int, points=None):
    for p in points or skip_points(model, size):
        emp = gradient_receptive_field(model, p.module, size)
        assert (emp.start[0], emp.stop[0]) == expected_support(p, emp.unit[0], size), p.name
        assert (emp.start[1], emp.stop[1]) == expected_support(p, emp.unit[1], size), p.name


def araujo(layers):
    """Closed forms of Araujo et al. 2019 over (k, s, p, d) layers, written out independently:
    r0 = sum_l (k_l' - 1) prod_{i<l} s_i + 1 with k' = d(k-1)+1; S0 = prod s_i;
    P0 = sum_l p_l prod_{i<l} s_i."""
    r, P, jump = 1, 0, 1
    for k, s, p, d in layers:
        r += (d * (k - 1)) * jump
        P += p * jump
        jump *= s
    return r, jump, P


def test_dilated_net_hand_derived():
    # three 3x3 convs with dilation 1, 2, 4: r = 1 + 2*1 + 2*2 + 2*4 = 15, S = 1, P = 1+2+4 = 7
    last = skip_points(ft.DilatedNet(), 32)[-1]
    assert (last.name, last.rf_size, last.rf_stride, last.rf_padding, last.stride) == \
        ("convs.2", 15, 1, 7, 1)
    assert last.rf_status == "exact"
    emp = gradient_receptive_field(ft.DilatedNet(), "convs.2", 32)
    assert emp.unit == (16, 16) and emp.start == (9, 9) and emp.size == (15, 15)


def test_tiny_resnet_hand_derived_and_gradient():
    # conv1 3x3 s2 p1: r=3, S=2, P=1. layer1.0: two 3x3 p1 at S=2: r=3+4+4=11, P=1+2+2=5.
    # layer1.1: 3x3 s2 p1 at S=2 -> r=15, P=7, S=4; 3x3 p1 at S=4 -> r=23, P=11.
    # its shortcut 1x1 s2 keeps r=11, P=5: centres -11+11 = -5+5 = 0 align, the max is 23.
    points = skip_points(ft.TinyResNet(), 32)
    assert [(p.rf_size, p.rf_stride, p.rf_padding) for p in points] == \
        [(3, 2, 1)] * 3 + [(11, 2, 5), (23, 4, 11)]
    assert_gradient_matches(ft.TinyResNet(), 32, points)


@pytest.mark.parametrize("seed", range(4))
def test_random_chains_match_the_closed_forms(seed):
    rng = random.Random(seed)
    layers, modules, channels = [], [], 3
    for _ in range(5):
        k, s, d = rng.choice([1, 2, 3, 5]), rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2])
        p = rng.randint(0, d * (k - 1) // 2)
        if rng.random() < 0.3:
            modules.append(nn.MaxPool2d(k, s, min(p, k // 2), dilation=d,
                                        ceil_mode=rng.random() < 0.5))
            p = min(p, k // 2)
        else:
            modules.append(nn.Conv2d(channels, 4, k, s, p, dilation=d))
            channels = 4
        layers.append((k, s, p, d))
    net = nn.Sequential(*modules).eval()
    last = skip_points(net, 200)[-1]
    r, jump, P = araujo(layers)
    assert (last.rf_size, last.rf_stride, last.rf_padding) == (r, jump, P), layers
    assert last.stride == jump  # measured from output sizes agrees with the graph


def test_ceil_mode_pool_and_gradient():
    # conv 3 (p0): r=3; max-pool 3 s2 ceil: r=5, S=2; conv 3: r=5+2*2=9, P=0
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(4, 4, 3))
    points = skip_points(net, 24)
    assert [(p.rf_size, p.rf_stride, p.rf_padding) for p in points] == \
        [(3, 1, 0), (5, 2, 0), (9, 2, 0)]
    assert_gradient_matches(net, 24, points)


class Fork(nn.Module):
    """Two branches whose centres differ: a 5x3 kernel (padding 2, 1) and a 4x4 'same' one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, (5, 3), padding=(2, 1))
        self.b = nn.Conv2d(3, 4, 4, padding="same")

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_misaligned_branches_non_square_kernel_and_same_padding():
    # H: a sees [-2, 2]; b ('same', 4: total pad 3, 1 on the left, 2 on the right) sees [-1, 2].
    # centres 0 vs 0.5: misaligned; union [-2, 2] -> r=5, P=2.
    # W: a sees [-1, 1], b [-1, 2]: union [-1, 2] -> r=4, P=1.
    net = nn.Sequential(Fork(), nn.Conv2d(4, 4, 1))
    point = skip_points(net, 16)[0]
    assert (point.name, point.rf_size, point.rf_stride, point.rf_padding) == ("0", 5, 1, 2)
    assert "misaligned at 0" in point.rf_status
    gm = fx.symbolic_trace(net)
    ShapeProp(gm).propagate(torch.zeros(1, 3, 16, 16))  # torch's own shape propagation
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if "tensor_meta" in n.meta}
    field = graph_receptive_fields(gm.graph, gm, shapes)["add"]
    assert field.h == RFAxis(5, 1, -2) and field.w == RFAxis(4, 1, -1)
    emp = gradient_receptive_field(net, "0", 16)
    assert emp.start == (8 - 2, 8 - 1) and emp.stop == (8 + 2, 8 + 2)


def test_squeeze_excitation_reports_local_field_and_global_context():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SqueezeExcitation(8, 2),
                        nn.Conv2d(8, 8, 3, padding=1))
    points = skip_points(net, 16)
    assert [(p.name, p.rf_size) for p in points] == [("0", 3), ("1", 3), ("2", 5)]
    assert points[0].rf_status == "exact"
    assert points[1].rf_status == points[2].rf_status == "exact; global context via SE at 1"
    assert_gradient_matches(net, 16, points)  # gates held constant: the local field


def test_group_norm_brings_global_context():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1))
    points = skip_points(net, 16)
    assert [p.rf_size for p in points] == [3, 3, 3]
    assert points[1].rf_status == "exact; global context via GroupNorm at 1"


def test_unknown_op_gives_status_and_no_numbers_downstream():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.PixelUnshuffle(2),
                        nn.Conv2d(16, 4, 3, padding=1))
    points = skip_points(net, 16)
    assert [p.stride for p in points] == [1, 2, 2]  # measured even where the rule is missing
    assert points[0].rf_size == 3 and points[0].rf_status == "exact"
    for p in points[1:]:
        assert p.rf_status == "unknown: PixelUnshuffle at 1"
        assert (p.rf_size, p.rf_stride, p.rf_padding) == (None, None, None)


def test_convnext_block_permute_layernorm_linear():
    # stem 4x4 s4: r=4, S=4; LayerNorm2d pointwise; CNBlock: 7x7 depthwise p3 at S=4:
    # r = 4 + 6*4 = 28, P = 0 + 3*4 = 12; permute / LayerNorm / Linear act on channels only.
    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8), CNBlock(8, 1e-6, 0.0))
    points = skip_points(net, 32)
    assert [(p.name, p.rf_size, p.rf_stride, p.rf_padding, p.rf_status) for p in points] == [
        ("0", 4, 4, 0, "exact"), ("1", 4, 4, 0, "exact"), ("2", 28, 4, 12, "exact")]
    assert_gradient_matches(net, 32, points)


def test_gradient_check_leaves_the_model_alone_and_validates_names():
    net = ft.TinyResNet()
    before = [p.clone() for p in net.parameters()]
    gradient_receptive_field(net, "layer1", 32)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert isinstance(net.relu, nn.ReLU) and isinstance(net.bn1, nn.BatchNorm2d)
    with pytest.raises(SkipPointNotFoundError, match="Did you mean 'layer1'"):
        gradient_receptive_field(net, "layr1", 32)
    with pytest.raises(ConfigError, match=r"\[N, C, H, W\]"):
        gradient_receptive_field(net, "fc", 32)


def test_rfaxis_rejects_broken_invariants():
    with pytest.raises(ValueError):
        RFAxis(size=0)
    assert RFAxis(11, 4, -5).padding == 5


def test_adaptive_pool_without_measured_sizes_is_unknown_not_a_crash():
    # measuring stops after the deepest point, so a classifier's pool may have no sizes
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    gm = fx.symbolic_trace(net)
    shapes = {"input_1": (1, 3, 16, 16), "_0": (1, 4, 16, 16)}
    fields = graph_receptive_fields(gm.graph, gm, shapes)
    assert fields["_0"].status == "exact"
    assert fields["_1"].status == "unknown: AdaptiveAvgPool2d at 1 (sizes not measured)"
