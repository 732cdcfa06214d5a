"""Skip-point discovery and selection on tiny nets (featlab.points)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featlab
import featlab.testing as ft
from featlab.errors import ConfigError, FeatlabError, InputSizeError, SkipPointNotFoundError
from featlab.errors import GraphTraceError
from featlab.points import SkipPoint, select_points, skip_points

KEYS = ["name", "index", "module", "channels", "size", "stride", "rf_size", "rf_stride",
        "rf_padding"]


@pytest.fixture(scope="module")
def tiny_points() -> list[SkipPoint]:
    return skip_points(ft.TinyResNet(), 32)


# -- the record ---------------------------------------------------------------------------------
def test_to_dict_has_exactly_the_design_keys_and_is_json():
    p = SkipPoint("layer3.1", 7, "layer3.1", 256, (14, 14), 16, 211, 16, 105)
    d = p.to_dict()
    assert sorted(d) == sorted(KEYS)
    assert d["size"] == [14, 14]
    assert json.loads(json.dumps(d)) == d


def test_from_dict_round_trip_and_unknown_key(tiny_points):
    for p in tiny_points:
        assert SkipPoint.from_dict(p.to_dict()) == p
    d = tiny_points[0].to_dict()
    with pytest.raises(ConfigError, match="unknown \\['colour'\\]"):
        SkipPoint.from_dict({**d, "colour": "red"})
    del d["stride"]
    with pytest.raises(ConfigError, match="missing \\['stride'\\]"):
        SkipPoint.from_dict(d)


@pytest.mark.parametrize("bad", [{"channels": 0}, {"size": (7,)}, {"stride": 1.5},
                                 {"name": ""}, {"rf_size": "big"}, {"index": -1}])
def test_invalid_record_is_rejected(bad):
    fields = dict(name="a", index=0, module="a", channels=1, size=(1, 1), stride=1,
                  rf_size=None, rf_stride=None, rf_padding=None)
    with pytest.raises(ConfigError):
        SkipPoint(**{**fields, **bad})


# -- discovery ----------------------------------------------------------------------------------
def test_tiny_resnet_points_are_block_outputs_in_execution_order(tiny_points):
    # stem conv1 (3x3 s2) -> bn1 -> relu, then two BasicBlocks; the block's reused in-place relu
    # fires twice, so the block is named after the block module; 32 px in -> 16 and 8 px out.
    assert [p.name for p in tiny_points] == ["conv1", "bn1", "relu", "layer1.0", "layer1.1"]
    assert [p.index for p in tiny_points] == [0, 1, 2, 3, 4]
    assert [p.module for p in tiny_points] == [p.name for p in tiny_points]
    assert [p.channels for p in tiny_points] == [8, 8, 8, 8, 16]
    assert [p.size for p in tiny_points] == [(16, 16)] * 4 + [(8, 8)]
    assert [p.stride for p in tiny_points] == [2, 2, 2, 2, 4]
    assert tiny_points[-1].aliases == ("layer1",)


def test_global_pool_and_classifier_are_not_points():
    names = [p.name for p in skip_points(ft.TinyCNN(), 16)]
    assert names == [f"features.{i}" for i in range(6)]


def test_stride_is_the_same_measured_below_and_above_the_input():
    # 32 px is measured against 96 px, 128 px against 64 px
    small = skip_points(ft.TinyResNet(), 32)
    large = skip_points(ft.TinyResNet(), 128)
    assert [p.stride for p in small] == [p.stride for p in large]
    assert large[-1].size == (32, 32)


def test_rectangular_input():
    points = skip_points(ft.TinyResNet(), (32, 48))
    assert points[-1].size == (8, 12) and points[-1].stride == 4


def test_execution_order_not_registration_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Conv2d(4, 4, 3, padding=1)
            self.first = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.second(self.first(x))

    assert [p.name for p in skip_points(Reversed(), 8)] == ["first", "second"]


def test_functional_and_reused_cuts_are_not_points():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()  # used twice: a hook on it would fire twice

        def forward(self, x):
            x = F.relu(self.c1(x))  # functional: no module returns it
            return self.act(self.c2(self.act(x)))

    assert [p.name for p in skip_points(Net(), 8)] == ["c1", "c2"]


def test_reading_the_input_size_does_not_bypass_the_layers():
    # segmentation models resize their output to x.shape: a path that carries no values
    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1))
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            out = self.head(self.enc(x))
            return {"out": F.interpolate(out, size=x.shape[-2:], mode="bilinear")}

    points = skip_points(Seg(), 32)
    assert [(p.name, p.stride) for p in points] == [
        ("enc.0", 2), ("enc.1", 2), ("enc.2", 4), ("head", 4)]


def test_a_torchvision_segmentation_model_has_its_backbone_and_head_points():
    from torchvision.models.segmentation import fcn_resnet50

    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=5)
    points = {p.name: p for p in skip_points(model, 64)}
    # dilated: output stride 8 from layer2 on
    assert [points[f"backbone.{n}"].stride for n in ("layer1.2", "layer2.3", "layer3.5",
                                                      "layer4.2")] == [4, 8, 8, 8]
    assert points["classifier.4"].channels == 5
    with torch.inference_mode(), featlab.capture(model, ["backbone.layer3.5"]) as acts:
        model.eval()(torch.zeros(1, 3, 64, 64))
    assert acts["backbone.layer3.5"].shape == (1, 1024, 8, 8)


def test_a_model_without_any_skip_point_says_so():
    class TwoBranches(nn.Module):  # no module output lies on every path
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(SkipPointNotFoundError, match="TwoBranches has none .*model.backbone"):
        skip_points(TwoBranches(), 16)


def test_training_flags_restored_and_no_hooks_left():
    net = ft.TinyResNet().train()
    net.layer1[0].eval()
    before = {name: m.training for name, m in net.named_modules()}
    params = [p.clone() for p in net.parameters()]
    skip_points(net, 32)
    assert {name: m.training for name, m in net.named_modules()} == before
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))


def test_wrapped_models_are_unwrapped():
    class Compiled(nn.Module):  # torch.compile's OptimizedModule keeps the model in _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    expected = ["conv1", "bn1", "relu", "layer1.0", "layer1.1"]
    assert [p.name for p in skip_points(nn.DataParallel(ft.TinyResNet()), 32)] == expected
    assert [p.name for p in skip_points(Compiled(ft.TinyResNet()), 32)] == expected


def test_too_small_input_names_the_smallest_size():
    # conv 5x5 (no padding): s-4; max-pool 2: floor((s-4)/2); conv 3x3 needs >= 3 -> s >= 10
    net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))
    with pytest.raises(InputSizeError, match="at least 10 px"):
        skip_points(net, 8)
    assert skip_points(net, 10)[-1].size == (1, 1)


def test_untraceable_model_raises_a_featlab_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(GraphTraceError, match="featlab.capture") as info:
        skip_points(Branchy(), 8)
    assert isinstance(info.value, FeatlabError)


@pytest.mark.parametrize("size", [0, -3, "224", (1, 2, 3), 2.5])
def test_bad_input_size(size):
    with pytest.raises(ConfigError, match="input_size"):
        skip_points(ft.TinyCNN(), size)


def test_not_a_module():
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        skip_points("resnet18")


def test_public_api_exports():
    assert featlab.skip_points is skip_points and featlab.SkipPoint is SkipPoint
    assert featlab.select_points is select_points


# -- selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("selection, expected", [
    ("all", ["conv1", "bn1", "relu", "layer1.0", "layer1.1"]),
    ("stages", ["layer1.0", "layer1.1"]),              # last point at stride 2 and at 4
    ("layer1.*", ["layer1.0", "layer1.1"]),
    ("*1", ["conv1", "bn1", "layer1.1"]),
    (r"re:layer1\.\d", ["layer1.0", "layer1.1"]),
    ("re:(conv|bn)1", ["conv1", "bn1"]),
    ("re:layer1", ["layer1.1"]),                        # full match of the alias only
    ("layer1", ["layer1.1"]),                           # an alias (outer module, same tensor)
    ("layer1.1, conv1,layer1.*", ["conv1", "layer1.0", "layer1.1"]),
    (["relu", "stages", "relu"], ["relu", "layer1.0", "layer1.1"]),
])
def test_selection(tiny_points, selection, expected):
    assert [p.name for p in select_points(tiny_points, selection)] == expected


def test_stages_of_a_plain_chain_keep_the_last_point_of_each_stride():
    points = [SkipPoint(f"p{i}", i, f"p{i}", 1, (1, 1), s, None, None, None)
              for i, s in enumerate([1, 1, 2, 2, 2, 4])]
    assert [p.name for p in select_points(points, "stages")] == ["p1", "p4", "p5"]


def test_unknown_name_suggests_close_matches(tiny_points):
    with pytest.raises(SkipPointNotFoundError) as info:
        select_points(tiny_points, "layer1.2")
    message = str(info.value)
    assert "'layer1.2'" in message and "Did you mean 'layer1.1'" in message
    assert "List them with featlab.skip_points(model)." in message
    with pytest.raises(SkipPointNotFoundError, match="Did you mean 'stages'"):
        select_points(tiny_points, "stage")  # the presets are candidates too
    # a registry backbone is named as the CLI knows it
    model, _ = featlab.get_backbone("resnet18")
    with pytest.raises(SkipPointNotFoundError, match=r"must name skip points of resnet18; .* "
                                                     r"See `featlab points resnet18`\.$"):
        skip_points(model, 64, select="layer9")


@pytest.mark.parametrize("selection",
                         ["layer9.*", "re:layer9.*", ["stages", "nope"], "", [], " , "])
def test_empty_match_is_an_error(tiny_points, selection):
    with pytest.raises(SkipPointNotFoundError, match=r"featlab\.skip_points\(model\)"):
        select_points(tiny_points, selection)


@pytest.mark.parametrize("name", ["conv1.weight", "*.weight", "bn1.running_mean"])
def test_parameter_name_is_an_error_that_says_so(tiny_points, name):
    with pytest.raises(SkipPointNotFoundError, match="parameter"):
        select_points(tiny_points, name)


def test_module_that_is_not_a_point_is_explained():
    with pytest.raises(SkipPointNotFoundError, match="not a skip point") as info:
        skip_points(ft.TinyResNet(), 32, select="layer1.0.conv1")
    assert "featlab.capture" in str(info.value) and "TinyResNet" in str(info.value)


@pytest.mark.parametrize("selection", [3, None, ["layer1", 2]])
def test_selection_type_is_checked(tiny_points, selection):
    with pytest.raises(ConfigError, match="selection"):
        select_points(tiny_points, selection)


def test_bad_regex(tiny_points):
    with pytest.raises(ConfigError, match="regex"):
        select_points(tiny_points, "re:layer(")


def test_skip_points_select_argument():
    assert [p.name for p in skip_points(ft.TinyResNet(), 32, select="stages")] == \
        ["layer1.0", "layer1.1"]


def test_cli_points_json_carries_the_receptive_field_status(capsys, cli_state):
    from featlab import cli

    assert cli.main(["points", "mobilenet_v3_large", "--input-size", "64", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [SkipPoint.from_dict(r).rf_status for r in records] == [r["rf_status"] for r in records]
    assert records[0]["rf_status"] == "exact"
    assert any(r["rf_status"].startswith("exact; global context via SE") for r in records)


def test_module_calls_count_calls_and_find_outputs_changed_in_place(capsys, cli_state):
    import torchvision

    from featlab import cli

    model = torchvision.models.resnet18(weights=None).eval()
    calls = {c.name: c for c in featlab.module_calls(model, 64)}
    assert calls["layer1.0.relu"].calls == 2 and calls["layer1.0.conv1"].calls == 1
    assert calls["layer1.0.bn2"].changed_in_place  # `out += identity` (R-1.1's example)
    assert calls["bn1"].changed_in_place and not calls["conv1"].changed_in_place
    assert calls["layer4"].shape == (1, 512, 2, 2) and "fc" in calls
    # independently: hooks keeping references against hooks keeping copies, on random input
    refs, copies = {}, {}

    def keep(name):
        def hook(module, args, out):  # returns None: the output is left as it is
            refs.setdefault(name, out)
            copies.setdefault(name, out.clone())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    for h in hooks:
        h.remove()
    differ = {n for n in refs if not torch.equal(refs[n], copies[n])}
    assert differ and differ <= {n for n, c in calls.items() if c.changed_in_place}
    assert all(not m.training for m in model.modules())  # modes restored
    with torch.inference_mode():  # a caller's inference mode: version counters still read
        assert [c.changed_in_place for c in featlab.module_calls(model, 64)] == [
            c.changed_in_place for c in calls.values()]
    assert cli.main(["points", "resnet18", "--modules", "--input-size", "64", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == list(calls)
    assert records[list(calls).index("layer1.0.bn2")]["changed_in_place"] is True
