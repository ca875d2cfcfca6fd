"""Side-by-side benchmark of the CAM engine against an inference forward and the peer libraries.

For each model every variant runs on the same model, batch and targets; timings are interleaved
(each round runs every variant once, in a rotated order) and summarised as median/min/max.
Peak memory is measured per variant in a fresh subprocess: on CPU the growth of peak resident
memory (VmHWM, reset through /proc/self/clear_refs) over the resident memory after set-up; on a
GPU ``torch.cuda.max_memory_allocated`` over the allocation after set-up. A last table times the
same variants on one 64-px image (ResNet-50), where the forward's compute is small: the per-call
host work each adds around it.

    python benchmarks/bench_engine.py                       # ResNet-50, ResNet-18, ViT-S/16
    python benchmarks/bench_engine.py --models resnet18 --repeats 3 --no-memory

Prints a Markdown table and writes JSON (default ``benchmarks/results/engine_<device>.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cam_monitor as cm

ALL_METHODS = tuple(cm.METHODS)


@dataclass
class Case:
    """One model under test: the module, its target layer and the batch."""

    name: str
    model: nn.Module
    layer: nn.Module
    layer_name: str
    images: torch.Tensor
    targets: torch.Tensor
    tokens: bool


def build_case(name: str, batch: int, size: int, device: torch.device) -> Case:
    """Random-weight model, fixed random batch and targets (seeded, so every process agrees)."""
    torch.manual_seed(0)
    if name == "resnet50":
        model, layer_name = torchvision.models.resnet50(weights=None), "layer4"
    elif name == "resnet18":
        model, layer_name = torchvision.models.resnet18(weights=None), "layer4"
    elif name == "vit_s16":
        model = torchvision.models.VisionTransformer(image_size=size, patch_size=16, num_layers=12, num_heads=6,
                                                     hidden_dim=384, mlp_dim=1536)
        layer_name = "encoder.layers.encoder_layer_11.ln_1"
    else:
        raise SystemExit(f"unknown model {name!r}; choose resnet50, resnet18 or vit_s16")
    model = model.eval().to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    targets = torch.randint(0, 1000, (batch,), generator=g).to(device)
    layer = dict(model.named_modules())[layer_name]
    return Case(name, model, layer, layer_name, images, targets, name.startswith("vit"))


def vit_reshape(t: torch.Tensor) -> torch.Tensor:
    """Token (B, 1 + h*w, C) -> (B, C, h, w), for pytorch-grad-cam's reshape_transform."""
    side = int((t.shape[1] - 1) ** 0.5)
    return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)


def variants(case: Case) -> dict[str, Callable[[], torch.Tensor | None]]:
    """name -> zero-argument callable producing that variant's maps (None for the forward)."""
    m, x, t, layer = case.model, case.images, case.targets, case.layer
    t5 = torch.stack([(t + i) % 1000 for i in range(5)], dim=1)

    def forward():
        with torch.inference_mode():
            m(x)

    out: dict[str, Callable] = {
        "inference forward": forward,
        "cam_monitor gradcam": lambda: cm.compute_cams(m, x, layer, t),
        "cam_monitor 5 methods": lambda: cm.compute_cams(m, x, layer, t, ALL_METHODS)["gradcam"],
        "cam_monitor 5 targets": lambda: cm.compute_cams(m, x, layer, t5)[:, 0],
    }
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def pgc():
            with GradCAM(model=m, target_layers=[layer], reshape_transform=vit_reshape if case.tokens else None) as cam:
                return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t]))
        out["pytorch-grad-cam"] = pgc
    except ImportError:
        pass
    if not case.tokens:
        try:
            from captum.attr import LayerGradCam

            def captum():
                return LayerGradCam(m, layer).attribute(x, target=t, relu_attributions=True)[:, 0].detach()
            out["captum LayerGradCam"] = captum
        except ImportError:
            pass
        try:
            from torchcam.methods import GradCAM as TorchcamGradCAM

            def torchcam():
                with TorchcamGradCAM(m, target_layer=layer, input_shape=tuple(x.shape[1:])) as ext, torch.enable_grad():
                    return ext(class_idx=t.tolist(), scores=m(x))[0].detach()
            out["torchcam GradCAM"] = torchcam
        except ImportError:
            pass
    return out


def minmax_display(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps as the peers display them: min-max scaled, then bilinear to the image size."""
    maps = maps.float().cpu()
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    maps = maps / (maps.amax(dim=(-2, -1), keepdim=True) + 1e-7)
    if maps.shape[-2:] != size:
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps


def agreement(case: Case, fns: dict[str, Callable]) -> dict[str, float]:
    """Max abs difference of each peer's display map from ours (0 = same maps)."""
    size = tuple(case.images.shape[-2:])
    ours = minmax_display(fns["cam_monitor gradcam"](), size)
    return {name: float((minmax_display(fn(), size) - ours).abs().max())
            for name, fn in fns.items() if not name.startswith(("cam_monitor", "inference"))}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Run every variant once per round, rotating the order; return seconds per variant."""
    names = list(fns)
    for name in names:  # warm-up: allocator, oneDNN primitives, lazy imports
        fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def measure_memory_here(model: str, variant: str, batch: int, size: int, device: torch.device) -> float:
    """In this process: bytes of peak memory growth for one call of ``variant``."""
    case = build_case(model, batch, size, device)
    fn = variants(case)[variant]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    return peak_rss_growth(fn)


def peak_rss_growth(fn: Callable[[], object]) -> float:
    """Bytes the process's peak resident memory grows by during ``fn()`` (Linux: VmHWM, reset to
    the current RSS first). Run it in a fresh process: memory the allocator kept from earlier work
    would otherwise be reused and hide the growth."""
    import gc
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    fn()
    return float(_status_kb("VmHWM") - base) * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(model: str, variant: str, args: argparse.Namespace) -> float | None:
    """Run :func:`measure_memory_here` in a fresh subprocess; None if it failed."""
    cmd = [sys.executable, __file__, "--_memory-of", model, variant, "--batch", str(args.batch),
           "--size", str(args.size), "--device", args.device, "--threads", str(args.threads)]
    return number_from_subprocess(cmd, f"memory of {variant}")


def number_from_subprocess(cmd: list[str], what: str) -> float | None:
    """Run ``cmd`` and read the number its last line of output prints; None, said on stderr with
    ``what`` and the command's last error line, where it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {what} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; what ``platform`` knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the hardware the numbers came from."""
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def run_model(model: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time (and optionally measure memory of) every variant for one model."""
    case = build_case(model, args.batch, args.size, device)
    fns = variants(case)
    agree = agreement(case, fns)
    times = time_interleaved(fns, args.repeats, device)
    base = statistics.median(times["inference forward"])
    rows = {}
    for name, ts in times.items():
        rows[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                      "x_forward": statistics.median(ts) / base, "max_abs_diff_vs_ours": agree.get(name)}
    if args.memory:
        mems = {name: measure_memory(model, name, args) for name in fns}
        for name, mem in mems.items():
            rows[name]["peak_mem_mb"] = None if mem is None else mem / 2**20
            fwd = mems["inference forward"]
            rows[name]["mem_x_forward"] = None if mem is None or not fwd else mem / fwd
    return {"model": model, "layer": case.layer_name, "batch": list(case.images.shape), "variants": rows}


def run_render(args: argparse.Namespace, device: torch.device, n: int = 64) -> dict:
    """Rendering a 64-tile probe grid vs the CAM pass over the same 64 probes (ResNet-18 layer4)."""
    from cam_monitor import metrics
    from cam_monitor.render import probe_grid

    case = build_case("resnet18", n, args.size, device)
    spur = metrics.border_mask(args.size, args.size).expand(n, -1, -1)
    state: dict[str, torch.Tensor] = {}

    def cam():
        state["maps"] = cm.compute_cams(case.model, case.images, case.layer, case.targets)

    def render():
        maps = state["maps"]
        probe_grid(case.images.sigmoid(), maps, ids=[f"probe_{i:03d}" for i in range(n)], labels=case.targets.tolist(),
                   preds=case.targets.tolist(), scores=[0.5] * n,
                   spurious_energy=metrics.energy_fraction(maps, spur).tolist(), spurious_masks=spur)

    cam()
    times = time_interleaved({"cam_monitor gradcam (64 probes)": cam, "render 64-tile probe grid": render},
                             args.repeats, device)
    base = statistics.median(times["cam_monitor gradcam (64 probes)"])
    return {"model": "resnet18 (render)", "layer": "layer4", "batch": list(case.images.shape),
            "variants": {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                             "x_forward": statistics.median(v) / base, "max_abs_diff_vs_ours": None}
                         for k, v in times.items()}}


def run_host(args: argparse.Namespace, device: torch.device, calls: int = 10) -> dict:
    """Per-call host work: ResNet-50 ``layer4`` on one 64-px image, where the compute is small and
    what a variant adds around the forward (Python, hooks, state, host-device synchronisation)
    shows. On a GPU this is what separates a pass from its forward when the kernels are fast."""
    case = build_case("resnet50", 1, 64, device)
    fns = {name: (lambda fn=fn: [fn() for _ in range(calls)]) for name, fn in variants(case).items()
           if name != "cam_monitor 5 methods"}
    times = time_interleaved(fns, args.repeats * 3, device)
    base = statistics.median(times["inference forward"])
    return {"model": "resnet50 (host work per call)", "layer": "layer4", "batch": list(case.images.shape),
            "variants": {k: {"median_s": statistics.median(v) / calls, "min_s": min(v) / calls,
                             "max_s": max(v) / calls, "x_forward": statistics.median(v) / base,
                             "max_abs_diff_vs_ours": None} for k, v in times.items()}}


def print_table(result: dict, digits: int = 3) -> None:
    print(f"\n### {result['model']} `{result['layer']}`, batch {' x '.join(map(str, result['batch']))}\n")
    print("| variant | median s | min s | max s | x forward | peak mem MB | mem x forward | max diff vs ours |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in result["variants"].items():
        mem = "" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"
        memx = "" if r.get("mem_x_forward") is None else f"{r['mem_x_forward']:.2f}"
        diff = "" if r["max_abs_diff_vs_ours"] is None else f"{r['max_abs_diff_vs_ours']:.1e}"
        print(f"| {name} | {r['median_s']:.{digits}f} | {r['min_s']:.{digits}f} | {r['max_s']:.{digits}f} | {r['x_forward']:.2f} "
              f"| {mem} | {memx} | {diff} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,resnet18,vit_s16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-render", dest="render", action="store_false", help="skip the rendering-cost table")
    p.add_argument("--no-host", dest="host", action="store_false", help="skip the per-call host-work table")
    p.add_argument("--out", default=None)
    p.add_argument("--_memory-of", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args._memory_of:
        print(measure_memory_here(*args._memory_of, args.batch, args.size, device))
        return
    results = {"machine": machine(), "device": str(device), "repeats": args.repeats, "models": []}
    print(f"machine: {results['machine']}; device {device}; {args.repeats} interleaved repeats")
    for model in args.models.split(","):
        result = run_model(model, args, device)
        results["models"].append(result)
        print_table(result)
    if args.render:
        result = run_render(args, device)
        results["render"] = result
        print_table(result)
        print("(x forward here = x the CAM pass over the same 64 probes)")
    if args.host:
        result = run_host(args, device)
        results["host"] = result
        print_table(result, digits=4)
        print("(seconds per call; one 64-px image, so the forward's compute is small and the rest is host work)")
    write_json(results, args.out or default_result_path("engine", device))


def default_result_path(name: str, device: torch.device) -> str:
    """``benchmarks/results/<name>_<device type>.json``."""
    return os.path.join(os.path.dirname(__file__), "results", f"{name}_{device.type}.json")


def write_json(result: dict, path: str, say: bool = True) -> None:
    """Write ``result`` atomically (temporary file, then rename) and, unless ``say`` is False, say where."""
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    if say:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
