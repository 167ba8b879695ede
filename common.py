"""What every s4l script shares. Part 1 is S4L's (the network, the schedule, the splits, the views,
the samplers and loaders, the evaluation): read it to learn the method. Part 2 is plumbing a fork
never reads: the command line, processes, image files, checkpoints, the run folder, signals.

What a method script calls, in its order:
    parser, finish_args       the flags; the script's RECIPES for --labels fills the rest   Part 2
    setup                     this process's rank, the number of processes, the device       Part 2
    load_data                 the images and their splits: labeled, unlabeled, hold-out      Part 1
    train_view, EpochBatches  the training views; the labeled batches of an epoch            Part 1
    loader, eval_loader       DataLoaders over them; the validation images                   Part 1
    resnet, param_groups      the ResNetV2; which weights are decayed                        Part 1
    Run                       the run folder: resume, lr, log, save_or_stop, end_epoch       Part 2
    unlabeled_batches         x_u, one batch per step, from the step the run resumes at      Part 1
    ddp                       the module that trains the model (DDP over processes)          Part 2
    to_input, autocast        uint8 views to the network's input; mixed precision          Part 1, 2
    evaluate                  top-1 and top-5 on the validation split                        Part 1

Every random choice about a training sample (crop, flip, colour noise) comes from a seed made of
(--seed, stream, epoch, position), never from a worker's or a rank's RNG: the data a run sees do not
depend on the number of processes or workers, and a resumed run continues exactly.
"""
import argparse, atexit, contextlib, fcntl, functools, gc, hashlib, io, json, math
import multiprocessing, os, random, shutil, signal, socket, sys, tempfile, time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import decode_image, write_jpeg
from tqdm import tqdm


# ==================================================================== Part 1: what S4L needs ====

# ---- the network: ResNet-v2, "Identity Mappings in Deep Residual Networks" (He et al. 2016) ----
ARCHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}
STAGES = {18: ([2, 2, 2, 2], False), 34: ([3, 4, 6, 3], False), 50: ([3, 4, 6, 3], True),
          101: ([3, 4, 23, 3], True), 152: ([3, 8, 36, 3], True)}  # blocks per stage, bottleneck?


class Block(nn.Module):
    """Pre-activation unit: BN-ReLU before every conv, the projection shortcut after the first."""

    def __init__(self, cin, planes, stride, bottleneck):
        super().__init__()
        cout = planes * 4 if bottleneck else planes
        if bottleneck:  # (in, out, kernel, stride) of each conv
            shapes = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, cout, 1, 1)]
        else:
            shapes = [(cin, planes, 3, stride), (planes, cout, 3, 1)]
        self.bns = nn.ModuleList(nn.BatchNorm2d(i) for i, _, _, _ in shapes)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, k // 2, bias=False)
                                   for i, o, k, s in shapes)
        same = stride == 1 and cin == cout
        self.proj = None if same else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bns[0](x))
        shortcut = x if self.proj is None else self.proj(out)
        out = self.convs[0](out)
        for bn, conv in zip(self.bns[1:], self.convs[1:]):
            out = conv(F.relu(bn(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """ResNet-v2 of `depth` 18 to 152; `width` multiplies every channel count. model(x) [N, 3, S, S]
    -> class logits [N, num_classes]; model(x, heads=("fc", "rot")), a tuple of the named heads'
    outputs, each an nn.Linear on the pooled penultimate features forward_features(x) [N, F]."""

    def __init__(self, depth=50, width=1.0, num_classes=1000, stem="imagenet", normalize=False):
        super().__init__()
        stages, bottleneck = STAGES[depth]
        c = lambda n: max(1, round(n * width))  # channels at this width
        # normalize: each input channel standardised by a BN without affine parameters (the batch's
        # mean and std in training, the training images' running ones at evaluation)
        first = [nn.BatchNorm2d(3, affine=False)] if normalize else []
        if stem == "imagenet":  # a 7x7/2 conv and a 3x3/2 max-pool
            conv, pool = nn.Conv2d(3, c(64), 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
            self.stem = nn.Sequential(*first, conv, pool)
        else:  # "cifar", He et al.'s CIFAR nets: one 3x3/1 conv, the full resolution into stage 1
            self.stem = nn.Sequential(*first, nn.Conv2d(3, c(64), 3, 1, 1, bias=False))
        blocks, cin = [], c(64)
        for i, n in enumerate(stages):
            for j in range(n):
                blocks.append(Block(cin, c(64 * 2 ** i), 2 if i > 0 and j == 0 else 1, bottleneck))
                cin = c(64 * 2 ** i) * (4 if bottleneck else 1)
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(cin)  # pre-activation nets need a last BN+ReLU before pooling
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
    """The ResNetV2 that `a` describes: this run's arguments, or a checkpoint's args dict."""
    a = a if isinstance(a, dict) else vars(a)
    model = ResNetV2(ARCHS[a["arch"]], a["width"], num_classes, a.get("stem", "imagenet"),
                     a.get("normalize", False))
    for b in model.blocks if a.get("zero_init_last") else ():  # each block starts as the identity
        nn.init.zeros_(b.convs[-1].weight)  # (timm's zero_init_last, after Goyal et al. 2017)
    return model


def param_groups(model, wd):
    """Weight decay on conv and linear weights, never on BN parameters or biases (the authors')."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


# ---- the learning-rate schedule (Section 4.1), set at every step ----
def lr_at(step, steps_per_epoch, base_lr, warmup, decay_epochs, schedule="step", epochs=None):
    """A linear warm-up from 0 over `warmup` epochs; then x0.1 at each of `decay_epochs` ("step",
    the paper's), or a half cosine from base_lr to 0 at `epochs` ("cosine", Loshchilov & Hutter)."""
    epoch = step / steps_per_epoch
    if epoch < warmup:
        return base_lr * epoch / warmup
    if schedule == "cosine":
        done = min(1.0, (epoch - warmup) / max(epochs - warmup, 1e-9))
        return base_lr * 0.5 * (1 + math.cos(math.pi * done))
    return base_lr * 0.1 ** sum(epoch >= d for d in decay_epochs)


# ---- the data and its splits (Section 4) ----
def load_data(args, rank, world):
    """The images and splits: d.files, d.labels, d.classes (the training images, their classes, the
    class names), d.labeled, d.unlabeled; d.val_files, d.val_labels, d.val_index (what evaluate
    scores: val/ or the hold-out), d.subsets (--val-subsets), d.record (check_data's)."""
    root = args.data
    if root == "synthetic":  # every process makes it, or finds it made (the first one's is kept)
        name = "synthetic-{}x{}-{}px".format(*args.synthetic)
        root = make_synthetic(os.path.join(args.out, name), *args.synthetic)
    elif not os.path.isdir(root):
        raise UserError(f"--data {root}: no such folder (expected train/<class>/* and "
                        "val/<class>/*, or 'synthetic')")
    train_dir = os.path.join(root, "train")
    classes, files, labels = scan(train_dir, "train/")
    d = argparse.Namespace(classes=classes, files=files, labels=labels)
    d.labeled, d.unlabeled, held, d.subsets = make_splits(labels, classes, args, files, train_dir)
    d.record = data_record(args, classes, [files[i][len(train_dir):] for i in d.labeled],
                           [files[i][len(train_dir):] for i in held])  # every checkpoint holds it
    if args.val_split == "custom":
        d.val_files, d.val_labels, d.val_index = files, labels, held
    else:
        val_classes, d.val_files, d.val_labels = scan(os.path.join(root, "val"), "val/")
        if val_classes != classes:  # a few of the classes that one of them lacks
            odd = sorted(set(classes) ^ set(val_classes))[:3]
            raise UserError(f"train/ and val/ have different classes (in one of them only: {odd})")
        d.val_index = np.arange(len(d.val_files))
        by_class, order = shuffled_classes(d.val_labels, len(classes), args.split_seed)
        d.subsets = {n: take(by_class, balanced(by_class, order, n, classes))
                     for n in sorted(args.val_subsets)}
    return d


def make_splits(labels, classes, args, files=(), train_dir=""):
    """(labeled, unlabeled, hold-out, {n: nested subset of the hold-out}), training-image indices
    from --split-seed alone. The hold-out ends every class's shuffled list (never trained on); the
    unlabeled stream is all other images (the authors'); the labeled subset starts every list,
    round(P / 100 * n_train / n_classes) per class (10%: 128, 1%: 13 of ImageNet's), or a file's."""
    names = [f"#{c}" for c in range(classes)] if isinstance(classes, int) else classes
    n_classes = len(names)
    by_class, order = shuffled_classes(labels, n_classes, args.split_seed)
    held_k, held, subsets = np.zeros(n_classes, int), np.zeros(0, np.int64), {}
    if args.val_split == "custom":
        held_k = balanced(by_class, order, args.val_size, names)
        held = take(by_class, held_k, last=True)
        if args.val_subsets and max(args.val_subsets) > args.val_size:
            raise UserError(f"--val-subsets {max(args.val_subsets)} is larger than the hold-out "
                            f"(--val-size {args.val_size})")
        for n in sorted(args.val_subsets):
            subsets[n] = take(by_class, balanced(by_class, order, n, names), last=True)
    rest = [len(idx) - h for idx, h in zip(by_class, held_k)]  # per class, outside the hold-out
    unlabeled = take(by_class, rest)
    if args.split_file:
        labeled = read_split_file(args, files, train_dir, held)
    elif args.labels >= 100:
        labeled = unlabeled
    else:
        k = round(args.labels / 100 * len(labels) / n_classes)
        c = next((c for c in range(n_classes) if rest[c] < k), None)  # a class too small
        if c is not None:
            raise UserError(f"--labels {args.labels:g} asks for {k} labeled images per class, but "
                            f"class {names[c]} has only {rest[c]} (after the hold-out)")
        labeled = take(by_class, [k] * n_classes)
    return labeled, unlabeled, held, subsets


def shuffled_classes(labels, n_classes, seed):
    """Each class's image indices in a seeded random order; a seeded random order of the classes."""
    rng = np.random.default_rng(seed)
    ends = np.cumsum(np.bincount(labels, minlength=n_classes))[:-1]
    groups = np.split(np.argsort(labels, kind="stable"), ends)
    return [rng.permutation(g) for g in groups], rng.permutation(n_classes)


def balanced(by_class, order, n, names):
    """Per-class counts of an n-image subset: n // C each, one more for n % C classes of `order`."""
    k = np.full(len(by_class), n // len(by_class))
    k[order[: n % len(by_class)]] += 1
    c = next((c for c in range(len(by_class)) if k[c] > len(by_class[c])), None)  # too small
    if c is not None:
        raise UserError(f"a {n}-image class-balanced subset needs {k[c]} images of class "
                        f"{names[c]}, which has only {len(by_class[c])}")
    return k


def take(by_class, k, last=False):
    """The first (or last) k[c] images of every class's shuffled list, sorted."""
    parts = [idx[len(idx) - kc:] if last else idx[:kc] for idx, kc in zip(by_class, k)]
    return np.sort(np.concatenate(parts)).astype(np.int64)


# ---- the views of an image: crops, flips, HSV colour noise ----
def inception_crop(img, rng, size, area=(0.05, 1.0), ratio=(3 / 4, 4 / 3)):
    """The authors' Inception crop: 0.05 to 1 of the image's area, aspect ratio 3/4 to 4/3."""
    H, W = img.shape[-2:]
    for _ in range(10):
        a = H * W * rng.uniform(*area)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(a * r)), round(math.sqrt(a / r))
        if 0 < w <= W and 0 < h <= H:
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            break
    else:  # torchvision's fallback: the central crop of the nearest allowed aspect ratio
        narrow = W / H < ratio[0]
        w, h = (W, min(H, round(W / ratio[0]))) if narrow else (min(W, round(H * ratio[1])), H)
        top, left = (H - h) // 2, (W - w) // 2
    return TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)


def pad_crop(img, rng, size):
    """CIFAR's crop: the image at size x size, reflect-padded by size / 8, a random window of it."""
    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    p = size // 8
    img = TF.pad(img, [p], padding_mode="reflect") if p else img
    return TF.crop(img, rng.randint(0, 2 * p), rng.randint(0, 2 * p), size, size)


def train_view(img, rng, size, n=1, crop="inception"):
    """n views of one decoded image, each a crop (Inception's, or pad-and-crop) and a random flip,
    uint8 [n, 3, S, S], and each view's HSV-noise draws [n, 7] (applied on the GPU: to_input)."""
    views, hsv = [], []
    for _ in range(n):
        v = inception_crop(img, rng, size) if crop == "inception" else pad_crop(img, rng, size)
        views.append(v.flip(-1) if rng.random() < 0.5 else v)
        hue = rng.uniform(-0.1, 0.1)  # then S's and V's: U(-2, 2), U(-.5, .5), U(-.1, .1)
        hsv.append([hue] + [rng.uniform(-r, r) for _ in "sv" for r in (2, 0.5, 0.1)])
    return torch.stack(views), torch.tensor(hsv)


def eval_view(img, rng, size, crops=1, crop="inception"):
    """The shorter side resized to size * 256 / 224, the central crop (crops=5: corners and centre,
    for --tta); crop="pad": the whole image at `size`, its 5 crops of it padded by size / 8."""
    if crop == "pad":
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
        img = TF.pad(img, [size // 8], padding_mode="reflect") if crops == 5 and size >= 8 else img
    else:
        img = TF.resize(img, round(size * 256 / 224), antialias=True)
    views = TF.five_crop(img, [size, size]) if crops == 5 else [TF.center_crop(img, [size, size])]
    return torch.stack(views), torch.zeros(len(views), 7)


def rgb_to_hsv(x):
    """[N, 3, H, W] in [0, 1] -> h, s, v, each [N, H, W] in [0, 1]."""
    r, g, b = x.unbind(1)
    v, m = x.amax(1), x.amin(1)
    d = v - m
    dd = d.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd))
    return torch.where(d > 0, h / 6 % 1, 0), torch.where(v > 0, d / v.clamp_min(1e-12), 0), v


def hsv_to_rgb(h, s, v):
    """colorsys's six sectors on tensors: h, s, v [N, H, W] -> [N, 3, H, W]."""
    i = torch.floor(h * 6)
    f, i = h * 6 - i, i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    pick = lambda *c: torch.stack(c, 1).gather(1, i[:, None]).squeeze(1)  # the sector's value
    return torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], 1)


def hsv_noise(x, p):
    """The authors' HSV noise on x [N, 3, H, W] in [0, 1] (p [N, 7], train_view's draws): hue +=
    U(-0.1, 0.1), wrapping; S and V each v ** 2^U(-2, 2) * 2^U(-0.5, 0.5) + U(-0.1, 0.1), clipped"""
    h, s, v = rgb_to_hsv(x)
    p = p[:, :, None, None]
    h = (h + p[:, 0]) % 1
    s = (s ** 2 ** p[:, 1] * 2 ** p[:, 2] + p[:, 3]).clamp(0, 1)
    v = (v ** 2 ** p[:, 4] * 2 ** p[:, 5] + p[:, 6]).clamp(0, 1)
    return hsv_to_rgb(h, s, v)


def to_input(x, hsv, device, args, color=False):
    """uint8 views [B, V, 3, S, S] -> [B*V, 3, S, S] in [-1, 1] on the device (the authors' x /
    127.5 - 1), image-major: rows V*i .. V*i+V-1 are image i's. `color`: the HSV noise, there."""
    x = x.to(device, non_blocking=True).flatten(0, 1).float()
    if color:
        x = hsv_noise(x / 255, hsv.to(device, non_blocking=True).flatten(0, 1)) * 255
    x = x / 127.5 - 1
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


# ---- samplers and loaders ----
class Images(torch.utils.data.Dataset):
    """(index, seed) -> (views uint8 [V, 3, S, S], hsv [V, 7], label, index), one decode each. With
    --skip-bad-images, the next image of `pool` (its own subset) instead, or none: index -1."""

    def __init__(self, files, labels, view, skipped=None, pool=None):
        # one array, not a list of str: workers read it without copying its pages (README, Memory)
        self.files = np.array([os.fsencode(f) for f in files])
        self.labels, self.view, self.skipped, self.pool = labels, view, skipped, pool

    def __getitem__(self, item):
        i, seed = item
        for _ in range(1 if self.pool is None else len(self.pool)):
            try:
                img = read_image(os.fsdecode(self.files[i]))
                break
            except UserError as e:
                if self.skipped is None:
                    raise
                with open(self.skipped, "a") as f:
                    f.write(f"{os.fsdecode(self.files[i])}\t{e}\n")  # the file, why
                if self.pool is None:
                    i, img = -1, torch.zeros(3, 1, 1, dtype=torch.uint8)
                    break
                i = int(self.pool[(np.searchsorted(self.pool, i) + 1) % len(self.pool)])
        else:
            raise UserError(f"no image of a {len(self.pool)}-image training subset is readable "
                            f"(see {self.skipped})")
        x, hsv = self.view(img, random.Random(seed))
        return x, hsv, int(self.labels[i]) if i >= 0 else -1, i


class EpochBatches:
    """One epoch over `indices`: global batch s is perm[s*B:(s+1)*B] of a permutation drawn from
    (seed, stream, epoch), `steps` batches, this process's 1/world of each, from batch `start`."""

    def __init__(self, indices, batch, seed, rank, world, stream=0):
        if len(indices) < batch:
            raise UserError(f"{len(indices)} training images are fewer than one batch "
                            f"(--batch-size {batch})")
        self.indices, self.batch, self.seed, self.stream = np.asarray(indices), batch, seed, stream
        self.steps = len(self.indices) // batch
        self.lo, self.b, self.epoch, self.start = rank * (batch // world), batch // world, 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.stream, self.epoch])
        perm = rng.permutation(len(self.indices))
        for s in range(self.start, self.steps):
            first = s * self.batch + self.lo  # this process's first position in global batch s
            yield [(int(self.indices[perm[p]]), f"{self.seed}-{self.stream}-{self.epoch}-{p}")
                   for p in range(first, first + self.b)]


class StreamBatches(EpochBatches):
    """The endless stream: global batch s is [s*B, (s+1)*B) of a new permutation per cycle."""

    def __len__(self):
        return sys.maxsize

    def __iter__(self):
        n, perms = len(self.indices), {}
        for s in range(self.start, sys.maxsize):
            items = []
            for p in range(s * self.batch + self.lo, s * self.batch + self.lo + self.b):
                cycle = p // n
                if cycle not in perms:  # only the current cycle's permutation is kept
                    rng = np.random.default_rng([self.seed, self.stream, cycle])
                    perms = {cycle: rng.permutation(n)}
                i = self.indices[perms[cycle][p % n]]
                items.append((int(i), f"{self.seed}-{self.stream}-{p}"))
            yield items


def loader(files, labels, view, batches, args, device, persistent=True):
    """A DataLoader of Images over a sampler's batches (or a list of batches: evaluation)."""
    skipped = os.path.join(args.out, "skipped.txt") if args.skip_bad_images else None
    pool = np.sort(batches.indices) if hasattr(batches, "indices") else None
    workers = args.workers > 0
    return torch.utils.data.DataLoader(
        Images(files, labels, view, skipped, pool), batch_sampler=batches, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=persistent and workers,
        worker_init_fn=_worker_init, prefetch_factor=4 if workers else None)


def eval_loader(files, labels, index, args, rank, world, device, crops=1, persistent=True):
    """Central crops (or 5 crops) of this rank's share of files[index]: each image once in all."""
    mine, b = index[rank::world], max(1, args.batch_size // world)
    batches = [[(int(i), "") for i in mine[s:s + b]] for s in range(0, len(mine), b)]
    view = functools.partial(eval_view, size=args.img_size, crops=crops, crop=args.crop)
    return loader(files, labels, view, batches, args, device, persistent)


def unlabeled_batches(d, indices, view, args, rank, world, device, start):
    """x_u: batches of d.files[indices], one per step from step `start` (views, hsv, _, indices)."""
    stream = StreamBatches(indices, args.batch_size, args.seed, rank, world, stream=1)
    stream.start = start
    return iter(loader(d.files, d.labels, view, stream, args, device))


# ---- evaluation ----
@torch.no_grad()
def evaluate(model, loader, d, args, device, world, predict=None):
    """Top-1 and top-5 (%, top-5 for over 5 classes) of each (logits, targets) that predict(x, y)
    returns, by name (default {"": the class head's}), on the validation split (each image once over
    the ranks) and each --val-subsets subset ("top1@1000"); rows may be several views of each image,
    view-major (4 rotations): each counts. Stops are polled per batch."""
    predict = predict or (lambda x, y: {"": (model(x), y)})
    sets = [d.val_index, *d.subsets.values()]  # the split, then each subset
    member = torch.zeros(len(d.val_files), len(sets), dtype=torch.bool)
    for j, idx in enumerate(sets):
        member[torch.as_tensor(idx), j] = True
    counts, ways, was_training = {}, {}, model.training  # by name: [sets, 3] counts; classes
    model.eval()
    for b in model.buffers() if world > 1 else ():  # rank 0's BN statistics: the model it saves
        dist.broadcast(b, 0)
    together = agree(len(loader), dist.ReduceOp.MIN)  # batches every rank has: stops agreed at each
    for i, (x, hsv, y, idx) in enumerate(loader):
        if i < together and (sig := agree(_state.signal or 0)):  # any rank's stop signal
            raise Stopped(sig)
        kept = (member[idx.clamp_min(0)] & (idx >= 0)[:, None]).to(device)  # [B, sets]; -1: out
        with autocast(args, device):
            outs = predict(to_input(x, hsv, device, args), y.to(device, non_blocking=True))
        for name, (logits, target) in outs.items():
            top = logits.float().topk(min(5, logits.shape[1]), 1).indices == target.view(-1, 1)
            hits = torch.stack([top[:, 0], top.any(1), torch.ones_like(top[:, 0])], 1)  # [V*B, 3]
            rows = kept.repeat(len(logits) // len(kept), 1)  # [V*B, sets]: row r shows image r % B
            c = (rows[:, :, None] & hits[:, None, :]).sum(0)  # [sets, 3]: each set's counts
            counts[name] = counts.get(name, 0) + c
            ways[name] = logits.shape[1]
    model.train(was_training)
    if world > 1:  # a rank with no images (a set smaller than the world) joins every reduction
        everyone = [None] * world
        dist.all_gather_object(everyone, ways)
        ways = {n: k for w in everyone for n, k in w.items()}
    out = {}
    for name in sorted(ways):
        c = counts.get(name, torch.zeros(len(sets), 3, dtype=torch.int64, device=device))
        if world > 1:
            dist.all_reduce(c)
        for j, tag in enumerate([""] + [f"@{n}" for n in d.subsets]):
            top1, top5, n = c[j].tolist()
            out[f"{name}top1{tag}"] = 100 * top1 / max(n, 1)
            if ways[name] > 5:
                out[f"{name}top5{tag}"] = 100 * top5 / max(n, 1)
    return out


# ==================================================================== Part 2: plumbing ====

# ---- the command line ----
def number(kind, lo, hi=math.inf, strict=False, count=None):
    """An argparse type: a finite `kind` >= lo (> lo if strict) and <= hi; with `count`, a list of
    them, comma-separated (0: any length). A flag > 0: type=common.number(float, 0, strict=True)."""
    bound = f" > {lo:g}" if strict else f" >= {lo:g}" if hi == math.inf else f" in [{lo:g}, {hi:g}]"
    what = ("an integer" if kind is int else "a number") + bound

    def one(s):
        try:
            v = kind(s)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and (v > lo if strict else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}")
        return v

    def many(s):
        v = [one(x.strip()) for x in s.split(",") if x.strip()]
        if count and len(v) != count:
            raise argparse.ArgumentTypeError(f"{s!r} is not {count} values, each {what}")
        return v
    return one if count is None else many


def parser(doc):
    """The flags every script shares, each checked where parsed; the recipe's: see finish_args."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=doc, formatter_class=fmt)
    p.error = lambda message: sys.exit(f"error: {message} (see {p.prog} --help)")  # one line
    a = p.add_argument
    a("--data", default=os.environ.get("IMAGENET_DIR", "data/imagenet"),
      help="ImageFolder root (train/<class>/*, val/<class>/*) or 'synthetic'; $IMAGENET_DIR")
    a("--labels", type=number(float, 0, 100), default=10, help="percent of labels kept")
    a("--split-file", help="the labeled subset: image names, one per line, or {'values': [...]}")
    a("--val-split", choices=["public", "custom"], default="public", help="custom: a hold-out")
    a("--val-size", type=number(int, 1), help="the hold-out (default: 50046; 5000 at 1%%)")
    a("--val-subsets", type=number(int, 1, count=0), default=[], help="e.g. 1000,5000 (Section 7)")
    a("--epochs", type=number(int, 0))
    a("--batch-size", type=number(int, 1), help="GLOBAL batch size, split over the processes")
    a("--lr", type=number(float, 0, strict=True))
    a("--wd", type=number(float, 0))
    a("--warmup", type=number(float, 0), help="epochs of linear learning-rate warm-up from 0")
    a("--decay-epochs", type=number(float, 0, count=0), help="epochs of x0.1, e.g. 140,160,180")
    a("--seed", type=number(int, 0), default=0)
    a("--split-seed", type=number(int, 0), help="the splits' seed (default: --seed)")
    a("--workers", type=number(int, 0), default=8, help="data-loading processes per loader")
    a("--img-size", type=number(int, 1), default=224)
    a("--arch", choices=ARCHS, default="resnet50", help="ResNet-v2 (pre-activation) depth")
    a("--width", type=number(float, 0, strict=True), default=1.0, help="channel multiplier")
    a("--out", help="output folder (default: runs/<script>-labels<P>); re-running resumes")
    a("--amp", choices=["bf16", "fp16", "none"], help="autocast (default: bf16 on CUDA)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    a("--compile", action="store_true", help="torch.compile the model")
    a("--color", action=argparse.BooleanOptionalAction, help="HSV colour noise (the recipe's)")
    a("--eval-every", type=number(int, 1), help="evaluate every N epochs and after the last")
    a("--log-every", type=number(int, 1), default=50, help="steps between progress lines")
    a("--save-every", type=number(float, 0, strict=True), default=30, help="minutes between saves")
    a("--skip-bad-images", action="store_true", help="leave unreadable images out (skipped.txt)")
    a("--synthetic", type=number(int, 1, count=3), default=[10, 100, 48],
      help="--data synthetic: CLASSES,TRAIN_IMAGES_PER_CLASS,PIXELS (val: a fifth as many)")
    a("--deterministic", action="store_true", help="deterministic kernels")
    small = p.add_argument_group("small images (README); the defaults: ImageNet's").add_argument
    small("--stem", choices=["imagenet", "cifar"], default="imagenet", help="cifar: one 3x3/1 conv")
    small("--crop", choices=["inception", "pad"], default="inception", help="pad: CIFAR's")
    small("--schedule", choices=["step", "cosine"], default="step", help="cosine: to 0 at the end")
    small("--normalize", action="store_true", help="by the training images' channel mean and std")
    small("--zero-init-last", action="store_true", help="each residual branch's last conv at 0")
    return p


def finish_args(args, recipes):
    """The recipe's flags from RECIPES (the nearest --labels on a log scale), and the checks that
    need no data. The script's file name is the method: its checkpoints' stamp, its --out."""
    args.method = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    if args.labels == 0 and 0 not in recipes:
        raise UserError(f"{args.method}.py needs labels: --labels 0 is not one of its recipes")
    near = lambda k: abs(math.log(k / args.labels))
    args.recipe = key = 0 if args.labels == 0 else min((k for k in recipes if k > 0), key=near)
    for k, v in recipes[key].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k, v in recipes[key].items():  # entries that depend on others, e.g. lr 0.1 x batch / 256
        if callable(getattr(args, k)):
            setattr(args, k, v(args))
    args.val_size = args.val_size or (5000 if key == 1 else 50046)
    args.split_seed = args.seed if args.split_seed is None else args.split_seed
    args.out = args.out or os.path.join("runs", f"{args.method}-labels{args.labels:g}")
    args.amp = args.amp or ("bf16" if torch.cuda.is_available() else "none")
    args.eval_every = args.eval_every or 1
    if args.batch_size % (world := int(os.environ.get("WORLD_SIZE", 1))):
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes "
                        "(the global batch is split evenly over them)")
    return args


# ---- processes and devices ----
FLAGS = None  # a CPU (gloo) group for the ranks' agreements (stop, save), whatever the backend


def setup(args):
    """(rank, world, device) from torchrun's environment, or one process; rank 0 holds --out."""
    global FLAGS
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:  # torchrun's store: the process group's, and where a failing rank leaves word
        _state.store = next(dist.rendezvous("env://"))[0]
        store = dist.PrefixStore("pg", _state.store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank,
                                world_size=world, device_id=device if cuda else None)
        FLAGS = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    if rank == 0:
        hold(args.out)
    torch.use_deterministic_algorithms(args.deterministic)
    torch.manual_seed(args.seed)
    return rank, world, device


def step_generator(seed, step, device, stream=0):
    """One step's generator on the device, from (seed, stream, step) alone (README: per image)."""
    state = np.random.SeedSequence([seed, stream, step]).generate_state(1)[0]
    return torch.Generator(device).manual_seed(int(state))


def autocast(args, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def ddp(model, args, device, world):
    """DDP over `model` (compiled in place with --compile, keeping its keys), or `model` alone."""
    if args.compile:
        model.compile()
    if world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def agree(value, op=dist.ReduceOp.MAX):
    """An int every rank agrees on (the MAX, or MIN, of their values), over the CPU group FLAGS."""
    if FLAGS is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op, group=FLAGS)
    return int(t)


# ---- image files ----
IMAGE_EXT = tuple(".jpg .jpeg .jfif .png .bmp .webp .gif .tif .tiff .ppm .pgm .pbm .pnm".split())
MAX_PIXELS = 89_478_485  # larger images are refused, whatever the format (PIL's bomb threshold)
Image.MAX_IMAGE_PIXELS = None  # PIL's own check, at twice that and for some formats, gives way


def scan(folder, what):
    """(classes, files, labels) of folder/<class>/**/<image>; names starting with '.' aren't data"""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder ({what} needs <class>/<image> sub-folders)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name[0] != ".")
    files, labels = [], []
    for c, name in enumerate(classes):
        found = []
        for root, dirs, names in os.walk(os.path.join(folder, name), followlinks=True):
            dirs[:] = [d for d in dirs if d[0] != "."]
            found += [(root, f) for f in names if f[0] != "." and f.lower().endswith(IMAGE_EXT)]
        if not found:
            raise UserError(f"{os.path.join(folder, name)}: a class folder with no images: remove "
                            f"it or add its images (every folder of {what} is a class)")
        files += [os.path.join(root, f) for root, f in sorted(found)]
        labels += [c] * len(found)
    if not files:
        raise UserError(f"{folder}: no images in <class>/ folders ({what}<class>/<image>.jpg)")
    return classes, files, np.array(labels)


def read_image(path):
    """What an image file becomes: uint8 [3, H, W] RGB whatever it holds (8 or 16 bits, float,
    palette, alpha, CMYK, frames: the first), or a UserError naming it. No EXIF rotation."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        w, h = Image.open(io.BytesIO(data)).size  # the header alone: a bomb is never decoded
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w} x {h} pixels, over common.MAX_PIXELS = {MAX_PIXELS:,}")
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), "RGB")
        except (RuntimeError, ValueError, TypeError):  # BMP, TIFF, PPM, 16-bit, CMYK, ...
            im = Image.open(io.BytesIO(data))
            im.seek(0)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # convert("RGB") would clip
                a = np.asarray(im, dtype=np.float64)
                a = a * 255 if im.mode == "F" else a // 256
                im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
            img = TF.pil_to_tensor(im.convert("RGB"))
        img = img[0] if img.ndim == 4 else img  # an animation: its first frame
        if img.dtype == torch.uint16:  # a 16-bit PNG: its 8 high bits
            img = (img.to(torch.int32) >> 8).to(torch.uint8)
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and min(img.shape) > 0, img.shape
        return img.contiguous()
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {str(e).strip()[:80]}); "
                        "remove it, or pass --skip-bad-images") from None


def read_split_file(args, files, train_dir, held):
    """Indices of the images --split-file lists (one a line, or the authors' {"values": [...]}): an
    entry names an image when one's path ends the other's (x.JPEG, n01/x.JPEG, /d/train/n01/x.JPEG);
    none of the hold-out; --labels (the recipe) within a factor 2 of their share."""
    path = args.split_file
    if not os.path.isfile(path):
        raise UserError(f"--split-file {path}: no such file")
    text = open(path, encoding="utf-8", errors="replace").read()
    try:  # the authors' JSON, or one per line
        listed = json.loads(text)["values"] if text.lstrip().startswith("{") else text.splitlines()
        assert isinstance(listed, list) and all(isinstance(n, str) for n in listed)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise UserError(f"--split-file {path}: not the authors' JSON format, names under "
                        f"\"values\" ({type(e).__name__}: {str(e)[:80]})") from None
    parts = [n.strip().replace("\\", "/").split("/") for n in listed]  # Windows separators too
    entries = sorted({"/".join(c for c in p if c not in ("", ".")) for p in parts} - {""})
    if not entries:
        raise UserError(f"--split-file {path}: lists no images")
    by_name = {}  # an image's file name -> (index, its path below train/)
    for i, f in enumerate(files):
        rel = f[len(train_dir) + 1:].replace(os.sep, "/")
        by_name.setdefault(rel.split("/")[-1], []).append((i, rel))
    ends = lambda a, b: ("/" + a).endswith("/" + b)
    chosen, missing = set(), []
    for e in entries:
        found = [(i, r) for i, r in by_name.get(e.split("/")[-1], []) if ends(r, e) or ends(e, r)]
        if len(found) > 1:
            raise UserError(f"--split-file {path}: '{e}' names {len(found)} images: list it with "
                            f"its class folder, e.g. {found[0][1]}")
        chosen.update(i for i, _ in found)
        if not found:
            missing.append(e)
    percent = 100 * len(chosen) / len(files)
    if missing:
        raise UserError(f"--split-file {path}: {len(missing)} of its {len(entries)} entries are "
                        f"not images under {train_dir}, e.g. {missing[0]}")
    if chosen & set(held.tolist()):
        raise UserError(f"--split-file {path} lists images of the hold-out (--val-split custom)")
    if args.labels == 0 or abs(math.log(percent / args.labels)) > math.log(2):
        raise UserError(f"--split-file {path} lists {len(chosen)} of the {len(files)} training "
                        f"images ({percent:.3g}%), but --labels is {args.labels:g}: pass --labels "
                        f"{percent:.2g} (--labels picks the recipe)")
    return np.array(sorted(chosen), dtype=np.int64)


def make_synthetic(root, classes, per_class, size):
    """--data synthetic: a deterministic ImageFolder tree of JPEGs. Class c: a shape (c % 5) in a
    colour (c // 5); a light sky above a dark ground gives every image an 'up' to learn."""
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
                colour = 255 * np.array([math.cos(2 * math.pi * (hues[c // 5] + k / 3)) * 0.45 + 0.5
                                         for k in range(3)])
                for i in range(n):
                    horizon, (cx, cy) = rng.uniform(0.45, 0.7), rng.uniform(0.3, 0.7, 2)
                    r, dark = rng.uniform(0.18, 0.3), rng.uniform(0.7, 1.1)
                    img = np.where((y < horizon)[..., None], [150, 190, 240], [70, 60, 30]) * dark
                    img = img + (y[..., None] * 60 if rng.random() < 0.5 else 0)
                    dx, dy = x - cx, y - cy
                    img[[dx ** 2 + dy ** 2 < r ** 2,  # a disc
                         np.maximum(abs(dx), abs(dy)) < r * 0.8,  # a square
                         (dy > -r) & (dy < r * 0.7) & (abs(dx) < (dy + r) / 2),  # a triangle, up
                         (abs(dy) < r / 3) & (abs(dx) < r),  # a bar
                         (abs(dx) < r / 4) & (dy > -r) & (dy < r) | (abs(dy + r * 0.8) < r / 4)
                         & (abs(dx) < r)][c % 5]] = colour * rng.uniform(0.8, 1.2)  # a "T"
                    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
                    chw = torch.from_numpy(img.transpose(2, 0, 1).copy())
                    write_jpeg(chw, f"{tmp}/{split}/c{c:03d}/{i:05d}.jpg", quality=90)
        with contextlib.suppress(OSError):  # another process (another node) made it first
            os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---- checkpoints and what defines their data ----
def save_atomic(obj, path):
    """A temporary file, synced, renamed: a crash or a full disk leaves the previous file intact."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip()[:80]
        raise UserError(f"cannot write {path} ({why}); the previous one is intact") from None


def load_checkpoint(path):
    """A checkpoint: a plain dict with at least "model" and "args", read with weights_only=True."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and "model" in ckpt and "args" in ckpt
        return ckpt
    except Exception as e:
        raise UserError(f"{path} is not a readable s4l checkpoint ({type(e).__name__}: truncated, "
                        "or not s4l's); move it away, or pass another --out or --ckpt") from None


# What defines a run's data and network, in every checkpoint: the split's flags (a difference is
# named by its flag), views, network, class names, the split's images (count, digest of paths).
DATA = ["labels", "split_seed", "split_file", "val_split", "val_size", "img_size", "crop", "stem",
        "normalize", "arch", "width", "classes", "labeled", "held_out"]


def data_record(args, classes, labeled, held):
    """The values of DATA for this run: `labeled` and `held` are the paths of their images."""
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:12]
    record = {k: getattr(args, k) for k in DATA[:11]}
    record["labels"] = f"{args.labels:g}"  # 10 whether it came as 10 or 10.0
    record["split_file"] = digest(open(args.split_file).read()) if args.split_file else None
    record["val_size"] = args.val_size if args.val_split == "custom" else None
    images = lambda paths: f"{len(paths)} images {digest(''.join(paths))}"
    return dict(record, classes=list(classes), labeled=images(labeled), held_out=images(held))


def check_data(ckpt, path, record, keys, fix):
    """The one place where a reader of a checkpoint (resume, --teacher, --init, MOAM's steps,
    --ckpt) checks its record's `keys` against this run's: a difference is one line, then `fix`."""
    theirs = ckpt.get("data")
    if theirs is None:
        raise UserError(f"{path} records no data (an older s4l's): {fix}")
    for k in keys:
        was, now = theirs.get(k), record[k]
        name = {"split_file": "a --split-file", "labeled": "a labeled subset of",
                "held_out": "a hold-out of"}.get(k, f"--{k.replace('_', '-')}")
        if k == "classes" and was != now:  # the first class that differs
            c = next(c for c in range(max(len(was), len(now))) if was[c:c + 1] != now[c:c + 1])
            name, was, now = f"class {c}", was[c:c + 1], now[c:c + 1]
        if was != now:
            raise UserError(f"{path} was made with {name} {was}, this run has {now}: {fix}")


# ---- the run folder ----
def hold(folder):
    """Rank 0 locks OUT/hold while it runs (the system unlocks it however the process ends): a
    second run into it is refused; another host's (a dead node's lease?) waited for, 3 min."""
    path = os.path.join(folder, "hold")
    if path in [f.name for f in _state.held]:  # MOAM's steps call it for each folder
        return
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(path, "a+")  # a POSIX lock: this process's alone (its DataLoader workers not)
        for wait in range(37):
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (BlockingIOError, PermissionError):
                f.seek(0)
                other = f.read().strip()
                if wait == 36 or other.endswith(f" on {socket.gethostname()}"):
                    raise UserError(f"--out {folder} is in use by {other}: let it end, or pass "
                                    "another --out") from None
                time.sleep(5)
        f.truncate(0)  # who holds it, for a run refused (through this file: closing would unlock)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        if os.path.exists(os.path.join(folder, "stopped")):  # the marker of the last stop
            os.remove(os.path.join(folder, "stopped"))
    except OSError as e:
        raise UserError(f"cannot write to --out {folder} ({e.strerror}): pass another") from None
    _state.held.append(f)


# Flags that may differ on a resume (each tested); any other difference is another experiment.
MAY_CHANGE = {"epochs", "workers", "out", "data", "compile", "eval_every", "log_every", "amp",
              "save_every", "val_subsets", "skip_bad_images", "deterministic", "channels_last"}
NEVER = 2 ** 62  # the "first non-finite step" of a loss that has been finite so far


class Run:
    """A run's folder: args.json, metrics.jsonl, last.pt (the same command resumes from it) and
    final.pt, stamped with the method (the script's name), args and `data` (load_data's record). A
    stop signal on any rank stops all at the same step (last.pt saved); non-finite: unsaved."""

    def __init__(self, args, model, opt, scaler, train, data, rank, world, device, extra=None):
        self.args, self.model, self.opt, self.scaler, self.train = args, model, opt, scaler, train
        self.data, self.rank, self.world, self.device = data, rank, world, device
        self.extra, self.spe, self.main = extra or {}, train.batch_sampler.steps, rank == 0
        self.path, self.out = os.path.join(args.out, "last.pt"), args.out
        self.names, self.sums, self.first_bad = [], None, None  # each loss: its sum, first bad step
        self.step = self.saved_step = self.images = 0
        self.bar, self.saved_at, self.in_flight = None, time.time(), None
        _state.deferred = True  # from here on a signal is polled for: the run saves, then stops

    def resume(self):
        """Restore last.pt if --out has one; the step to go on from (self.epoch: the next epoch)."""
        if os.path.exists(self.path):
            self.load(load_checkpoint(self.path))
        done = self.step // self.spe  # epochs whose steps are all done
        at_epoch_end = self.step > 0 and self.step % self.spe == 0
        metrics = os.path.join(self.out, "metrics.jsonl")
        lines = open(metrics).read().splitlines() if self.main and os.path.exists(metrics) else []
        rows = [json.loads(r) for r in lines if r.endswith("}")]  # a line cut by a crash goes
        # Rule 1: a run stopped in an epoch's evaluation (its steps done, its row missing) runs
        # that epoch again with no step left: only the evaluation is redone.
        row_missing = at_epoch_end and done not in {r.get("epoch") for r in rows}
        self.epoch = done - agree(int(self.main and row_missing))
        # Rule 2: the loss sums saved at an epoch's end are in its row already: start from zero.
        if at_epoch_end and self.epoch == done and self.sums is not None:
            self.sums.zero_()
        if self.main:
            self.start_folder(rows, done)
        return self.step

    def load(self, ck):
        """The state in last.pt, if it is this method's, with the same arguments and data."""
        if ck.get("method") != self.args.method:
            raise UserError(f"{self.path} is a {ck.get('method')} checkpoint, not "
                            f"{self.args.method}: pass another --out")
        was, now = ck["args"], vars(self.args)
        flags = [f"--{k.replace('_', '-')} {was.get(k)} (now {now.get(k)})" for k in
                 sorted(set(was) | set(now)) if k not in MAY_CHANGE and was.get(k) != now.get(k)]
        if flags:
            raise UserError(f"{self.path} was made with {', '.join(flags)}: re-run with the same "
                            "arguments to resume, or pass another --out")
        check_data(ck, self.path, self.data, DATA, "resume on the same data, or pass another --out")
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            for k, obj in self.extra.items():
                obj.load_state_dict(ck[k])
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"{self.path} does not fit this run's model ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:80]}): pass another --out") from None
        if ck["scaler"] and self.scaler.is_enabled():  # --amp may change: a new scaler then
            self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        self.step = self.saved_step = ck["step"]
        self.names, sums = ck["meter"]["names"], ck["meter"]["sums"]
        if self.names:
            if len(sums) != self.world:  # another number of processes: rank 0 takes all
                sums = [np.sum(sums, 0).tolist()] + [[0.0] * len(self.names)] * (self.world - 1)
            self.start_sums(sums[self.rank])

    def start_sums(self, values):
        self.sums = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.first_bad = torch.full((len(values),), NEVER, device=self.device)

    def start_folder(self, rows, done):
        """Rank 0: a shorter run's final.pt goes; no room for a checkpoint: refused; args.json."""
        if self.step:
            print(f"resumed {self.path} at step {self.step} (epoch {self.step / self.spe:.2f})")
        final = os.path.join(self.out, "final.pt")
        if self.step < self.args.epochs * self.spe and os.path.exists(final):
            os.remove(final)
            print(f"removed {final} of a shorter run: this one writes it at its end")
        need = 3 * sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        free = shutil.disk_usage(self.out).free  # last.pt: weights, momentum, averages (MOAM)
        if free < need:
            raise UserError(f"--out {self.out} has {free >> 20} MiB free, a checkpoint of this run "
                            f"takes about {need >> 20}: free some, or pass another --out")
        with open(os.path.join(self.out, "args.json"), "w") as f:
            json.dump(vars(self.args), f, indent=1)
        with open(os.path.join(self.out, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r.get("epoch", 0) <= done)

    def batches(self, epoch):
        """The epoch's labeled batches left (a bar on rank 0's terminal); an agreed stop ends it"""
        if sig := agree(_state.signal or 0):  # any rank's stop signal
            raise Stopped(sig)
        start = self.step - epoch * self.spe
        self.train.batch_sampler.set_epoch(epoch, start)
        self.t0 = self.t1 = time.time()
        if not (self.main and sys.stderr.isatty()):  # a log file: lines (show), not a bar
            return self.train
        desc = f"epoch {epoch + 1}/{self.args.epochs}"
        self.bar = _state.bar = tqdm(self.train, desc, self.spe, initial=start, leave=False)
        return self.bar

    def lr(self, step):
        """Set this step's learning rate (the schedule), and return it."""
        a = self.args
        lr = lr_at(step, self.spe, a.lr, a.warmup, a.decay_epochs, a.schedule, a.epochs)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def log(self, step, images, **losses):
        """Add the step's losses on the device (1/world each: sums that any world size gives)."""
        if self.sums is None:
            self.names = list(losses)
            self.start_sums([0.0] * len(losses))
        v = torch.stack([losses[k].detach().float() for k in self.names])
        self.sums += v.double() / self.world
        self.first_bad = torch.where(v.isfinite() | (self.first_bad < NEVER), self.first_bad, step)
        self.step, self.images, self.t1 = step + 1, self.images + images * self.world, time.time()
        if self.step % self.args.log_every == 0:
            self.check_finite()
            self.show()

    def show(self):
        """The epoch's mean losses, lr, images/s: on the bar, or a line where stderr is a file."""
        epoch, lr = (self.step - 1) // self.spe, self.opt.param_groups[0]["lr"]  # the last step's
        means = (self.sums * self.world / (self.step - epoch * self.spe)).tolist()
        shown = dict(lr=f"{lr:.4g}", **{k: f"{m:.3f}" for k, m in zip(self.names, means)},
                     img_s=f"{self.images / (time.time() - self.t0):.0f}")
        if self.bar is not None:
            self.bar.set_postfix(shown)
        elif self.main:
            where = f"epoch {epoch + 1}/{self.args.epochs} step {self.step - epoch * self.spe}"
            _end_line(f"{where}/{self.spe} " + " ".join(f"{k} {v}" for k, v in shown.items()))

    def save_or_stop(self):
        """Save last.pt every --save-every minutes, and on a stop signal, then stop: every rank at
        the same step, agreed by a CPU all-reduce started now and read a step later (none waits)."""
        due = self.main and time.time() - self.saved_at > self.args.save_every * 60
        flags = torch.tensor([_state.signal or 0, due], dtype=torch.int32)
        if self.world > 1:
            work = dist.all_reduce(flags, dist.ReduceOp.MAX, group=FLAGS, async_op=True)
            previous, self.in_flight = self.in_flight, (flags, work)
            if previous is None:
                return
            flags, work = previous  # the previous step's agreement: act on it now
            work.wait()
        signum, due = flags.tolist()
        if signum or due:
            self.show()
            self.save()
        if signum:
            self.drain()
            if self.main:
                _end_line(f"stopped at step {self.step}; {self.path} saved")
            raise Stopped(signum)

    def drain(self):
        """Wait for the agreement in flight: none may outlive the run (the process group ends)."""
        if self.in_flight is not None:
            self.in_flight[1].wait()
            self.in_flight = None

    def check_finite(self):
        """A non-finite loss on any rank stops every rank: one line; last.pt stays as it is."""
        bad = self.first_bad.cpu()
        if self.world > 1:
            dist.all_reduce(bad, dist.ReduceOp.MIN, group=FLAGS)
        if (bad < NEVER).any():
            self.stop_bad(self.names[int(bad.argmin())], int(bad.min()))

    def stop_bad(self, what, step):
        kept = f"{self.path} (step {self.saved_step})" if os.path.exists(self.path) else "none"
        raise UserError(f"non-finite {what} at step {step} (epoch {step // self.spe + 1}); "
                        f"stopped, the last good checkpoint is {kept}")

    def save(self):
        """last.pt: weights, optimizer, scaler, step, RNG, each rank's loss sums, extras (MOAM)."""
        self.check_finite()
        sums = [self.sums] if self.sums is not None else []
        if self.world > 1 and sums:
            sums = [torch.zeros_like(self.sums) for _ in range(self.world)]
            dist.all_gather(sums, self.sums)
        self.write(self.path, dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(),
                                   scaler=self.scaler.state_dict(), rng=torch.get_rng_state(),
                                   meter=dict(names=self.names, sums=[s.tolist() for s in sums]),
                                   **{k: obj.state_dict() for k, obj in self.extra.items()}))
        self.saved_at, self.saved_step = time.time(), self.step

    def write(self, path, state):
        """`state`, stamped, into `path` (rank 0) once every weight and buffer is seen finite."""
        floats = {k: t for k, t in state["model"].items() if t.is_floating_point()}
        finite = torch.stack([t.isfinite().all() for t in floats.values()]).tolist()
        bad = [k for k, ok in zip(floats, finite) if not ok]
        if agree(len(bad)):
            self.stop_bad(bad[0] if bad else "weights on another process", self.step - 1)
        if self.main:
            stamp = dict(method=self.args.method, args=vars(self.args), step=self.step)
            save_atomic({**stamp, "data": self.data, **state}, path)

    def end_epoch(self, epoch, evaluate):
        """last.pt, evaluate() when due (a failure loses no training), then the epoch's row."""
        self.save()
        due = (epoch + 1) % self.args.eval_every == 0 or epoch + 1 == self.args.epochs
        evals = evaluate() if due else {}
        sums = self.sums.clone() if self.sums is not None else torch.zeros(0, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        row = {"epoch": epoch + 1, "step": self.step, "lr": self.opt.param_groups[0]["lr"],
               **{k: v / self.spe for k, v in zip(self.names, sums.tolist())}, **evals,
               "images_per_s": round(self.images / max(self.t1 - self.t0, 1e-9), 1)}
        skipped = os.path.join(self.out, "skipped.txt")
        if self.args.skip_bad_images and os.path.exists(skipped):
            row["skipped_images"] = len({n.split("\t")[0] for n in open(skipped) if n.strip()})
            if self.main:
                print(f"skipped {row['skipped_images']} unreadable images, listed in {skipped}")
        if self.main:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            print(json.dumps({k: round(v, 4) if type(v) is float else v for k, v in row.items()}))
        if self.sums is not None:
            self.sums.zero_()
        self.images = 0
        return row

    def finish(self, state_dict=None):
        """final.pt, once every rank holds the same weights; a signal received by now stops here."""
        self.drain()
        total = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum()
        bits = int(total.view(torch.int64))  # the same weights: the same bits on every rank
        if agree(bits) != agree(bits, dist.ReduceOp.MIN):
            raise UserError(f"the {self.world} processes ended with different weights: a bug")
        self.write(f"{self.out}/final.pt", dict(model=state_dict or self.model.state_dict()))
        if self.world > 1:  # the next step (MOAM) or script may read it on any rank
            dist.barrier()
        sig = agree(_state.signal or 0)  # any rank's stop signal
        _state.deferred = False  # nothing more to save: a signal from here on ends the program
        if sig:
            raise Stopped(sig)


# ---- stop signals and errors ----
class UserError(Exception):
    """A mistake in the command line, the data or the output folder: one line, no traceback."""


class Stopped(BaseException):
    """A stop signal, raised once nothing is left to save (no `except Exception` eats it)."""


# Preemption (SLURM: SIGTERM to every process, or --signal=USR1), Ctrl-C, a closed terminal: they
# end the program at once until a Run exists, which then stops every rank at the same point, saved.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_state = argparse.Namespace(signal=None, deferred=False, bar=None, held=[], store=None)


def _on_signal(signum, frame):
    _state.signal = signum
    if not _state.deferred:
        raise Stopped(signum)


def _worker_init(_):
    """DataLoader workers ignore stop signals, in a process group of their own; we end them."""
    os.setpgrp()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@atexit.register  # before multiprocessing's own exit handler, which would SIGTERM them and wait
def _end_workers():
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call it a worker failure
    for p in multiprocessing.active_children():
        p.kill()


def main_guard(main):
    """main() as a command: a UserError one line, exit 1; a stop signal one line, 128 + signal."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # `nohup` and background jobs keep theirs
            signal.signal(s, _on_signal)
    code = 0
    try:
        main()
    except (Exception, Stopped) as e:
        _state.deferred = True  # a second signal no longer interrupts the exit
        code = _exit_code(e)
    finally:
        for f in _state.held:  # the folders' holds end with the process (and earlier: here)
            f.close()
        gc.collect()  # DDP's hooks make cycles: free the process group while Python is whole
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


def _exit_code(e):
    """The one line that ends a run, by the first rank to fail (the rest end quietly); the code."""
    if isinstance(e, UserError):  # a DataLoader worker's arrives with its traceback: the last line
        line = "error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1]
        if not _peer_failed(tell=True):
            _end_line(line)
            if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # the report's "root cause"
                with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                    json.dump({"message": line, "timestamp": int(time.time())}, f)
        return 1
    signum = e.args[0] if isinstance(e, Stopped) else _state.signal
    if _peer_failed():
        return 1
    if not signum:  # a bug (after a signal, a peer's exit may break a collective: not a bug)
        raise e
    if int(os.environ.get("RANK", 0)) == 0:
        _end_line(f"stopped by {signal.Signals(signum).name}: re-run the same command to continue")
        if _state.held:  # the marker a scheduler requeues on (README, "SLURM")
            with open(os.path.join(os.path.dirname(_state.held[-1].name), "stopped"), "w") as f:
                f.write(f"{signal.Signals(signum).name}\n")
    return 128 + signum


def _end_line(text):
    """`text` on stderr, on a line of its own (after the progress bar, which it closes)."""
    if _state.bar is not None:
        _state.bar.close()
    print(text, file=sys.stderr, flush=True)


def _peer_failed(tell=False):
    """Whether another rank failed first, by torchrun's store (tell=True: this rank fails too)."""
    try:
        return _state.store is not None and _state.store.add("s4l_errors", int(tell)) > int(tell)
    except Exception:  # the store has gone with its host
        return False
