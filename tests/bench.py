"""Throughput of every method, measured (a script, not collected by pytest). Prints tables, writes JSON.

    python tests/bench.py --part data                     # the train pipelines per worker, on CPU
    python tests/bench.py --part model --device cuda      # the training steps, ResNet50v2 at 224 px
    python tests/bench.py --part all --device cuda --json bench.json

Data: images/s of ONE worker (one process, one thread) for each method's train transform on real JPEG
files of ILSVRC's typical size, beside the plain torchvision reference pipeline (ImageFolder + PIL +
RandomResizedCrop + flip + ToTensor + Normalize), and the two decoders torchvision offers on the CPU.

Model: each method's training step on in-memory batches, the scripts' own functions (rotation.rotate4,
vat.r_adv, exemplar.L_triplet, moam.Polyak, ...) in the scripts' order, with bf16 autocast and
channels_last (and with them off, and with torch.compile); each step's time beside the time a baseline
step takes for the same number of images in forwards of the same size: any work beyond the method's
own shows up as a ratio above 1. Anchors in the same run: timm's resnetv2_50 and torchvision's resnet50.
"""
import argparse
import functools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


# ---------------------------------------------------------------- data ----
def make_jpegs(root, n=240, seed=0):
    """n photograph-like JPEGs of 500 x 375 (ILSVRC's most common size), quality 90, ~100 KB each as
    ILSVRC's, in an ImageFolder tree of 4 classes: smooth colour fields at several scales, edges, grain."""
    root = Path(root)
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.zeros((375, 500, 3))
        for s in (4, 16, 64):
            low = torch.from_numpy(rng.normal(0, 1, (3, 375 // s + 2, 500 // s + 2))).float()[None]
            img += F.interpolate(low, size=(375, 500), mode="bicubic")[0].permute(1, 2, 0).numpy() * 40
        y, x = np.mgrid[0:375, 0:500]
        for _ in range(6):
            cx, cy, r = rng.uniform(0, 500), rng.uniform(0, 375), rng.uniform(20, 120)
            img[(x - cx) ** 2 + (y - cy) ** 2 < r ** 2] += rng.normal(0, 60, 3)
        img = np.clip(img + 120 + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        os.makedirs(root / f"c{i % 4}", exist_ok=True)
        chw = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        torchvision.io.write_jpeg(chw, str(root / f"c{i % 4}" / f"{i:05d}.jpg"), quality=90)
    (root / "done").touch()
    return root


def per_second(fn, items, repeat=3):
    """Best of `repeat` passes: items per second of fn over items, in this one process."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, time.perf_counter() - t)
    return len(items) / best


def bench_data(root, size):
    import torchvision
    import torchvision.transforms as T
    from torchvision.datasets.folder import pil_loader
    torch.set_num_threads(1)  # as in a DataLoader worker
    _, files, labels = common.scan(str(root), "bench")
    idx = list(range(len(files)))
    reference = torchvision.datasets.ImageFolder(str(root), transform=T.Compose([
        T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]))
    ours = lambda view: common.Images(files, labels, view)
    views = {
        "baseline / rotation / vat / moam: decode + Inception crop + flip": functools.partial(common.train_view, size=size),
        "exemplar: decode + 8 x (Inception crop + flip)": functools.partial(common.train_view, size=size, n=8),
        "evaluation: decode + resize + centre crop": functools.partial(common.eval_view, size=size),
    }
    rows = {"torchvision reference (ImageFolder, PIL, RandomResizedCrop, flip, ToTensor, Normalize)":
            per_second(lambda i: reference[i], idx)}
    ref8 = lambda i: [reference.transform(img) for img in [pil_loader(files[i])] for _ in range(8)]
    rows["torchvision reference, 8 instances of one decoded image"] = per_second(ref8, idx)
    for name, view in views.items():
        ds = ours(view)
        rows[name] = per_second(lambda i: ds[(i, f"s{i}")], idx)
    decode = {"decode: torchvision.io.decode_image (libjpeg-turbo)": lambda f: common.read_image(f),
              "decode: PIL (Image.open + convert RGB)": lambda f: pil_loader(f)}
    for name, fn in decode.items():
        rows[name] = per_second(fn, files)
    if torch.cuda.is_available():  # nvJPEG, batched: the whole set in one call
        data = [torchvision.io.read_file(f) for f in files]
        decode_gpu = lambda _: (torchvision.io.decode_jpeg(data, device="cuda"), torch.cuda.synchronize())
        decode_gpu(0)
        rows["decode: torchvision.io.decode_jpeg(batch, device='cuda'), per GPU"] = per_second(decode_gpu, [0]) * len(files)
    ref = next(iter(rows.values()))
    mb = sum(os.path.getsize(f) for f in files) / len(files) / 1e3
    print(f"\nData pipelines, images/s of one worker (1 process, 1 thread), {len(files)} JPEGs of 500x375, {mb:.0f} KB "
          f"on average, output {size} px, {os.cpu_count()} CPUs ({platform_name()})")
    print(f"{'pipeline':<98} {'img/s':>7} {'x ref':>6}")
    for name, v in rows.items():
        print(f"{name:<98} {v:7.0f} {v / ref:6.2f}")
    one, eight = rows[list(views)[0]], rows[list(views)[1]]
    ref8 = rows["torchvision reference, 8 instances of one decoded image"]
    print(f"exemplar's 8 instances cost {one / eight:.2f}x one view (goal: at most 3x); {eight / ref8:.2f}x the "
          "reference's 8 instances")
    return {"images_per_s": rows, "exemplar_cost_vs_one_view": one / eight, "kb_per_image": mb}


def platform_name():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


# ---------------------------------------------------------------- model ----
def timed(step, n, device):
    """Median seconds of one step over n steps, after 3 warm-up steps."""
    times = []
    for i in range(n + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def method_steps(device, size, B, width=1.0, depth=50, amp=True, channels_last=True, compile=False):
    """Each method's training step as its script does it: (forward images per step, batch of the largest
    forward, a function that runs one step)."""
    import exemplar
    import moam
    import rotation
    import vat
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ac = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def model(*heads, w=width):
        torch.manual_seed(0)
        m = common.ResNetV2(depth, w, 1000)
        for name, k in heads:
            setattr(m, name, torch.nn.Linear(m.num_features, k))
        m = m.to(device, memory_format=fmt)
        return m, (torch.compile(m) if compile else m), torch.optim.SGD(common.param_groups(m, 1e-4), lr=0.01, momentum=0.9)

    def images(n):
        return (torch.rand(n, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt), torch.randint(0, 1000, (n,), device=device)

    def update(loss, opt):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def baseline_step(b, w=width):
        m, f, opt = model(w=w)
        x, y = images(b)

        def step():
            with ac():
                loss = F.cross_entropy(f(x), y)
            update(loss, opt)
        return b, b, step

    def rotation_step():
        m, f, opt = model(("rot", 4))
        (x_l, y), (x_u, _) = images(B), images(B)

        def step():
            with ac():
                logits, rot = f(torch.cat([rotation.rotate4(x_l), rotation.rotate4(x_u)]), heads=("fc", "rot"))
                r = torch.cat([rotation.rot_labels(B, device)] * 2)
                loss = F.cross_entropy(logits[:4 * B], y.repeat(4)) + F.cross_entropy(rot, r)
            update(loss, opt)
        return 8 * B, 8 * B, step

    def exemplar_step():
        m, f, opt = model(("emb", 1000))
        (x_l, y), (x_u, _) = images(8 * B), images(8 * B)

        def step():
            with ac():
                logits, emb = f(torch.cat([x_l, x_u]), heads=("fc", "emb"))
                image = torch.arange(B, device=emb.device)
                L_u = (exemplar.L_triplet(emb[:8 * B], image) + exemplar.L_triplet(emb[8 * B:], image)) / 2
                loss = F.cross_entropy(logits[:8 * B], y[:B].repeat_interleave(8)) + L_u
            update(loss, opt)
        return 16 * B, 16 * B, step

    def vat_step():
        m, f, opt = model()
        (x_l, y), (x_u, _) = images(B), images(B)
        g = torch.Generator(device).manual_seed(0)

        def step():
            with ac():
                x = torch.cat([x_l, x_u])
                logits = f(x)
                p = logits.detach()
                with vat.bn_stats_frozen(m):
                    r = vat.r_adv(f, x, p, 40.0 * size / 224, 5.0 * size / 224, 1, g)
                    L_vat = vat.kl(p, f(x + r)).mean()
                loss = F.cross_entropy(logits[:B], y) + 0.5 * L_vat + vat.entropy(logits).mean()
            update(loss, opt)
        return 6 * B, 2 * B, step

    def moam_step(Bm):
        m, f, opt = model(("rot", 4), w=4 * width)
        (x_l, y), (x_u, _) = images(Bm), images(Bm)
        g, polyak = torch.Generator(device).manual_seed(0), moam.Polyak(m, 1000)

        def step():
            with ac():
                x = torch.cat([rotation.rotate4(x_l), rotation.rotate4(x_u)])
                logits, rot = f(x, heads=("fc", "rot"))
                p = logits.detach()
                with vat.bn_stats_frozen(m):
                    r = vat.r_adv(f, x, p, 32.0 * size / 224, 5.0 * size / 224, 1, g)
                    L_vat = vat.kl(p, f(x + r)).mean()
                loss = (0.3 * F.cross_entropy(logits[:4 * Bm], y.repeat(4)) + 0.7 * F.cross_entropy(rot, torch.cat(
                    [rotation.rot_labels(Bm, device)] * 2)) + 0.3 * L_vat + 0.3 * vat.entropy(logits).mean())
            update(loss, opt)
            polyak.update(m)
        return 24 * Bm, 8 * Bm, step

    return {"baseline": baseline_step, "rotation": rotation_step, "exemplar": exemplar_step, "vat": vat_step, "moam": moam_step}


def anchors(device, size, batch, n):
    """timm's resnetv2_50 and torchvision's resnet50, trained like ours: bf16 autocast, channels_last."""
    out = {}
    builders = {"torchvision resnet50": lambda: __import__("torchvision").models.resnet50()}
    try:
        import timm
        builders["timm resnetv2_50"] = lambda: timm.create_model("resnetv2_50")
    except ImportError:
        pass
    for name, build in builders.items():
        m = build().to(device, memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[name] = batch / timed(step, n, device)
        del m, opt
    return out


def bench_model(device, size, batch, B, n, compile_too):
    rows, ratios = {}, {}
    steps = method_steps(device, size, B)
    name = lambda label, b: f"{label} (ResNet50v2, batch {b}, {size} px, bf16, channels_last)"
    rows[name("baseline", batch)] = batch / timed(steps["baseline"](batch)[2], n, device)
    for label, build in [("fp32, no channels_last", dict(amp=False, channels_last=False)),
                         ("bf16, no channels_last", dict(channels_last=False)),
                         ("bf16, channels_last, torch.compile", dict(compile=True))]:
        if "compile" in label and not compile_too:
            continue
        rows[f"baseline (ResNet50v2, batch {batch}, {size} px, {label})"] = batch / timed(
            method_steps(device, size, B, **build)["baseline"](batch)[2], n, device)
    for label, value in anchors(device, size, batch, n).items():
        rows[f"{label} (batch {batch}, {size} px, bf16, channels_last): anchor"] = value
    Bm = max(1, B // 4)
    for label in ["rotation", "exemplar", "vat", "moam"]:
        images, fwd, step = steps[label](Bm) if label == "moam" else steps[label]()
        t = timed(step, n, device)
        _, _, ref = steps["baseline"](fwd, 4.0) if label == "moam" else steps["baseline"](fwd)
        t_ref = timed(ref, n, device)
        rows[f"{label} step (B_l = B_u = {Bm if label == 'moam' else B}, {images} forward images{', 4x wide' if label == 'moam' else ''})"] = images / t
        ratios[label] = {"step_s": t, "images": images, "baseline_step_s_same_forward_batch": t_ref, "forward_batch": fwd,
                         "ratio": t / (images / fwd * t_ref)}
        torch.cuda.empty_cache() if device.type == "cuda" else None
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform_name()
    print(f"\nTraining steps, images/s on {dev}, torch {torch.__version__} (forward images: the 4 rotations and 8 "
          "instances each count, VAT's three passes each count)")
    print(f"{'step':<98} {'img/s':>8}")
    for k, v in rows.items():
        print(f"{k:<98} {v:8.0f}")
    print("\nEach method's step time against a baseline doing the same forward images in forwards of the same size")
    print(f"{'method':<10} {'images':>7} {'step s':>8} {'expected s':>11} {'ratio':>6}  (goal: at most 1.15)")
    for k, r in ratios.items():
        print(f"{k:<10} {r['images']:7d} {r['step_s']:8.4f} {r['images'] / r['forward_batch'] * r['baseline_step_s_same_forward_batch']:11.4f} {r['ratio']:6.2f}")
    return {"device": dev, "torch": torch.__version__, "images_per_s": rows, "ratios": ratios}


if __name__ == "__main__":
    a = argparse.ArgumentParser()
    a.add_argument("--part", choices=["data", "model", "all"], default="all")
    a.add_argument("--size", type=int, default=224)
    a.add_argument("--jpegs", default="/tmp/s4l-bench-jpegs")
    a.add_argument("--json", default=".bench/bench.json")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--batch", type=int, default=256, help="the baseline's batch for the anchors")
    a.add_argument("--B", type=int, default=32, help="B_l = B_u of the method steps (MOAM: B / 4)")
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--compile", action="store_true", help="also time the compiled baseline")
    args = a.parse_args()
    out = {}
    if args.part in ("data", "all"):
        out["data"] = bench_data(make_jpegs(args.jpegs), args.size)
    if args.part in ("model", "all"):
        device = torch.device(args.device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        out["model"] = bench_model(device, args.size, args.batch, args.B, args.steps, args.compile)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
