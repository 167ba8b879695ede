"""The toolbox every s4l script shares: the ResNetV2 family; data (ImageFolder,
--data synthetic, class-balanced splits, transforms, samplers); the learning-rate schedule; and the
small DDP / evaluation / checkpoint plumbing. Plain functions and classes, nothing method-specific.

Every random choice about a training sample (its crop, flip, colour noise) is drawn from a seed made
of (--seed, stream, epoch, position), never from a worker's or a rank's RNG: the data a run sees does
not depend on the number of processes or workers, and a resumed run continues exactly.
"""
import argparse, atexit, functools, gc, io, json, math, multiprocessing, os, random, shutil, signal, sys, tempfile, time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, encode_jpeg

try:  # libjpeg-turbo through torchvision.io (deprecated in torchvision 0.29 for TorchCodec; PIL if it goes)
    from torchvision.io import decode_image
except ImportError:
    decode_image = None
from tqdm import tqdm

ARCHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


class UserError(Exception):
    """A mistake in the command line, the data or the output folder: one line, never a traceback."""


class Stopped(BaseException):
    """A stop signal, raised once nothing is left to save (a BaseException: no `except Exception` eats it)."""


def main_guard(main):
    """Run main() as a command: a UserError is one `error:` line (exit 1), a stop signal exits 128 + signal."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # `nohup` and background jobs keep their ignored signals
            signal.signal(s, _on_signal)
    code = 0
    try:
        main()
    except (Exception, Stopped) as e:
        _signal["deferred"] = True
        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
        if isinstance(e, UserError):  # DataLoader workers re-raise it with their traceback in the text: the last line
            code = "error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1]
        elif isinstance(e, Stopped) or _signal["received"]:  # after a signal a peer's exit may break a collective
            code = 128 + (e.args[0] if isinstance(e, Stopped) else _signal["received"])
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"stopped by {signal.Signals(code - 128).name}: re-run the same command to continue", file=sys.stderr)
        else:
            raise
    finally:
        gc.collect()  # DDP's hooks make cycles: free the model (and the process group it holds) while Python is whole
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


# ---------------------------------------------------------------- model: ResNetV2 (He et al. 2016) ----
class Block(nn.Module):
    """Pre-activation unit: BN-ReLU before every conv; a projection shortcut reads the pre-activated input."""

    def __init__(self, cin, planes, stride, bottleneck):
        super().__init__()
        cout = planes * 4 if bottleneck else planes
        shapes = ([(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, cout, 1, 1)] if bottleneck
                  else [(cin, planes, 3, stride), (planes, cout, 3, 1)])  # (in, out, kernel, stride) per conv
        self.bns = nn.ModuleList(nn.BatchNorm2d(i) for i, _, _, _ in shapes)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, k // 2, bias=False) for i, o, k, s in shapes)
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bns[0](x))
        shortcut = x if self.proj is None else self.proj(out)
        out = self.convs[0](out)
        for bn, conv in zip(self.bns[1:], self.convs[1:]):
            out = conv(F.relu(bn(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """ResNet-v2 ("Identity Mappings in Deep Residual Networks"); `width` multiplies every channel count.
    model(x) are the class logits; model(x, heads=("fc", "rot")) a tuple, one per named head, all on
    the pooled penultimate features forward_features(x) [N, num_features]."""

    def __init__(self, depth=50, width=1.0, num_classes=1000, stem="imagenet"):
        super().__init__()
        stages, bottleneck = {18: ([2, 2, 2, 2], False), 34: ([3, 4, 6, 3], False), 50: ([3, 4, 6, 3], True),
                              101: ([3, 4, 23, 3], True), 152: ([3, 8, 36, 3], True)}[depth]
        c = lambda n: max(1, round(n * width))
        self.stem = nn.Sequential(nn.Conv2d(3, c(64), 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)) if stem == "imagenet" \
            else nn.Sequential(nn.Conv2d(3, c(64), 3, 1, 1, bias=False))  # "cifar": He et al.'s CIFAR nets, 32x32 at stage 1
        blocks, cin = [], c(64)
        for i, n in enumerate(stages):
            for j in range(n):
                blocks.append(Block(cin, c(64 * 2 ** i), 2 if i > 0 and j == 0 else 1, bottleneck))
                cin = c(64 * 2 ** i) * (4 if bottleneck else 1)
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(cin)  # the final BN+ReLU that pre-activation nets need before pooling
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        return F.relu(self.norm(self.blocks(self.stem(x)))).mean((2, 3))

    def forward(self, x, heads=("fc",)):
        h = self.forward_features(x)
        out = tuple(getattr(self, name)(h) for name in heads)
        return out[0] if len(out) == 1 else out


def resnet(a, num_classes):
    """The ResNetV2 that the arguments `a` (this run's Namespace, or a checkpoint's args dict) describe."""
    a = a if isinstance(a, dict) else vars(a)
    return ResNetV2(ARCHS[a["arch"]], a["width"], num_classes, a.get("stem", "imagenet"))


def param_groups(model, wd):
    """Weight decay on conv and linear weights only, never on BN parameters or biases (the authors' code)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def lr_at(step, steps_per_epoch, base_lr, warmup, decay_epochs, schedule="step", epochs=None):
    """Linear warm-up from 0 over `warmup` epochs, then x0.1 at each of `decay_epochs` ("step", the paper's),
    or a half cosine from base_lr to 0 at `epochs` ("cosine", Loshchilov & Hutter 2017); per step."""
    epoch = step / steps_per_epoch
    if epoch < warmup:
        return base_lr * epoch / warmup
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup) / max(epochs - warmup, 1e-9))))
    return base_lr * 0.1 ** sum(epoch >= d for d in decay_epochs)


# ---------------------------------------------------------------- command line ----
def number(kind, lo, hi=math.inf, strict=False, count=None):
    """An argparse type: a finite `kind` (int or float) >= lo (> lo if strict) and <= hi; with `count`, a
    comma-separated list of them (count 0: any length), e.g. --decay-epochs 140,160,180."""
    what = ("an integer" if kind is int else "a number") + (
        f" > {lo:g}" if strict else f" >= {lo:g}" if hi == math.inf else f" in [{lo:g}, {hi:g}]")

    def one(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
        if not (math.isfinite(v) and (v > lo if strict else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"{s} is not {what}")
        return v

    def many(s):
        v = [one(x.strip()) for x in s.split(",") if x.strip()]
        if count and len(v) != count:
            raise argparse.ArgumentTypeError(f"{s!r} is not {count} comma-separated values, each {what}")
        return v
    return one if count is None else many


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other error (argparse's own prints the whole usage first)
        sys.exit(f"error: {message} (see {self.prog} --help)")


def parser(doc):
    """The flags every script shares, each checked where it is parsed. Recipe flags default to None: the
    script's RECIPES table fills them for the chosen --labels (finish_args)."""
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default=os.environ.get("IMAGENET_DIR", "data/imagenet"),
      help="ImageFolder root with train/<class>/* and val/<class>/*, or 'synthetic' (default: $IMAGENET_DIR, "
      "else data/imagenet)")
    a("--labels", type=number(float, 0, 100), default=10, help="percent of training labels kept, class-balanced")
    a("--split-file", help="labeled subset from a file of image paths or names (one per line, or JSON {'values': [...]})")
    a("--val-split", choices=["public", "custom"], default="public",
      help="public: evaluate on val/; custom: hold out --val-size class-balanced training images")
    a("--val-size", type=number(int, 1), help="hold-out size for --val-split custom (default: 50046; 5000 at 1%%)")
    a("--val-subsets", type=number(int, 1, count=0), default=[],
      help="also report nested class-balanced subsets of the validation images, e.g. 1000,5000 (Section 7)")
    a("--epochs", type=number(int, 0))
    a("--batch-size", type=number(int, 1), help="GLOBAL batch size, split over the processes")
    a("--lr", type=number(float, 0, strict=True))
    a("--wd", type=number(float, 0))
    a("--warmup", type=number(float, 0), help="epochs of linear learning-rate warm-up from 0")
    a("--decay-epochs", type=number(float, 0, count=0), help="epochs at which the learning rate is multiplied by 0.1, "
      "e.g. 140,160,180")
    a("--seed", type=number(int, 0), default=0)
    a("--split-seed", type=number(int, 0), help="seed of the labeled subset and hold-out (default: --seed)")
    a("--workers", type=number(int, 0), default=8, help="data-loading processes per loader and process")
    a("--img-size", type=number(int, 1), default=224)
    a("--arch", choices=ARCHS, default="resnet50", help="ResNet-v2 (pre-activation) depth")
    a("--width", type=number(float, 0, strict=True), default=1.0, help="channel multiplier (4 for MOAM)")
    a("--out", help="output folder (default: runs/<script>-labels<P>); re-running resumes from its last.pt")
    a("--amp", choices=["bf16", "fp16", "none"], help="autocast precision (default: bf16 on CUDA, none on CPU)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    a("--compile", action="store_true", help="torch.compile the model")
    a("--color", action=argparse.BooleanOptionalAction, help="HSV colour noise on the training images (default: "
      "the recipe's, on at 1%%)")
    a("--eval-every", type=number(int, 1), help="evaluate every N epochs and after the last")
    a("--log-every", type=number(int, 1), default=50, help="steps between progress updates (the only host syncs)")
    a("--save-every", type=number(float, 0, strict=True), default=30, help="minutes between mid-epoch checkpoints")
    a("--skip-bad-images", action="store_true", help="replace an unreadable training image by another of its own "
      "subset, leave an unreadable validation image out; list them in OUT/skipped.txt")
    a("--synthetic", type=number(int, 1, count=3), default=[10, 100, 48],
      help="--data synthetic: CLASSES,TRAIN_IMAGES_PER_CLASS,PIXELS (val: a fifth as many)")
    a("--deterministic", action="store_true", help="deterministic kernels (tests)")
    small = p.add_argument_group("small images (e.g. 32 px; README, 'Small images'): the paper's ImageNet choices are the defaults").add_argument
    small("--stem", choices=["imagenet", "cifar"], default="imagenet",
          help="imagenet: 7x7/2 conv + 3x3/2 max-pool; cifar: one 3x3/1 conv, full resolution into stage 1")
    small("--crop", choices=["inception", "pad"], default="inception", help="training crop: inception (area "
          "0.05-1, the authors'), or pad (reflect-pad by img-size/8, random crop: CIFAR's); pad evaluates the whole image")
    small("--schedule", choices=["step", "cosine"], default="step", help="after the warm-up: x0.1 at --decay-epochs, "
          "or a cosine to 0 at the last epoch")
    a("--debug-nan-at", type=int, help=argparse.SUPPRESS)  # tests: poison the weights at this step
    a("--debug-stop-at", type=int, help=argparse.SUPPRESS)  # tests: the last rank gets SIGTERM at this step
    return p


def finish_args(args, recipes):
    """Fill the recipe flags from RECIPES (nearest --labels on a log scale) and check what can be checked
    before anything is written. The script's file name is the method: its checkpoints' stamp (a resume of
    another method's folder is refused) and the default --out, runs/<method>-labels<P>."""
    args.method = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    if args.labels == 0 and 0 not in recipes:
        raise UserError(f"{args.method}.py needs labels: --labels 0 (self-supervised only) is not one of its recipes")
    key = 0 if args.labels == 0 else min((k for k in recipes if k > 0), key=lambda k: abs(math.log(k / args.labels)))
    for k, v in recipes[key].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k, v in recipes[key].items():  # entries that depend on others, e.g. lr 0.1 x batch / 256
        if callable(getattr(args, k)):
            setattr(args, k, v(args))
    args.recipe = key
    if args.val_size is None:
        args.val_size = 5000 if key == 1 else 50046
    args.split_seed = args.seed if args.split_seed is None else args.split_seed
    args.out = args.out or os.path.join("runs", f"{args.method}-labels{args.labels:g}")
    args.amp = args.amp or ("bf16" if torch.cuda.is_available() else "none")
    args.eval_every = args.eval_every or 1
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes "
                        "(the global batch is split evenly over them)")
    return args


# ---------------------------------------------------------------- distributed ----
FLAGS = None


def setup(args):
    """nanoGPT's way: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or one plain process."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        global FLAGS  # a CPU (gloo) group for the ranks' small agreements (stop, save), whatever the backend
        FLAGS = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    return rank, world, device


def step_generator(seed, step, device, stream=0):
    """The generator of one step's random draws on the device (VAT's random start, a per-image pretext
    choice), seeded by (seed, stream, step) alone, so a resumed run draws the same numbers. With the rank as
    `stream` each rank draws its own rows; drawing for the GLOBAL batch and keeping this rank's rows instead
    gives every image the same draw whatever the number of processes (README, "Write your own pretext task")."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0]))


def autocast(args, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def wrap(model, args, device, world):
    """(fast, net): the compiled module (no DDP: for extra passes that must not all-reduce) and the
    DDP-wrapped one for the training forward. Save `model` itself: no 'module.' or '_orig_mod.' prefixes."""
    fast = torch.compile(model) if args.compile else model
    if world == 1:
        return fast, fast
    return fast, nn.parallel.DistributedDataParallel(
        fast, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


# ---------------------------------------------------------------- data ----
IMAGE_EXT = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")


def scan(folder, what):
    """The one place that decides what is a class and what is an image: folder/<class>/**/<image>, classes
    sorted by name. Names that begin with '.' are never data (.ipynb_checkpoints, .DS_Store, macOS's ._x.jpg);
    files count by their extension (IMAGE_EXT, any case); a class folder with no image is an error naming it."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder ({what} needs <class>/<image> sub-folders)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    files, labels = [], []
    for c, name in enumerate(classes):
        found = []
        for root, dirs, names in os.walk(os.path.join(folder, name), followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [(root, f) for f in names if not f.startswith(".") and f.lower().endswith(IMAGE_EXT)]
        if not found:
            raise UserError(f"{os.path.join(folder, name)}: a class folder with no images ({', '.join(IMAGE_EXT[:5])}, ...): "
                            "remove it or add its images (every sub-folder of {what} is a class)".replace("{what}", what))
        files += [os.path.join(root, f) for root, f in sorted(found)]
        labels += [c] * len(found)
    if not files:
        raise UserError(f"{folder}: no images in <class>/ sub-folders ({what} needs {folder}/<class>/<image>.jpg)")
    return classes, files, np.array(labels)


def make_synthetic(root, classes, per_class, size):
    """A small deterministic ImageFolder tree of JPEGs: class c is a shape (c % 5) in a colour (c // 5)
    at a random place and scale; light sky above dark ground gives every image a canonical 'up'."""
    if os.path.isdir(root):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp, rng = tempfile.mkdtemp(dir=os.path.dirname(root)), np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    hues = np.linspace(0, 1, -(-classes // 5), endpoint=False)
    try:  # a stop signal or an error in the middle leaves no half-written folder behind
        for split, n in (("train", per_class), ("val", max(1, per_class // 5))):
            for c in range(classes):
                os.makedirs(f"{tmp}/{split}/c{c:03d}")
                colour = 255 * np.array([math.cos(2 * math.pi * (hues[c // 5] + k / 3)) * 0.45 + 0.5 for k in range(3)])
                for i in range(n):
                    horizon, (cx, cy), r = rng.uniform(0.45, 0.7), rng.uniform(0.3, 0.7, 2), rng.uniform(0.18, 0.3)
                    img = np.where((y < horizon)[..., None], [150, 190, 240], [70, 60, 30]) * rng.uniform(0.7, 1.1)
                    img = img + (y[..., None] * 60 if rng.random() < 0.5 else 0)
                    dx, dy = x - cx, y - cy
                    mask = [dx ** 2 + dy ** 2 < r ** 2, np.maximum(abs(dx), abs(dy)) < r * 0.8,  # disc, square,
                            (dy > -r) & (dy < r * 0.7) & (abs(dx) < (dy + r) / 2),  # triangle pointing up,
                            (abs(dy) < r / 3) & (abs(dx) < r), (abs(dx) < r / 4) & (dy > -r) & (dy < r) |  # bar, "T"
                            (abs(dy + r * 0.8) < r / 4) & (abs(dx) < r)][c % 5]
                    img[mask] = colour * rng.uniform(0.8, 1.2)
                    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
                    data = encode_jpeg(torch.from_numpy(img).permute(2, 0, 1).contiguous(), quality=90)
                    with open(f"{tmp}/{split}/c{c:03d}/{i:05d}.jpg", "wb") as f:
                        f.write(data.numpy().tobytes())
                    pause_for_tests("synthetic")
        try:
            os.rename(tmp, root)
        except OSError:  # another process (another node) made it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_split_file(path, files, train_dir):
    """Indices of the training images a --split-file lists: a plain list (one per line) or the authors' JSON
    {"values": [...]}. An entry matches on as many trailing path components as it gives: "n01440764/x.JPEG"
    (or train/..., or an absolute path) names that class folder's x.JPEG; a bare "x.JPEG" matches by base
    name and must name exactly one image. Anything else is one error line."""
    if not os.path.isfile(path):
        raise UserError(f"--split-file {path}: no such file")
    text = open(path, encoding="utf-8", errors="replace").read()
    listed = text.splitlines()
    if text.lstrip().startswith("{"):
        try:
            listed = json.loads(text)["values"]
            assert isinstance(listed, list) and all(isinstance(n, str) for n in listed)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise UserError(f"--split-file {path}: not the authors' JSON format, an object with a list of names under "
                            f"\"values\" ({type(e).__name__}: {str(e)[:80]})") from None
    entries = sorted({tuple(c for c in n.strip().replace("\\", "/").split("/") if c not in ("", ".")) for n in listed} - {()})
    if not entries:
        raise UserError(f"--split-file {path}: lists no images")
    rel = [f[len(train_dir) + 1:].split(os.sep) for f in files]
    by_name = {}
    for i, r in enumerate(rel):
        by_name.setdefault(r[-1], []).append(i)
    chosen, missing = set(), []
    for e in entries:
        found = [i for i in by_name.get(e[-1], []) if rel[i][-min(len(e), len(rel[i])):] == list(e[-min(len(e), len(rel[i])):])]
        if len(found) > 1:
            raise UserError(f"--split-file {path}: '{'/'.join(e)}' names {len(found)} images ({', '.join('/'.join(rel[i]) for i in found[:3])}"
                            f"{', ...' if len(found) > 3 else ''}): list it with its class folder, e.g. {'/'.join(rel[found[0]][-2:])}")
        chosen.update(found) if found else missing.append("/".join(e))
    if missing:
        raise UserError(f"--split-file {path}: {len(missing)} of its {len(entries)} entries are not images under {train_dir}, "
                        f"e.g. {missing[0]}")
    return np.array(sorted(chosen), dtype=np.int64)


def shuffled_classes(labels, n_classes, seed):
    """Each class's image indices in a seeded random order, and a seeded random order of the classes."""
    rng = np.random.default_rng(seed)
    groups = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels, minlength=n_classes))[:-1])
    return [rng.permutation(g) for g in groups], rng.permutation(n_classes)


def balanced(by_class, order, n, names):
    """Per-class counts of an n-image subset, as balanced as possible: floor(n / C) for every class,
    plus one for the first n mod C classes of `order`. Taking the first k_c of each shuffled class makes
    subsets of different sizes nested, each inside the next."""
    k = np.full(len(by_class), n // len(by_class))
    k[order[: n % len(by_class)]] += 1
    short = [c for c in range(len(by_class)) if k[c] > len(by_class[c])]
    if short:
        raise UserError(f"a {n}-image class-balanced subset needs {k[short[0]]} images of class {names[short[0]]}, "
                        f"which has only {len(by_class[short[0]])}")
    return k


def take(by_class, k, last=False):
    """The first (or last) k[c] images of every class's shuffled list."""
    parts = [idx[len(idx) - kc:] if last else idx[:kc] for idx, kc in zip(by_class, k)]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def make_splits(labels, classes, args, files=(), train_dir=""):
    """(labeled, unlabeled, hold-out, {n: nested subset}) of the training images, from --split-seed alone:
    the same on every rank and in every script. The hold-out (--val-split custom) is the end of every
    class's shuffled list and is never trained on; the unlabeled stream is every other image (the authors' code); the
    labeled subset, the start of every list, is class-balanced: 10% -> 128 per ILSVRC class, 1% -> 13,
    i.e. round(P / 100 * n_train / n_classes), the same with either --val-split and 1% inside 10%.
    `classes`: the class names (or their number), for the errors."""
    names = [f"#{c}" for c in range(classes)] if isinstance(classes, int) else classes
    n_classes = len(names)
    by_class, order = shuffled_classes(labels, n_classes, args.split_seed)
    held_k = np.zeros(n_classes, int)
    held, subsets = np.zeros(0, np.int64), {}
    if args.val_split == "custom":  # Section 4: hyper-parameters are chosen on a hold-out of train/
        held_k = balanced(by_class, order, args.val_size, names)
        held = take(by_class, held_k, last=True)
        if args.val_subsets and max(args.val_subsets) > args.val_size:
            raise UserError(f"--val-subsets {max(args.val_subsets)} is larger than the hold-out (--val-size {args.val_size})")
        subsets = {n: take(by_class, balanced(by_class, order, n, names), last=True) for n in sorted(args.val_subsets)}
    rest = [len(idx) - h for idx, h in zip(by_class, held_k)]
    unlabeled = take(by_class, rest)
    if args.split_file:
        labeled = read_split_file(args.split_file, files, train_dir)
        if np.isin(labeled, held).any():
            raise UserError(f"--split-file {args.split_file} lists images of the --val-split custom hold-out")
        percent = 100 * len(labeled) / len(labels)  # the recipe follows --labels: the two must agree
        if args.labels == 0 or abs(math.log(percent / args.labels)) > math.log(2):
            raise UserError(f"--split-file {args.split_file} lists {len(labeled)} of the {len(labels)} training images "
                            f"({percent:.3g}%), but --labels is {args.labels:g}: pass --labels {percent:.2g} "
                            "(--labels picks the recipe)")
    elif args.labels >= 100:
        labeled = unlabeled
    else:
        k = round(args.labels / 100 * len(labels) / n_classes)
        short = [c for c in range(n_classes) if rest[c] < k]
        if short:
            raise UserError(f"--labels {args.labels:g} asks for {k} labeled images per class, but class "
                            f"{names[short[0]]} has only {rest[short[0]]} (after the hold-out)")
        labeled = take(by_class, [k] * n_classes)
    return labeled, unlabeled, held, subsets


def load_data(args, rank, world):
    """Files, labels and the splits: d.files/labels/classes, d.labeled, d.unlabeled (training indices);
    d.val_files/val_labels/val_index (the evaluation images) and d.subsets ({n: nested subset})."""
    root = args.data
    if root == "synthetic":
        classes, per_class, size = args.synthetic
        root = os.path.join(args.out, f"synthetic-{classes}x{per_class}-{size}px")
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            make_synthetic(root, classes, per_class, size)
        if world > 1:
            dist.barrier()
    elif not os.path.isdir(root):
        raise UserError(f"--data {root}: no such folder (expected train/<class>/* and val/<class>/*, or 'synthetic')")
    classes, files, labels = scan(os.path.join(root, "train"), "train/")
    pause_for_tests("scan")
    d = argparse.Namespace(classes=classes, files=files, labels=labels)
    d.labeled, d.unlabeled, held, d.subsets = make_splits(labels, classes, args, files, os.path.join(root, "train"))
    if args.val_split == "custom":
        d.val_files, d.val_labels, d.val_index = files, labels, held
    else:
        val_classes, d.val_files, d.val_labels = scan(os.path.join(root, "val"), "val/")
        if val_classes != classes:
            only_t, only_v = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
            raise UserError(f"train/ and val/ have different classes (only in train/: {only_t[:3]}, "
                            f"only in val/: {only_v[:3]})")
        d.val_index = np.arange(len(d.val_files))
        by_class, order = shuffled_classes(d.val_labels, len(classes), args.split_seed)
        d.subsets = {n: take(by_class, balanced(by_class, order, n, classes)) for n in sorted(args.val_subsets)}
    os.makedirs(args.out, exist_ok=True)  # the data were fine: the folder may hold skipped.txt from now on
    return d


def read_image(path):
    """The one place that decides what an image file becomes: uint8 [3, H, W] RGB, whatever the file holds
    (8 or 16 bits per channel, 32-bit or float grey, palette, grey, alpha (dropped), CMYK, several frames
    (the first)), or a UserError that names the file. JPEG/PNG/WebP/GIF by libjpeg-turbo and libpng
    (torchvision.io), anything else by PIL. EXIF orientation is not applied (as torchvision's ImageFolder
    and the authors' tf.image.decode_jpeg)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError, TypeError):  # BMP, TIFF, PPM, ..., or no torchvision.io decoder: PIL
            im = Image.open(io.BytesIO(data))
            im.seek(0)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # PIL's convert("RGB") would clip these at 255
                a = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(a * 255 if im.mode == "F" else a // 256, 0, 255).astype(np.uint8))
            img = TF.pil_to_tensor(im.convert("RGB"))
        img = img[0] if img.ndim == 4 else img  # an animation: its first frame
        img = (img.to(torch.int32) >> 8).to(torch.uint8) if img.dtype == torch.uint16 else img  # 16-bit PNG
        assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 and min(img.shape) > 0, (img.dtype, img.shape)
        return img.contiguous()
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {str(e).strip()[:80]}); remove it, or pass "
                        "--skip-bad-images") from None


def inception_crop(img, rng, size, area=(0.05, 1.0), ratio=(3 / 4, 4 / 3)):
    """The authors' Inception crop: area in [0.05, 1] of the image, aspect ratio in [3/4, 4/3], resized."""
    H, W = img.shape[-2:]
    for _ in range(10):
        a, r = H * W * rng.uniform(*area), math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(a * r)), round(math.sqrt(a / r))
        if 0 < w <= W and 0 < h <= H:
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            break
    else:  # torchvision's fallback: the central crop of the nearest allowed aspect ratio
        w, h = (W, min(H, round(W / ratio[0]))) if W / H < ratio[0] else (min(W, round(H * ratio[1])), H)
        top, left = (H - h) // 2, (W - w) // 2
    return TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)


def pad_crop(img, rng, size):
    """CIFAR's crop: the image at size x size, reflect-padded by size / 8, a random size x size window."""
    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    p = size // 8
    img = TF.pad(img, [p], padding_mode="reflect") if p else img
    return TF.crop(img, rng.randint(0, 2 * p), rng.randint(0, 2 * p), size, size)


def train_view(img, rng, size, n=1, crop="inception"):
    """n views of one decoded image: Inception (or pad) crop + random flip, uint8 [n, 3, S, S], and each view's
    HSV-noise parameters [n, 7] (applied on the GPU by to_input when the recipe asks for colour)."""
    views, hsv = [], []
    for _ in range(n):
        v = inception_crop(img, rng, size) if crop == "inception" else pad_crop(img, rng, size)
        views.append(v.flip(-1) if rng.random() < 0.5 else v)
        sv = [f for _ in range(2) for f in (rng.uniform(-2, 2), rng.uniform(-0.5, 0.5), rng.uniform(-0.1, 0.1))]
        hsv.append([rng.uniform(-0.1, 0.1)] + sv)
    return torch.stack(views), torch.tensor(hsv)


def eval_view(img, rng, size, crops=1, crop="inception"):
    """Resize the shorter side to size * 256 / 224 (aspect kept), then the central crop, or with crops=5
    the four corners and the centre (MOAM step 2, pseudolabel --tta). crop="pad": the whole image at
    size (shorter side, central crop), and for crops=5 the corners of it padded by size / 8."""
    if crop == "pad":
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
        img = TF.pad(img, [size // 8], padding_mode="reflect") if crops == 5 and size >= 8 else img
    else:
        img = TF.resize(img, round(size * 256 / 224), antialias=True)
    views = TF.five_crop(img, [size, size]) if crops == 5 else [TF.center_crop(img, [size, size])]
    return torch.stack(views), torch.zeros(len(views), 7)


class Images(torch.utils.data.Dataset):
    """Items are (index, seed) pairs: the image is decoded once and `view(img, random.Random(seed), ...)`
    makes its views. Returns (views uint8 [V, 3, S, S], hsv [V, 7], label, index). With --skip-bad-images
    (`skipped`: the file that lists them) an unreadable image is replaced by the next readable one of `pool`,
    the sorted indices of the sampler's own subset (labeled, unlabeled, ...): no image from outside the
    subset ever enters it; with pool None (evaluation, pseudo-labelling) the image leaves: index and label -1."""

    def __init__(self, files, labels, view, skipped=None, pool=None):
        self.files, self.labels, self.view, self.skipped, self.pool = files, labels, view, skipped, pool

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        i, seed = item
        pause_for_tests("eval-images" if self.pool is None else "train-images")  # tests: --workers 0 only
        for _ in range(1 if self.pool is None else len(self.pool)):
            try:
                img = read_image(self.files[i])
                break
            except UserError:
                if self.skipped is None:
                    raise
                with open(self.skipped, "a") as f:
                    f.write(self.files[i] + "\n")
                if self.pool is None:
                    i, img = -1, torch.zeros(3, 1, 1, dtype=torch.uint8)
                    break
                i = int(self.pool[(np.searchsorted(self.pool, i) + 1) % len(self.pool)])
        else:
            raise UserError(f"no image of a {len(self.pool)}-image training subset is readable (see {self.skipped})")
        x, hsv = self.view(img, random.Random(seed))
        return x, hsv, int(self.labels[i]) if i >= 0 else -1, i


class EpochBatches:
    """One epoch over `indices`: global batch s is perm[s*B:(s+1)*B] of a permutation drawn from
    (seed, stream, epoch), the last partial batch dropped; this process takes its 1/world slice."""

    def __init__(self, indices, batch, seed, rank, world, stream=0):
        if len(indices) < batch:
            raise UserError(f"{len(indices)} training images are fewer than one batch (--batch-size {batch})")
        self.indices, self.batch, self.seed, self.stream = np.asarray(indices), batch, seed, stream
        self.lo, self.b, self.epoch, self.start = rank * (batch // world), batch // world, 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(self.indices) // self.batch - self.start

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.stream, self.epoch]).permutation(len(self.indices))
        for s in range(self.start, len(self.indices) // self.batch):
            pos = range(s * self.batch + self.lo, s * self.batch + self.lo + self.b)
            yield [(int(self.indices[perm[p]]), f"{self.seed}-{self.stream}-{self.epoch}-{p}") for p in pos]


class StreamBatches(EpochBatches):
    """The endless unlabeled stream: global batch s is positions [s*B, (s+1)*B) of a concatenation
    of permutations of `indices`, one drawn per cycle; starts at batch `start` (the resumed step)."""

    def __len__(self):
        return sys.maxsize

    def __iter__(self):
        n, step, perms = len(self.indices), self.start, {}
        while True:
            items = []
            for p in range(step * self.batch + self.lo, step * self.batch + self.lo + self.b):
                c = p // n
                if c not in perms:
                    perms = {c: np.random.default_rng([self.seed, self.stream, c]).permutation(n)}
                items.append((int(self.indices[perms[c][p % n]]), f"{self.seed}-{self.stream}-{p}"))
            yield items
            step += 1


def _worker_init(_):
    """DataLoader workers outlive a stop signal: a process group of their own (torchrun's SIGTERM to the rank's
    group and the terminal's Ctrl-C reach the main process alone), and the stop signals ignored (SLURM and
    `kill` of the process tree signal every process): the main process finishes its step, saves and exits,
    and then ends them (_end_workers; they also exit by themselves if it dies)."""
    os.setpgrp()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@atexit.register  # runs before multiprocessing's own exit handler, which would SIGTERM them and wait forever
def _end_workers():
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report their end as a worker failure
    for p in multiprocessing.active_children():
        p.kill()


def loader(files, labels, view, batches, args, device, persistent=True):
    """A DataLoader of Images over a sampler's batches; an unreadable image (--skip-bad-images) is replaced
    from the sampler's own subset (batches.indices), or, for a list of batches (evaluation), left out."""
    skipped = os.path.join(args.out, "skipped.txt") if args.skip_bad_images else None
    pool = np.sort(np.asarray(batches.indices)) if hasattr(batches, "indices") else None
    return torch.utils.data.DataLoader(
        Images(files, labels, view, skipped, pool), batch_sampler=batches, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=persistent and args.workers > 0,
        worker_init_fn=_worker_init, prefetch_factor=4 if args.workers > 0 else None)


def eval_loader(files, labels, index, args, rank, world, device, crops=1, persistent=True):
    """Central crops (or 5 crops) of files[index] for this rank: every image exactly once over the ranks."""
    mine, b = index[rank::world], max(1, args.batch_size // world)
    batches = [[(int(i), "") for i in mine[s:s + b]] for s in range(0, len(mine), b)]
    view = functools.partial(eval_view, size=args.img_size, crops=crops, crop=args.crop)
    return loader(files, labels, view, batches, args, device, persistent)


def rgb_to_hsv(x):  # [N, 3, H, W] in [0, 1] -> h, s, v each [N, H, W] in [0, 1]
    r, g, b = x.unbind(1)
    v, m = x.amax(1), x.amin(1)
    d = v - m
    dd = d.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd))
    return torch.where(d > 0, h / 6 % 1, 0), torch.where(v > 0, d / v.clamp_min(1e-12), 0), v


def hsv_to_rgb(h, s, v):
    i = torch.floor(h * 6)
    f, i = h * 6 - i, i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    pick = lambda *c: torch.stack(c, 1).gather(1, i[:, None]).squeeze(1)  # colorsys's six sectors
    return torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], 1)


def hsv_noise(x, p):
    """The authors' HSV noise per image: hue += U(-0.1, 0.1) (wrapping); S and V each v ** 2^U(-2, 2) *
    2^U(-0.5, 0.5) + U(-0.1, 0.1), clipped to [0, 1]. x [N, 3, H, W] in [0, 1], p [N, 7]."""
    h, s, v = rgb_to_hsv(x)
    p = p[:, :, None, None]
    h = (h + p[:, 0]) % 1
    s = (s ** 2 ** p[:, 1] * 2 ** p[:, 2] + p[:, 3]).clamp(0, 1)
    v = (v ** 2 ** p[:, 4] * 2 ** p[:, 5] + p[:, 6]).clamp(0, 1)
    return hsv_to_rgb(h, s, v)


def to_input(x, hsv, device, args, color=False):
    """uint8 views [B, V, 3, S, S] -> float [B*V, 3, S, S] in [-1, 1] on the device (the authors' x / 127.5 - 1),
    with the HSV noise done on the GPU in the batch when `color`."""
    x = x.to(device, non_blocking=True).flatten(0, 1).float()
    if color:
        x = hsv_noise(x / 255, hsv.to(device, non_blocking=True).flatten(0, 1)) * 255
    x = x / 127.5 - 1
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


# ---------------------------------------------------------------- evaluation ----
@torch.no_grad()
def evaluate(model, loader, d, args, device, world, predict=None):
    """Top-1/top-5 (%) of every (logits, targets) pair predict(x, y) returns, on the whole validation
    split (each image once over the ranks; an unreadable one skipped by --skip-bad-images is left out) and
    on each --val-subsets subset: {"top1", "rot_top1", ...}. A stop signal is polled for at every batch."""
    predict = predict or (lambda x, y: {"": (model(x), y)})
    member = torch.zeros(len(d.val_files), 1 + len(d.subsets), dtype=torch.bool)
    member[:, 0] = True
    for j, idx in enumerate(d.subsets.values()):
        member[torch.from_numpy(idx), j + 1] = True
    was_training, sums, ways = model.training, {}, {}
    model.eval()
    for b in model.buffers() if world > 1 else ():  # rank 0's BN statistics everywhere: the model saved is the one scored
        dist.broadcast(b, 0)
    together = agree(len(loader), dist.ReduceOp.MIN)  # batches every rank has: a stop signal is agreed on at each
    for i, (x, hsv, y, idx) in enumerate(loader):
        if i < together and (sig := stop_agreed()):
            raise Stopped(sig)
        m = (member[idx.clamp_min(0)] & (idx >= 0)[:, None]).to(device).float()  # [B, 1 + subsets]; -1: left out
        with autocast(args, device):
            outs = predict(to_input(x, hsv, device, args), y.to(device, non_blocking=True))
        for name, (logits, target) in outs.items():
            top, ways[name] = logits.float().topk(min(5, logits.shape[1]), 1).indices, logits.shape[1]
            hit = top == target.view(-1, 1)
            views = logits.shape[0] // m.shape[0]  # view-major rows, e.g. torch.cat of 4 rotations
            hits = torch.stack([hit[:, :1].any(1), hit.any(1), torch.ones_like(hit[:, 0])], 1).float()
            sums[name] = sums.get(name, 0) + m.repeat(views, 1).T @ hits  # [1 + subsets, 3]
    model.train(was_training)
    if world > 1:  # a rank with no images (a set smaller than the world) must still join every reduction
        names = [None] * world
        dist.all_gather_object(names, ways)
        for n, k in {n: k for w in names for n, k in w.items()}.items():
            sums.setdefault(n, torch.zeros(1 + len(d.subsets), 3, device=device))
            ways[n] = k
    out = {}
    for name, s in sorted(sums.items()):
        if world > 1:
            dist.all_reduce(s)
        for j, tag in enumerate([""] + [f"@{n}" for n in d.subsets]):
            top1, top5, n = s[j].tolist()
            out[f"{name}top1{tag}"] = 100 * top1 / max(n, 1)
            if ways[name] > 5:
                out[f"{name}top5{tag}"] = 100 * top5 / max(n, 1)
    return out


# ---------------------------------------------------------------- checkpoints and the run ----
def save_atomic(obj, path):
    """Write to a temporary file, flush it to disk, rename: a crash leaves the previous file intact."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    pause_for_tests("save")
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and "model" in ckpt and "args" in ckpt
        return ckpt
    except Exception as e:
        raise UserError(f"{path} is not a readable s4l checkpoint ({type(e).__name__}: truncated, or made "
                        "by something else); move it away or pass another --out/--ckpt") from None


def check_backbone(ckpt, path, args):
    """The architecture a checkpoint was made with must be the one asked for: one clear line if not."""
    a = ckpt["args"]
    if (a["arch"], a["width"], a.get("stem", "imagenet")) != (args.arch, args.width, args.stem):
        raise UserError(f"{path} is a {a['arch']} of width {a['width']:g} with the {a.get('stem', 'imagenet')} stem, "
                        f"not the {args.arch} of width {args.width:g} with the {args.stem} stem asked for (--arch/--width/--stem)")


# Flags that may differ when a run is resumed (each tested); any other difference is a different experiment.
MAY_CHANGE = {"epochs", "workers", "out", "data", "compile", "eval_every", "log_every", "save_every", "val_subsets",
              "skip_bad_images", "deterministic", "debug_nan_at", "debug_stop_at", "amp", "channels_last"}

# Stop signals: a scheduler's preemption (SLURM: SIGTERM to every process, or --signal=USR1), Ctrl-C, a closed
# terminal. Until a Run exists there is nothing to save and the handler ends the program at once; from then
# on it only records the signal, and the Run stops every rank at the same point after saving.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_signal = {"received": None, "deferred": False}


def _on_signal(signum, frame):
    _signal["received"] = signum
    if not _signal["deferred"]:
        raise Stopped(signum)


def pause_for_tests(phase):
    """Tests: hold at the first `phase` point ($S4L_TEST_PAUSE), after writing the pid to $S4L_TEST_PAUSE_FILE,
    until a stop signal arrives or the file is removed (or 60 s): a test can signal the run in a chosen phase."""
    path = os.environ.get("S4L_TEST_PAUSE_FILE")
    if os.environ.get("S4L_TEST_PAUSE") == phase and phase not in _signal:
        _signal[phase] = True
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        for _ in range(600):
            if _signal["received"] or not os.path.exists(path):
                return
            time.sleep(0.1)


def agree(value, op=dist.ReduceOp.MAX):
    """An int every rank agrees on (the MAX, or MIN, of their values), over the CPU group FLAGS."""
    if FLAGS is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op, group=FLAGS)
    return int(t)


def stop_agreed():
    """The stop signal any rank has received (else 0); every rank calls it at the same point."""
    return agree(_signal["received"] or 0)


def metric_rows(out):
    rows = []
    for line in open(os.path.join(out, "metrics.jsonl")) if os.path.exists(os.path.join(out, "metrics.jsonl")) else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a crash while it was written: its epoch is redone
            pass
    return rows


class Run:
    """One training run's output folder and bookkeeping: args.json, metrics.jsonl (a row per epoch),
    last.pt (atomic; resumed by re-running the same command), final.pt. The method is the script's name
    (args.method): a folder of another method is never resumed. Losses are summed on the device and read
    every --log-every steps. A stop signal on any rank makes every rank stop at the same point: in training
    after the step, saving last.pt first; in evaluation after the batch (last.pt is saved before it); the
    program then exits with 128 + the signal. A non-finite loss stops the run without saving over the last
    good checkpoint."""

    def __init__(self, args, model, opt, scaler, steps_per_epoch, rank, world, device, extra=None):
        self.args, self.method, self.model, self.opt, self.scaler = args, args.method, model, opt, scaler
        self.spe, self.rank, self.world, self.device, self.extra = steps_per_epoch, rank, world, device, extra or {}
        self.main, self.path = rank == 0, os.path.join(args.out, "last.pt")
        self.names, self.sums, self.first_bad, self.images = [], None, None, 0
        self.bar, self.saved_at = None, time.time()
        self.pending = (torch.zeros(2, dtype=torch.int32), None)  # the flags all-reduce in flight
        _signal["deferred"] = True  # from here on a signal is polled for, and the run saves before it stops

    def resume(self):
        """Restore last.pt if the folder has one (same method, same arguments) and return the step.
        self.epoch is the epoch to run: the next one, or the last one again, with no step left, when it
        was stopped in its evaluation (its row of metrics.jsonl is missing)."""
        self.step = 0
        if os.path.exists(self.path):
            ck = load_checkpoint(self.path)
            if ck.get("method") != self.method:
                raise UserError(f"{self.path} is a {ck.get('method')} checkpoint, not {self.method}: pass another --out")
            diff = [k for k in sorted(set(ck["args"]) | set(vars(self.args))) if k not in MAY_CHANGE
                    and ck["args"].get(k) != getattr(self.args, k, None)]
            if diff:
                was = ", ".join(f"--{k.replace('_', '-')} {ck['args'].get(k)} (now {getattr(self.args, k, None)})" for k in diff)
                raise UserError(f"{self.path} was made with {was}: re-run with the same arguments to resume, or pass another --out")
            try:
                self.model.load_state_dict(ck["model"])
                self.opt.load_state_dict(ck["optimizer"])
                for k, obj in self.extra.items():
                    obj.load_state_dict(ck[k])
            except (RuntimeError, KeyError, ValueError) as e:
                raise UserError(f"{self.path} does not fit this run's model ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:80]}): pass another --out") from None
            if ck["scaler"] and self.scaler.is_enabled():  # --amp may change on a resume: a new scaler then
                self.scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(ck["rng"])
            self.step, self.names = ck["step"], ck["meter"]["names"]
            if self.names:
                sums = ck["meter"]["sums"]
                mine = sums[self.rank] if len(sums) == self.world else (  # another world size: rank 0 holds them all
                    np.sum(sums, 0).tolist() if self.main else [0.0] * len(self.names))
                self.sums = torch.tensor(mine, dtype=torch.float64, device=self.device)
                self.first_bad = torch.full((len(self.names),), 2 ** 62, device=self.device)
        done, rows = self.step // self.spe, metric_rows(self.args.out) if self.main else []
        ended = self.step > 0 and self.step % self.spe == 0
        pending = agree(int(self.main and ended and done not in {r.get("epoch") for r in rows}))
        self.epoch = done - pending
        if ended and not pending and self.sums is not None:  # the sums of an epoch whose row is written
            self.sums.zero_()
        if self.main:
            if self.step:
                print(f"resumed {self.path} at step {self.step} (epoch {self.step / self.spe:.2f})")
            final = os.path.join(self.args.out, "final.pt")
            if self.step < self.args.epochs * self.spe and os.path.exists(final):  # a shorter run's: stale now
                os.remove(final)
                print(f"removed {final} of the shorter run: this one writes it at epoch {self.args.epochs}")
            os.makedirs(self.args.out, exist_ok=True)
            with open(os.path.join(self.args.out, "args.json"), "w") as f:
                json.dump(vars(self.args), f, indent=1)
            with open(os.path.join(self.args.out, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r.get("epoch", 0) <= done)
        return self.step

    def progress(self, loader, epoch):
        """The epoch's batches with a progress bar on rank 0; a signal already agreed on stops here."""
        if sig := stop_agreed():
            raise Stopped(sig)
        self.t0 = self.t1 = time.time()
        self.bar = tqdm(loader, total=self.spe, initial=self.step - epoch * self.spe, desc=f"epoch {epoch + 1}/{self.args.epochs}",
                        disable=not self.main, dynamic_ncols=True, leave=False)
        return self.bar

    def lr(self, step):
        """Set the schedule's learning rate for this step (updated every step) and return it."""
        a = self.args
        lr = lr_at(step, self.spe, a.lr, a.warmup, a.decay_epochs, a.schedule, a.epochs)
        for g in self.opt.param_groups:
            g["lr"] = lr
        if step == a.debug_nan_at:  # tests: a real non-finite loss from here on
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return lr

    def track(self, step, images, **losses):
        """After each optimizer step: add the losses (on the device; each rank adds 1/world of its own, so the
        sum does not depend on the number of processes); agree over the ranks on whether to save (rank 0's
        timer) or stop (a signal on any rank), by a CPU all-reduce started now and read at the next step, so
        no rank waits; read the losses only every --log-every steps."""
        if self.sums is None:
            self.names = list(losses)
            self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
            self.first_bad = torch.full((len(self.names),), 2 ** 62, device=self.device)
        if step + 1 == self.args.debug_stop_at and self.rank == self.world - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # tests: a real signal on one rank; all ranks must stop
        v = torch.stack([losses[k].detach().float() for k in self.names])
        self.sums += v.double() / self.world
        self.first_bad = torch.where(v.isfinite() | (self.first_bad < 2 ** 62), self.first_bad, step)
        self.step, self.images, self.t1 = step + 1, self.images + images * self.world, time.time()
        due = self.main and time.time() - self.saved_at > self.args.save_every * 60
        flags = torch.tensor([_signal["received"] or 0, due], dtype=torch.int32)
        if self.world > 1:
            work = dist.all_reduce(flags, dist.ReduceOp.MAX, group=FLAGS, async_op=True)
            (flags, previous), self.pending = self.pending, (flags, work)
            if previous is not None:
                previous.wait()
        if self.step % self.args.log_every == 0 or flags.any():
            self.check_finite()
            if self.bar is not None:
                mean = (self.sums * self.world / (self.step - (self.step - 1) // self.spe * self.spe)).tolist()
                postfix = {k: f"{m:.3f}" for k, m in zip(self.names, mean)}
                self.bar.set_postfix(lr=f"{self.opt.param_groups[0]['lr']:.4g}",
                                     img_s=f"{self.images / (time.time() - self.t0):.0f}", **postfix)
        if flags[0] or flags[1]:
            self.save()
        if flags[0]:
            self.drain()
            if self.main:
                print(f"\nstopped at step {self.step} (epoch {self.step / self.spe:.2f}); {self.path} saved", file=sys.stderr)
            raise Stopped(int(flags[0]))

    def drain(self):
        """Wait for the flags all-reduce in flight: none may outlive the run (the process group ends with it)."""
        if self.pending[1] is not None:
            self.pending[1].wait()
            self.pending = (self.pending[0], None)

    def check_finite(self):
        bad = self.first_bad.cpu()
        if self.world > 1:
            dist.all_reduce(bad, dist.ReduceOp.MIN, group=FLAGS)
        if bool((bad < 2 ** 62).any()):
            i = int(bad.argmin())
            kept = f"{self.path} (step {load_checkpoint(self.path)['step']})" if os.path.exists(self.path) else "no checkpoint"
            raise UserError(f"non-finite {self.names[i]} at step {int(bad[i])} (epoch {int(bad[i]) // self.spe + 1}); "
                            f"stopped, the last good checkpoint is {kept}")

    def save(self):
        """last.pt: weights, optimizer, scaler, step, the per-rank loss sums of the epoch so far, extras."""
        self.check_finite()
        sums = [torch.zeros_like(self.sums) for _ in range(self.world)] if self.sums is not None else []
        if self.world > 1 and self.sums is not None:
            dist.all_gather(sums, self.sums)
        elif self.sums is not None:
            sums = [self.sums]
        if self.main:
            save_atomic({"method": self.method, "args": vars(self.args), "step": self.step,
                         "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                         "scaler": self.scaler.state_dict(), "rng": torch.get_rng_state(),
                         "meter": {"names": self.names, "sums": [s.tolist() for s in sums]},
                         **{k: obj.state_dict() for k, obj in self.extra.items()}}, self.path)
        self.saved_at = time.time()

    def end_epoch(self, epoch, evaluate):
        """The epoch's end: last.pt first (an evaluation that fails or is stopped loses no training: a re-run
        redoes only the evaluation), then evaluate() when due (every --eval-every epochs and after the last),
        then the epoch's row of metrics.jsonl: epoch, step, lr, each loss's mean over the epoch's steps, the
        evaluations, training images/s."""
        self.save()
        evals = evaluate() if (epoch + 1) % self.args.eval_every == 0 or epoch + 1 == self.args.epochs else {}
        sums = self.sums.clone() if self.sums is not None else torch.zeros(0, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        row = {"epoch": epoch + 1, "step": self.step, "lr": self.opt.param_groups[0]["lr"],
               **{k: v / self.spe for k, v in zip(self.names, sums.tolist())}, **evals,
               "images_per_s": round(self.images / max(self.t1 - self.t0, 1e-9), 1)}
        skipped = os.path.join(self.args.out, "skipped.txt")
        if self.args.skip_bad_images and os.path.exists(skipped):
            row["skipped_images"] = len(set(open(skipped).read().split("\n")) - {""})
            if self.main:
                print(f"skipped {row['skipped_images']} unreadable images, listed in {skipped}")
        if self.main:
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            print(json.dumps(shown), flush=True)
        if self.sums is not None:
            self.sums.zero_()
        self.images = 0
        return row

    def finish(self, state_dict=None, **extra):
        """final.pt: the trained (or averaged) weights with the arguments, for linear_eval and pseudolabel;
        first a check that every rank holds the same weights (a gradient that missed DDP's all-reduce would
        make them drift apart unseen: only rank 0 saves). A signal received by now stops the program here."""
        self.drain()
        if self.world > 1:
            total = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().view(1)
            spread = torch.cat([total, -total])
            dist.all_reduce(spread, dist.ReduceOp.MAX)
            if spread[0] != -spread[1]:
                raise UserError(f"the {self.world} processes ended with different weights: a bug, please report it")
        if self.main:
            save_atomic({"method": self.method, "args": vars(self.args), "step": self.step,
                         "model": state_dict or self.model.state_dict(), **extra},
                        os.path.join(self.args.out, "final.pt"))
        if self.world > 1:  # the next step (MOAM) or script may read it on any rank
            dist.barrier()
        sig = stop_agreed()
        _signal["deferred"] = False  # nothing more to save: a signal from here on ends the program at once
        if sig:
            raise Stopped(sig)
        pause_for_tests("finished")
