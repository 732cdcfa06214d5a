"""Saliency benchmark: Grad-CAM and LayerCAM at every skip point of resnet18, one pass vs Captum.

featlab's ``grad_cam`` captures all points and gets every gradient from one forward and one
backward pass; the baseline calls Captum's ``LayerGradCam(model, layer).attribute`` once per
point (a forward and a backward each). LayerCAM likewise, against the map built per point from
Captum's layer gradients (``LayerGradientXActivation(multiply_by_inputs=False)``) and layer
activations (``LayerActivation``, a forward under ``no_grad``). Both run on the same batch in
the same process, and the maps are checked to agree before timing:

    python benchmarks/bench_saliency.py [--quick] [--size 128] [--batch-size 8] [--device cpu]

Goal (Grad-CAM): featlab >= (number of points / 2) times faster than the per-point Captum loop.
"""

from __future__ import annotations

import argparse
import time

import torch


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px, batch 4, 1 repeat")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    try:
        from captum.attr import LayerGradCam, LayerGradientXActivation
    except ImportError:
        raise SystemExit("bench_saliency needs captum: pip install -e '.[test]'") from None
    import featlab
    import featlab.testing as ft
    from featlab.analysis.saliency import grad_cam, layer_cam

    if args.quick:
        args.size, args.batch_size, args.repeats = 64, 4, 1
    model, _ = featlab.get_backbone("resnet18", weights="none")
    model = model.to(args.device).eval()
    points = featlab.skip_points(model, input_size=args.size)
    names = [p.name for p in points]
    x = ft.random_images(args.batch_size, args.size).to(args.device)
    modules = dict(model.named_modules())
    target = 7

    def ours():
        return grad_cam(model, x, target, points, relu=False)

    def captum():
        return {n: LayerGradCam(model, modules[n]).attribute(x, target=target)[:, 0].detach()
                for n in names}

    def ours_layer():
        return layer_cam(model, x, target, points, relu=False)

    def captum_layer():
        out = {}
        for n in names:
            grad = LayerGradientXActivation(model, modules[n], multiply_by_inputs=False
                                            ).attribute(x, target=target)
            act = _activation(model, modules[n], x)
            out[n] = (grad.clamp(min=0) * act).sum(1).detach()
        return out

    worst = max(_difference(ours(), captum(), names), _difference(ours_layer(), captum_layer(),
                                                                  names))
    t_ours, t_captum = best_time(ours, args.repeats), best_time(captum, args.repeats)
    t_layer, t_captum_layer = (best_time(ours_layer, args.repeats),
                               best_time(captum_layer, args.repeats))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"resnet18 at {args.size} px, batch {args.batch_size}, {len(names)} skip points; "
          f"max relative difference of the maps {worst:.1e}")
    print(f"{'variant':<52} {'seconds':>8} {'speed-up':>9}")
    print(f"{'Captum LayerGradCam, once per point':<52} {t_captum:8.3f} {1.0:8.1f}x")
    print(f"{'featlab grad_cam, all points in one pass':<52} {t_ours:8.3f} "
          f"{t_captum / t_ours:8.1f}x   (goal >= {len(names) / 2:.0f}x)")
    print(f"{'Captum layer gradients + activations, per point':<52} {t_captum_layer:8.3f} "
          f"{1.0:8.1f}x")
    print(f"{'featlab layer_cam, all points in one pass':<52} {t_layer:8.3f} "
          f"{t_captum_layer / t_layer:8.1f}x")


def _activation(model, module, x):
    """The module's output in a plain forward (what Captum's ``LayerActivation`` returns)."""
    from captum.attr import LayerActivation

    with torch.no_grad():
        return LayerActivation(model, module).attribute(x)


def _difference(a, b, names) -> float:
    return max(float((a[n].native - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12))
               for n in names)


if __name__ == "__main__":
    main()
