"""featlab.capture: copies inside hooks, call counting, selectors, modes, cleanup (R-1.x, R-7.1,
R-11.3, R-14.1). Values are checked against manual re-runs of the same modules."""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import featlab
import featlab.testing as ft
from featlab.capture import Recorder, capture
from featlab.errors import (
    ConfigError,
    FeatlabError,
    ModelModeError,
    ReusedModuleError,
    SkipPointNotFiredError,
    SkipPointNotFoundError,
)
from featlab.points import select_points, skip_points

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs")


def hooks_left(model: nn.Module) -> list[str]:
    return [f"{name or '<root>'}.{attr}" for name, m in model.named_modules()
            for attr in HOOK_DICTS if getattr(m, attr, None)]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None).eval()
    # random init leaves BN at identity statistics; give it real ones so values are non-trivial
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="module")
def x64():
    return ft.random_images(2, 64, seed=1)


def stem(model, x):
    return model.maxpool(model.relu(model.bn1(model.conv1(x))))


def manual_block(block, h):
    """torchvision BasicBlock re-run op by op without in-place ops: (relu0, bn2, output)."""
    r0 = torch.relu(block.bn1(block.conv1(h)))
    b2 = block.bn2(block.conv2(r0))
    identity = h if block.downsample is None else block.downsample(h)
    return r0, b2, torch.relu(b2 + identity)


# -- in-place ops after the module -----------------------------------------------------------
def test_bn2_inside_block_is_the_pre_add_value(resnet18, x64):
    with torch.no_grad():
        with featlab.capture(resnet18, ["layer1.0.bn2"]) as acts:
            resnet18(x64)
        _, b2, out = manual_block(resnet18.layer1[0], stem(resnet18, x64))
    torch.testing.assert_close(acts["layer1.0.bn2"], b2, atol=1e-5, rtol=0)
    assert not torch.allclose(acts["layer1.0.bn2"], out, atol=1e-3)

    # the trap is real: a hook that keeps a reference sees the post-add, post-relu tensor
    refs = {}
    handle = resnet18.layer1[0].bn2.register_forward_hook(lambda m, i, o: refs.update(o=o))
    try:
        with torch.no_grad():
            resnet18(x64)
    finally:
        handle.remove()
    torch.testing.assert_close(refs["o"], out, atol=1e-5, rtol=0)


# -- reused modules --------------------------------------------------------------------------
def test_reuse_is_an_error_listing_every_reused_module(resnet18, x64):
    with pytest.raises(ReusedModuleError) as info:
        with torch.no_grad(), capture(resnet18, ["layer1.0", "layer1.0.relu", "layer2.1.relu"]):
            resnet18(x64)
    msg = str(info.value)
    assert "'layer1.0.relu' (2 calls)" in msg and "'layer2.1.relu' (2 calls)" in msg
    assert "'layer1.0'" not in msg.replace("'layer1.0.relu'", "")
    assert "on_reuse='all'" in msg
    assert hooks_left(resnet18) == []


def test_on_reuse_all_stores_every_call(resnet18, x64):
    with torch.no_grad():
        with capture(resnet18, ["layer1.0.relu", "layer1.0"], on_reuse="all") as acts:
            resnet18(x64)
        r0, _, out = manual_block(resnet18.layer1[0], stem(resnet18, x64))
    assert list(acts) == ["layer1.0.relu#0", "layer1.0.relu#1", "layer1.0"]
    assert acts.calls == {"layer1.0.relu": 2, "layer1.0": 1}
    torch.testing.assert_close(acts["layer1.0.relu#0"], r0, atol=1e-5, rtol=0)
    torch.testing.assert_close(acts["layer1.0.relu#1"], out, atol=1e-5, rtol=0)
    torch.testing.assert_close(acts["layer1.0"], out, atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="layer1.0.relu#0"):
        acts["layer1.0.relu"]


# -- tuple and dict outputs ------------------------------------------------------------------
class DictBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = ft.TwoHeads()

    def forward(self, x):
        a, b = self.heads(x)
        return OrderedDict(out=a, aux=b)


class WithDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DictBlock()

    def forward(self, x):
        d = self.block(x)
        return d["out"].sum(1, keepdim=True) * d["aux"].mean(1, keepdim=True)


def test_tuple_output_needs_a_selector():
    net, x = ft.WithTupleBlock(), ft.random_images(2, 8)
    with pytest.raises(FeatlabError) as info:
        with capture(net, "heads"):
            net(x)
    assert isinstance(info.value, ValueError)
    assert "tuple of 2" in str(info.value) and "heads[0]" in str(info.value)
    assert hooks_left(net) == []


def test_selectors_pick_tuple_and_dict_elements():
    net, x = ft.WithTupleBlock(), ft.random_images(2, 8)
    with torch.no_grad(), capture(net, ["heads[0]", "heads[-1]"]) as acts:
        net(x)
    torch.testing.assert_close(acts["heads[0]"], net.heads.a(x))
    torch.testing.assert_close(acts["heads[-1]"], net.heads.b(x))

    dnet = WithDict()
    with torch.no_grad(), capture(dnet, ["block['aux']", 'block["out"]']) as acts:
        dnet(x)
    torch.testing.assert_close(acts["block['aux']"], dnet.block.heads.b(x))
    torch.testing.assert_close(acts['block["out"]'], dnet.block.heads.a(x))
    with pytest.raises(ConfigError, match="keys \\['out', 'aux'\\]"):
        with capture(dnet, "block['logits']"):
            dnet(x)
    with pytest.raises(ConfigError, match="tuple of 2"):
        with capture(net, "heads[2]"):
            net(x)


# -- names -----------------------------------------------------------------------------------------
def test_unknown_names_fail_before_the_block(resnet18):
    with pytest.raises(SkipPointNotFoundError, match="Did you mean 'layer1'") as info:
        capture(resnet18, ["layer4", "layr1"])
    assert isinstance(info.value, ValueError)
    with pytest.raises(SkipPointNotFoundError, match="parameter of module 'conv1'"):
        capture(resnet18, "conv1.weight")
    with pytest.raises(SkipPointNotFoundError, match="buffer of module 'layer1.0.bn1'"):
        capture(resnet18, "layer1.0.bn1.running_mean")
    with pytest.raises(SkipPointNotFoundError, match="'layer9'"):
        capture(resnet18, "layer9[0]")
    assert hooks_left(resnet18) == []


def test_skip_point_like_records_and_duplicates():
    class Point:  # duck-typed like featlab.points.SkipPoint
        def __init__(self, name, module):
            self.name, self.module = name, module

    net, x = ft.TinyCNN(), ft.random_images(1, 16)
    rec = capture(net, [Point("p", "features.2"), "features.5", "features.2", Point("p", "fc")])
    assert rec.names == ("p", "features.5", "features.2")  # first occurrence of a key wins
    with torch.no_grad(), rec:
        net(x)
    torch.testing.assert_close(rec["p"], rec["features.2"])
    with pytest.raises(SkipPointNotFoundError, match="discover the points on this model"):
        capture(net, Point("layer3", "layer3"))


def test_default_and_selection_strings_resolve_against_skip_points():
    net, x = ft.TinyResNet(), ft.random_images(2, 32)
    points = skip_points(net)
    with torch.no_grad(), featlab.capture(net) as acts:  # points=None: all skip points
        net(x)
    assert list(acts) == [p.name for p in points]
    for selection in ("stages", "layer1.*", "re:layer1\\.1$"):
        rec = featlab.capture(net, selection)
        assert list(rec.names) == [p.name for p in select_points(points, selection)], selection
    # a comma-separated string is a list: each part a module name or a selection, request order
    assert featlab.capture(net, "layer1.1, bn1,layer1.*").names == ("layer1.1", "bn1", "layer1.0")
    rec = featlab.capture(net, ["layer1.0.bn2", "stages", points[0]])
    assert rec.names[0] == "layer1.0.bn2" and points[0].name in rec.names
    assert hooks_left(net) == []


# -- options ---------------------------------------------------------------------------------------
def test_detach_default_stores_no_graph():
    net, x = ft.TinyResNet(), ft.random_images(2, 16).requires_grad_()
    with capture(net, ["layer1.0.bn2", "layer1.1"]) as acts:
        net(x)
    assert not any(t.requires_grad for t in acts.values())
    assert all(t.grad_fn is None for t in acts.values())


def test_keep_graph_gradients_are_those_of_the_module_output():
    net, x = ft.TinyResNet(), ft.random_images(2, 16).requires_grad_()
    weights = torch.randn(2, 10, generator=torch.Generator().manual_seed(3))
    with capture(net, ["layer1.0.bn2", "layer1.1"], detach=False) as acts:
        score = (net(x) * weights).sum()
    g_bn2, g_block, g_x = torch.autograd.grad(score, [acts["layer1.0.bn2"], acts["layer1.1"], x])

    # independent computation: re-run the network by hand from leaf tensors at the two points
    h = torch.relu(net.bn1(net.conv1(x)))
    blk0, blk1 = net.layer1
    bn2 = blk0.bn2(blk0.conv2(torch.relu(blk0.bn1(blk0.conv1(h))))).detach().requires_grad_()
    out1 = blk1(torch.relu(bn2 + h))
    ref_bn2, = torch.autograd.grad((net.fc(out1.mean((2, 3))) * weights).sum(), [bn2])
    leaf = out1.detach().requires_grad_()
    ref_block, = torch.autograd.grad((net.fc(leaf.mean((2, 3))) * weights).sum(), [leaf])
    x2 = x.detach().requires_grad_()
    ref_x, = torch.autograd.grad((net(x2) * weights).sum(), [x2])

    torch.testing.assert_close(acts["layer1.0.bn2"], bn2, atol=1e-5, rtol=0)  # still pre-add
    torch.testing.assert_close(g_bn2, ref_bn2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_block, ref_block, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_x, ref_x, atol=1e-5, rtol=1e-4)  # capture leaves input grads alone


def test_keep_graph_through_a_tuple_selector():
    net, x = ft.WithTupleBlock(), ft.random_images(2, 8).requires_grad_()
    with capture(net, "heads[1]", detach=False) as acts:
        y = net(x)
    torch.testing.assert_close(y, (net.heads.a(x).sum(1, True) + net.heads.b(x).sum(1, True)))
    grad, = torch.autograd.grad(y.sum(), acts["heads[1]"])
    torch.testing.assert_close(grad, torch.ones_like(grad))  # d(sum over channels)/d b = 1


def test_device_and_dtype():
    net, x = ft.TinyResNet(), ft.random_images(2, 16)
    with torch.no_grad():
        with capture(net, ["layer1.0.bn2", "layer1.1"]) as full:
            net(x)
        for dtype in (torch.float16, "float16", "torch.float16"):
            with capture(net, ["layer1.0.bn2", "layer1.1"], device="cpu", dtype=dtype) as half:
                net(x)
            for name in full:
                assert half[name].dtype == torch.float16 and half[name].device.type == "cpu"
                torch.testing.assert_close(half[name], full[name].half())
    for bad in ({"dtype": "int8"}, {"dtype": "float17"}, {"device": "nonsense"},
                {"on_reuse": "last"}, {"detach": "no"}, {"detach": False, "dtype": "float16"}):
        with pytest.raises(ConfigError):
            capture(net, "layer1", **bad)


def test_eval_mode_inside_and_exact_restore():
    net, x = ft.TinyResNet(), ft.random_images(2, 16)
    net.train()
    net.layer1[0].bn1.eval()
    before = {n: m.training for n, m in net.named_modules()}
    stats = net.bn1.running_mean.clone()
    with torch.no_grad(), capture(net, "layer1") as acts:
        assert not any(m.training for m in net.modules())
        net(x)
    assert {n: m.training for n, m in net.named_modules()} == before
    torch.testing.assert_close(net.bn1.running_mean, stats)  # eval: statistics untouched
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(acts["layer1"], net.layer1(torch.relu(net.bn1(net.conv1(x)))))

    net.train()
    with capture(net, "layer1", eval=False):
        assert net.training and net.layer1[0].bn1.training
    assert net.training


def test_training_mode_switched_on_inside_the_block_is_an_error():
    net, x = ft.TinyResNet(), ft.random_images(2, 16)
    with pytest.raises(ModelModeError, match="training mode"):
        with torch.no_grad(), capture(net, "layer1") as acts:
            net(x)
            assert len(acts) == 1
            net.layer1.train()  # what a training-loop callback might do
            net(x)
    assert not any(m.training for m in net.modules())  # restored to the state before the block
    assert hooks_left(net) == []


def test_module_that_never_runs():
    net, x = ft.TinyCNN(), ft.random_images(1, 16)
    net.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(SkipPointNotFiredError, match="'unused'"):
        with torch.no_grad(), capture(net, ["features.2", "unused"]):
            net(x)


def test_each_forward_replaces_the_values():
    net = ft.TinyCNN()
    x1, x2 = ft.random_images(2, 16, seed=1), ft.random_images(3, 16, seed=2)
    with torch.no_grad(), capture(net, "features") as acts:
        net(x1)
        first = acts["features"]
        net(x2)
        assert acts.calls == {"features": 1}  # counts restart per forward
        second = acts["features"]
        assert first.shape[0] == 2 and second.shape[0] == 3
        with pytest.raises(RuntimeError):
            net(torch.rand(1, 5, 16, 16))
        assert len(acts) == 0  # a failed forward leaves nothing stale behind
        net(x1)
    torch.testing.assert_close(acts["features"], first)  # readable after the block
    with torch.no_grad():
        torch.testing.assert_close(second, net.features(x2))


def test_calling_a_submodule_directly_is_refused():
    net, x = ft.TinyCNN(), ft.random_images(1, 16)
    with pytest.raises(ConfigError, match="capture the submodule you call"):
        with torch.no_grad(), capture(net, "features.2"):
            net.features(x)
    with torch.no_grad(), capture(net.features, "2") as acts:  # the documented alternative
        net.features(x)
    assert acts["2"].shape == (1, 8, 8, 8)


def test_activation_checkpointing_recompute_in_backward_is_not_a_forward():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ft.TinyCNN()

        def forward(self, x):
            return checkpoint(self.net.features, x, use_reentrant=False).mean()

    model, x = Checkpointed(), ft.random_images(1, 16).requires_grad_()
    expected, = torch.autograd.grad(model(x), x)
    with capture(model, "net.features.2") as acts:
        grad, = torch.autograd.grad(model(x), x)  # backward re-runs features.2's forward
    assert acts.calls == {"net.features.2": 1}
    torch.testing.assert_close(grad, expected)


def test_recorder_is_a_read_only_mapping_and_not_reentrant():
    net, x = ft.TinyCNN(), ft.random_images(1, 16)
    rec = capture(net, "features.2")
    with pytest.raises(KeyError, match="no forward"):
        rec["features.2"]
    with torch.no_grad(), rec:
        net(x)
        with pytest.raises(ConfigError, match="once at a time"):
            with rec:
                pass
    with pytest.raises(TypeError):
        rec["features.2"] = torch.zeros(1)  # type: ignore[index]
    assert isinstance(rec, Recorder) and "features.2" in rec and len(rec) == 1
    with torch.no_grad(), rec:  # a recorder can be used again after its block
        net(x)
    assert hooks_left(net) == []


def test_featlab_capture_stays_callable_after_importing_the_module():
    import featlab.capture as module

    net = ft.TinyCNN()
    assert isinstance(featlab.capture(net, "fc"), Recorder)
    assert isinstance(module(net, "fc"), Recorder)


# -- wrapped models -------------------------------------------------------------------------
def test_data_parallel_is_unwrapped_and_multi_device_refused():
    net, x = ft.TinyCNN(), ft.random_images(1, 16)
    if torch.cuda.is_available():  # DataParallel on one GPU: model and input live there
        net, x = net.cuda(), x.cuda()
        dp = nn.DataParallel(net, device_ids=[0])
    else:
        dp = nn.DataParallel(net, device_ids=[])
    with torch.no_grad(), capture(dp, ["features.2", "module.features.5"]) as acts:
        dp(x)
    torch.testing.assert_close(acts["features.2"], net.features[:3](x))
    assert acts["module.features.5"].shape == (1, 16, 4, 4)
    dp.device_ids = [0, 1]  # what DataParallel over two GPUs looks like to capture
    with pytest.raises(ConfigError, match="model.module on one device"):
        capture(dp, "features.2")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_compiled_model_is_refused_with_guidance():
    net = ft.TinyCNN()
    with pytest.raises(ConfigError, match=r"model\._orig_mod"):
        capture(torch.compile(net), "features.2")
    net.features = torch.compile(net.features)
    with pytest.raises(ConfigError, match="capture 'features' itself"):
        capture(net, ["fc", "features._orig_mod.2"])
    assert capture(net, "features").names == ("features",)  # the compiled module's own output
    net.features = net.features._orig_mod
    with pytest.raises(ConfigError, match="TorchScript"):
        capture(torch.jit.script(net), "features.2")


# -- hook leaks (style pattern 8, R-11.3) ----------------------------------------------------------
class Boom(Exception):
    pass


def _normal(net):
    net(ft.random_images(2, 16))


def _bad_input(net):
    net(torch.rand(2, 5, 16, 16))  # wrong channel count


def _module_raises(net):
    def boom(*args):
        raise Boom
    net.layer1[1].forward = boom
    try:
        net(ft.random_images(2, 16))
    finally:
        del net.layer1[1].forward


def _interrupt(net):
    def interrupt(*args):
        raise KeyboardInterrupt
    net.layer1[1].forward = interrupt
    try:
        net(ft.random_images(2, 16))
    finally:
        del net.layer1[1].forward


@pytest.mark.parametrize("run, error", [(_normal, None), (_bad_input, RuntimeError),
                                        (_module_raises, Boom), (_interrupt, KeyboardInterrupt)])
@pytest.mark.parametrize("kwargs", [{}, {"detach": False, "on_reuse": "all"}])
def test_no_hooks_left(run, error, kwargs):
    net = ft.TinyResNet().train()
    if error is None:
        with capture(net, ["layer1.0.bn2", "layer1.0", "layer1.1.relu", "fc"],
                     **{"on_reuse": "all", **kwargs}) as acts:
            run(net)
        assert acts.calls["layer1.1.relu"] == 2
    else:
        with pytest.raises(error):
            with capture(net, ["layer1.0.bn2", "layer1.1.relu", "fc"], **kwargs):
                assert hooks_left(net)  # the test can fail: hooks exist inside
                run(net)
    assert hooks_left(net) == []
    assert all(m.training for m in net.modules())


def test_a_hundred_captures_leave_no_hooks_and_no_recorders():
    net, x = ft.TinyResNet(), ft.random_images(1, 16)
    refs = []
    gc.collect()
    for _ in range(100):
        with torch.no_grad(), capture(net, ["layer1.0.bn2", "layer1.1"]) as acts:
            net(x)
        refs.append(weakref.ref(acts))
        del acts
    assert hooks_left(net) == []
    assert sum(r() is not None for r in refs) == 0  # freed by reference counting: no cycles


def test_a_pattern_matching_no_skip_point_selects_modules_by_name():
    # R-6.1's own example: `layer*.?.bn2` names no skip point, but capture hooks any module
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with featlab.capture(model, "layer*.?.bn2") as acts:
        model(x)
    assert list(acts) == [f"layer{s}.{b}.bn2" for s in (1, 2, 3, 4) for b in (0, 1)]
    with featlab.capture(model, ["layer2.1.bn2"]) as exact:
        model(x)
    assert torch.equal(acts["layer2.1.bn2"], exact["layer2.1.bn2"])
    with featlab.capture(model, r"re:layer1\.\d\.conv\d") as acts:
        model(x)
    assert list(acts) == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    with featlab.capture(model, "layer3.*") as acts:  # skip points match first, as before
        model(x)
    assert list(acts) == ["layer3.0", "layer3.1"]
    with pytest.raises(featlab.errors.SkipPointNotFoundError, match="matches none"):
        featlab.capture(model, "layerz*")
