"""common.py against independent references: published parameter counts, the pre-activation block
written out by hand, hand-computed schedule values, exact split sizes at ILSVRC-2012 scale, brute-force
coverage of the samplers, and a brute-force top-1/top-5 count."""
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, distributed
import common


# ---------------------------------------------------------------- model ----
@pytest.mark.parametrize("depth,count", [(50, 25_549_352), (18, 11_687_720)])
def test_parameter_counts(depth, count):
    """The counts SPEC/the issue give (timm's resnetv2_50 has the same 25,549,352)."""
    assert sum(p.numel() for p in common.ResNetV2(depth, 1, 1000).parameters()) == count


def test_shapes_heads_and_features():
    """model(x) == fc(forward_features(x)); heads=(...) returns one output per named head."""
    torch.manual_seed(0)
    m = common.ResNetV2(18, 0.25, 7).eval()
    m.rot = nn.Linear(m.num_features, 4)
    x = torch.randn(3, 3, 32, 32)
    h = m.forward_features(x)
    assert h.shape == (3, m.num_features) == (3, 128)
    assert torch.allclose(m(x), m.fc(h)) and m(x).shape == (3, 7)
    logits, rot = m(x, heads=("fc", "rot"))
    assert torch.allclose(logits, m.fc(h)) and torch.allclose(rot, m.rot(h))
    assert common.ResNetV2(50, 1, 10).num_features == 2048 and common.ResNetV2(50, 4, 10).num_features == 8192


def test_width_multiplies_every_channel_count():
    w1, w2 = common.ResNetV2(50, 1, 10), common.ResNetV2(50, 2, 10)
    convs = lambda m: [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    for a, b in zip(convs(w1), convs(w2)):
        assert b.out_channels == 2 * a.out_channels
        assert b.in_channels == (3 if a.in_channels == 3 else 2 * a.in_channels)


def test_blocks_are_pre_activation():
    """Each unit, written out by hand from He et al. 2016 ("Identity Mappings"): BN-ReLU before every
    conv, the projection shortcut on the pre-activated input, no ReLU after the addition."""
    torch.manual_seed(0)
    m = common.ResNetV2(50, 0.25, 10).train()
    for blk in [m.blocks[0], m.blocks[3], m.blocks[4]]:  # projection (stride 1), projection (stride 2), identity
        x = torch.randn(4, blk.bns[0].num_features, 16, 16)
        a = F.relu(blk.bns[0](x))
        shortcut = blk.proj(a) if blk.proj is not None else x
        out = blk.convs[0](a)
        out = blk.convs[1](F.relu(blk.bns[1](out)))
        out = blk.convs[2](F.relu(blk.bns[2](out)))
        assert torch.allclose(blk(x), out + shortcut, atol=1e-5)
        assert (blk(x) < 0).any()  # nothing rectifies the sum
    assert [type(c).__name__ for c in m.stem] == ["Conv2d", "MaxPool2d"]  # no BN/ReLU before the first unit
    assert m.blocks[3].convs[1].stride == (2, 2) and m.blocks[3].proj.stride == (2, 2)


NET = dict(arch="resnet18", width=0.25, stem="imagenet")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])  # basic and bottleneck blocks
def test_zero_init_last_starts_every_block_as_its_shortcut(arch):
    """--zero-init-last: each residual branch's last conv is zero, nothing else changes; so every block
    returns its shortcut (x, or the projection of BN-ReLU(x)) at the start."""
    torch.manual_seed(0)
    plain = common.resnet({**NET, "arch": arch}, 10)
    torch.manual_seed(0)
    zero = common.resnet({**NET, "arch": arch, "zero_init_last": True}, 10)
    last = {f"blocks.{i}.convs.{len(b.convs) - 1}.weight" for i, b in enumerate(zero.blocks)}
    for (k, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert (b.abs().sum() == 0 and a.abs().sum() > 0) if k in last else torch.equal(a, b), k
    for blk in zero.blocks:
        x = torch.randn(2, blk.bns[0].num_features, 8, 8)
        shortcut = x if blk.proj is None else blk.proj(F.relu(blk.bns[0](x)))
        assert torch.allclose(blk(x), shortcut, atol=1e-6)


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_normalize_standardises_each_input_channel(stem):
    """--normalize: the network's first layer is (x - mean) / sqrt(var + 1e-5) per channel, with the batch's
    statistics in training and their running averages (momentum 0.1, unbiased variance) at evaluation."""
    model = common.resnet({**NET, "stem": stem, "normalize": True}, 10)
    first = model.stem[0]
    assert isinstance(first, nn.BatchNorm2d) and not first.affine and first.num_features == 3
    assert type(model.stem[1]).__name__ == "Conv2d"
    x = torch.randn(8, 3, 16, 16) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1) + torch.tensor([3.0, -1, 0.5]).view(1, 3, 1, 1)
    mean, var = x.mean((0, 2, 3)).view(1, 3, 1, 1), x.var((0, 2, 3), unbiased=False).view(1, 3, 1, 1)
    assert torch.allclose(first(x), (x - mean) / (var + 1e-5).sqrt(), atol=1e-5)
    for _ in range(200):  # the running statistics converge to the batch's
        first(x)
    first.eval()
    unbiased = x.var((0, 2, 3)).view(1, 3, 1, 1)
    assert torch.allclose(first(x), (x - mean) / (unbiased + 1e-5).sqrt(), atol=1e-4)
    plain = common.resnet(NET, 10)  # the default: the paper's network, nothing before the first conv
    assert type(plain.stem[0]).__name__ == "Conv2d"


def test_weight_decay_only_on_conv_and_linear_weights():
    m = common.ResNetV2(18, 0.25, 10)
    decay, no_decay = common.param_groups(m, 1e-3)
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0
    assert {id(p) for p in decay["params"]} == {id(mod.weight) for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


# ---------------------------------------------------------------- schedule ----
def test_schedule_corners():
    """Warm-up from 0 over 5 epochs, x0.1 at 140, 160, 180 (10% recipe), 100 steps per epoch."""
    lr = lambda epoch: common.lr_at(round(epoch * 100), 100, 0.1, 5, [140, 160, 180])
    assert lr(0) == 0 and lr(2.5) == pytest.approx(0.05) and lr(4.99) == pytest.approx(0.0998)
    assert lr(5) == 0.1 and lr(139.99) == 0.1
    assert lr(140) == pytest.approx(0.01) and lr(159.99) == pytest.approx(0.01)
    assert lr(160) == pytest.approx(0.001) and lr(180) == pytest.approx(0.0001) and lr(199.99) == pytest.approx(0.0001)
    assert common.lr_at(0, 10, 5e-4, 0, [5, 10, 15]) == 5e-4  # MOAM step 3: no warm-up


# ---------------------------------------------------------------- splits ----
def imagenet_labels():
    """ILSVRC-2012's train size, 1,281,167 images in 1000 classes of 732..1300 images."""
    counts = np.full(1000, 1300)
    counts[:33] -= 568
    counts[33] -= 89
    assert counts.sum() == 1_281_167 and counts.min() == 732
    return np.repeat(np.arange(1000), np.random.default_rng(1).permutation(counts))


def split_args(**kw):
    return SimpleNamespace(**{**dict(split_seed=0, val_split="public", val_size=50046, val_subsets=[],
                                     split_file=None, labels=10), **kw})


@pytest.mark.parametrize("labels,per_class", [(10, 128), (1, 13)])
def test_labeled_subset_is_exactly_class_balanced(labels, per_class):
    y = imagenet_labels()
    for val_split in ["public", "custom"]:
        L, U, H, _ = common.make_splits(y, 1000, split_args(labels=labels, val_split=val_split))
        assert (np.bincount(y[L], minlength=1000) == per_class).all()
        assert len(np.unique(L)) == len(L) and np.isin(L, U).all() and not np.isin(L, H).any()


def test_custom_hold_out_counts_nesting_and_disjointness():
    """50,046 = 50 per class + 46 classes with 51; 5,000 = 5 each; the 1,000/5,000 subsets nested."""
    y = imagenet_labels()
    L, U, H, S = common.make_splits(y, 1000, split_args(val_split="custom", val_subsets=[1000, 5000]))
    c = np.bincount(y[H], minlength=1000)
    assert len(H) == 50046 and (c >= 50).all() and (c <= 51).all() and (c == 51).sum() == 46
    assert (np.bincount(y[S[1000]], minlength=1000) == 1).all() and (np.bincount(y[S[5000]], minlength=1000) == 5).all()
    assert np.isin(S[1000], S[5000]).all() and np.isin(S[5000], H).all()
    assert not np.isin(U, H).any() and len(U) + len(H) == len(y)  # SPEC: unlabeled = all minus the hold-out
    _, _, H2, _ = common.make_splits(y, 1000, split_args(val_split="custom", val_size=5000, labels=1))
    assert (np.bincount(y[H2], minlength=1000) == 5).all()


def test_non_divisible_size_is_as_balanced_as_possible_and_seeded():
    y = np.repeat(np.arange(7), 20)
    a = split_args(val_split="custom", val_size=23, val_subsets=[9], labels=50)
    L, U, H, S = common.make_splits(y, 7, a)
    assert sorted(np.bincount(y[H], minlength=7)) == [3, 3, 3, 3, 3, 4, 4]
    assert sorted(np.bincount(y[S[9]], minlength=7)) == [1, 1, 1, 1, 1, 2, 2] and np.isin(S[9], H).all()
    again = common.make_splits(y, 7, a)
    other = common.make_splits(y, 7, split_args(val_split="custom", val_size=23, val_subsets=[9], labels=50, split_seed=1))
    assert all(np.array_equal(p, q) for p, q in zip((L, U, H), again[:3]))
    assert not np.array_equal(H, other[2])
    assert (np.bincount(y[L], minlength=7) == 10).all()  # round(50% of 140 / 7)


def test_splits_are_identical_in_separate_processes():
    """Nothing may depend on per-process state (hash seeds, set order): two interpreters agree."""
    code = ("import sys, hashlib, numpy as np; sys.path.insert(0, 'tests'); from test_common import *; "
            "s = common.make_splits(imagenet_labels(), 1000, split_args(val_split='custom', val_subsets=[1000])); "
            "print(hashlib.sha1(b''.join(a.tobytes() for a in (*s[:3], *s[3].values()))).hexdigest())")
    out = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(out) == 1


def test_split_file_plain_and_json(tmp_path):
    names = [f"/data/train/n0{c}/n0{c}_{i}.JPEG" for c in range(3) for i in range(10)]
    y = np.repeat(np.arange(3), 10)
    (tmp_path / "plain.txt").write_text("n00_3.JPEG\nn02_7.JPEG\n")  # the SimCLR-era format
    (tmp_path / "s4l.json").write_text(json.dumps({"values": ["n01_1.JPEG", "n01_2.JPEG"]}))  # the authors'
    L, *_ = common.make_splits(y, 3, split_args(split_file=str(tmp_path / "plain.txt")), names, "/data/train")
    assert [names[i] for i in L] == ["/data/train/n00/n00_3.JPEG", "/data/train/n02/n02_7.JPEG"]
    L, *_ = common.make_splits(y, 3, split_args(split_file=str(tmp_path / "s4l.json")), names, "/data/train")
    assert L.tolist() == [11, 12]
    (tmp_path / "bad.txt").write_text("n00_99.JPEG\n")
    with pytest.raises(common.UserError, match="not images under"):
        common.make_splits(y, 3, split_args(split_file=str(tmp_path / "bad.txt")), names, "/data/train")


def test_load_data_is_the_same_on_every_rank(tmp_path):
    """The same labeled / unlabeled / hold-out indices in 1 and in 2 processes."""
    args = SimpleNamespace(data="synthetic", synthetic=[5, 20, 16], out=str(tmp_path), split_seed=3, val_split="custom",
                           val_size=12, val_subsets=[5], split_file=None, labels=20, batch_size=4,
                           img_size=16, crop="inception", stem="imagenet", normalize=False, arch="resnet18", width=0.25)
    key = lambda d: [d.labeled.tolist(), d.unlabeled.tolist(), d.val_index.tolist(), d.subsets[5].tolist()]
    one = key(common.load_data(args, 0, 1))
    two = distributed(lambda r, w: key(common.load_data(args, r, w)), 2, tmp_path)
    assert two[0] == two[1] == one


# ---------------------------------------------------------------- samplers ----
def test_epoch_batches_do_not_depend_on_the_number_of_processes():
    idx = np.arange(100, 203)
    one = common.EpochBatches(idx, 8, 0, 0, 1)
    two = [common.EpochBatches(idx, 8, 0, r, 2) for r in range(2)]
    for epoch in range(3):
        for b in [one, *two]:
            b.set_epoch(epoch)
        batches = list(one)
        assert len(batches) == len(one) == 103 // 8  # the last partial batch dropped
        assert sorted(i for b in batches for i, _ in b) == sorted(set(i for b in batches for i, _ in b))
        assert [a + b for a, b in zip(*map(list, two))] == batches  # rank 0's half, then rank 1's
    one.set_epoch(2, start=5)
    assert list(one) == batches[5:] and len(one) == len(batches) - 5


def test_stream_batches_cycle_over_every_image_and_resume():
    idx = np.arange(50)
    s = common.StreamBatches(idx, 8, 0, 0, 1, stream=1)
    it = iter(s)
    first = [next(it) for _ in range(25)]  # 200 positions = 4 cycles
    flat = [i for b in first for i, _ in b]
    for c in range(4):
        assert sorted(flat[50 * c:50 * (c + 1)]) == list(range(50))
    s.start = 7
    assert [next(iter(s)) for _ in range(1)][0] == first[7]
    halves = [iter(common.StreamBatches(idx, 8, 0, r, 2, stream=1)) for r in range(2)]
    assert [next(halves[0]) + next(halves[1]) for _ in range(25)] == first


# ---------------------------------------------------------------- images and views ----
def test_train_view_is_seeded_and_makes_distinct_instances():
    img = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    x, hsv = common.train_view(img, random.Random("a"), 24, n=8)
    y, _ = common.train_view(img, random.Random("a"), 24, n=8)
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.uint8 and hsv.shape == (8, 7) and torch.equal(x, y)
    assert len({v.numpy().tobytes() for v in x}) == 8


def test_inception_crop_area_and_aspect(monkeypatch):
    """SPEC: crop area in [0.05, 1] of the image, aspect ratio in [3/4, 4/3]."""
    boxes = []
    monkeypatch.setattr(common.TF, "resized_crop", lambda img, t, l, h, w, size, antialias: boxes.append((t, l, h, w)))
    rng = random.Random(0)
    for _ in range(2000):
        common.inception_crop(torch.zeros(3, 300, 400, dtype=torch.uint8), rng, 224)
    area = np.array([h * w / (300 * 400) for _, _, h, w in boxes])
    ratio = np.array([w / h for _, _, h, w in boxes])
    assert area.min() >= 0.05 * 0.97 and area.max() <= 1 and area.min() < 0.07 and area.max() > 0.9
    assert ratio.min() >= 0.75 * 0.97 and ratio.max() <= 4 / 3 * 1.03
    assert all(0 <= t and t + h <= 300 and 0 <= l and l + w <= 400 for t, l, h, w in boxes)


def test_eval_view_resizes_the_shorter_side_and_crops_the_centre():
    """A 128 x 256 image: shorter side to 32 * 256 / 224 = 37 (aspect kept, 37 x 73), then the central 32 x 32."""
    img = torch.zeros(3, 128, 256, dtype=torch.uint8)
    img[:, 60:68, 124:132] = 255  # a marker at the centre
    x, _ = common.eval_view(img, None, 32)
    assert x.shape == (1, 3, 32, 32)
    ys, xs = torch.nonzero(x[0, 0] > 100, as_tuple=True)
    assert abs(ys.float().mean() - 15.5) < 1 and abs(xs.float().mean() - 15.5) < 1
    five, _ = common.eval_view(img, None, 32, crops=5)
    assert five.shape == (5, 3, 32, 32) and torch.equal(five[4], x[0])


def test_to_input_range_and_layout():
    x = torch.tensor([0, 255, 127], dtype=torch.uint8).view(1, 1, 3, 1, 1).expand(2, 1, 3, 4, 4)
    args = SimpleNamespace(channels_last=True)
    y = common.to_input(x, torch.zeros(2, 1, 7), torch.device("cpu"), args)
    assert y.shape == (2, 3, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    assert y[0, :, 0, 0].tolist() == pytest.approx([-1, 1, 127 / 127.5 - 1])


def test_one_decode_per_sample(tmp_path, monkeypatch):
    root = common.make_synthetic(str(tmp_path / "syn"), 2, 5, 16)
    _, files, labels = common.scan(root + "/train", "train")
    calls = []
    real = common.read_image
    monkeypatch.setattr(common, "read_image", lambda p: calls.append(p) or real(p))
    ds = common.Images(files, labels, lambda img, rng: common.train_view(img, rng, 16, n=8))
    x, hsv, y, i = ds[(3, "seed")]
    assert x.shape == (8, 3, 16, 16) and calls == [files[3]] and i == 3 and y == labels[3]


def test_synthetic_data_is_deterministic_and_has_an_up(tmp_path):
    a = common.make_synthetic(str(tmp_path / "a"), 6, 10, 32)
    b = common.make_synthetic(str(tmp_path / "b"), 6, 10, 32)
    classes, files, labels = common.scan(a + "/train", "train")
    assert len(classes) == 6 and len(files) == 60 and np.bincount(labels).tolist() == [10] * 6
    assert len(common.scan(a + "/val", "val")[1]) == 12
    assert all(open(f, "rb").read() == open(f.replace(a, b), "rb").read() for f in files)
    imgs = torch.stack([common.read_image(f).float() for f in files])
    assert (imgs[:, :, :6].mean((1, 2, 3)) > imgs[:, :, -6:].mean((1, 2, 3)) + 40).all()  # light sky above dark ground


# ---------------------------------------------------------------- evaluation and checkpoints ----
class ColourNet(nn.Module):
    """A fixed classifier of the mean colour: deterministic logits to count hits by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[3.0, -1, 0.5, 2, -2, 1], [0.2, 2, -3, 1, 1, -1], [-1, 0.3, 2, -2, 1, 2.5]]))

    def forward(self, x):
        return x.float().mean((2, 3)) @ self.w


def test_evaluate_counts_every_image_once_over_ranks(tmp_path):
    root = common.make_synthetic(str(tmp_path / "syn"), 6, 35, 16)  # 42 val images: uneven shards
    _, files, labels = common.scan(root + "/val", "val")
    d = SimpleNamespace(val_files=files, val_labels=labels, val_index=np.arange(len(files)),
                        subsets={12: np.arange(0, 42, 3)[:12]})
    args = SimpleNamespace(batch_size=10, img_size=16, workers=0, out=str(tmp_path), skip_bad_images=False,
                           amp="none", channels_last=False, crop="inception")
    net = ColourNet()
    with torch.no_grad():  # brute force, one image at a time
        logits = torch.cat([net(common.eval_view(common.read_image(f), None, 16)[0].float() / 127.5 - 1) for f in files])
    rank_of_truth = (logits > logits[torch.arange(42), labels].unsqueeze(1)).sum(1)
    want = {"top1": 100 * (rank_of_truth == 0).float().mean().item(), "top5": 100 * (rank_of_truth < 5).float().mean().item(),
            "top1@12": 100 * (rank_of_truth[d.subsets[12]] == 0).float().mean().item()}

    def ev(rank, world):
        loader = common.eval_loader(files, labels, d.val_index, args, rank, world, torch.device("cpu"))
        return common.evaluate(net, loader, d, args, torch.device("cpu"), world)
    for got in [ev(0, 1), *distributed(ev, 2, tmp_path)]:
        assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] == pytest.approx(want["top5"])
        assert got["top1@12"] == pytest.approx(want["top1@12"])


def test_checkpoint_round_trip_and_truncation(tmp_path):
    m = common.ResNetV2(18, 0.25, 5)
    path = str(tmp_path / "last.pt")
    common.save_atomic({"model": m.state_dict(), "args": {"arch": "resnet18"}, "step": 3}, path)
    ck = common.load_checkpoint(path)  # weights_only=True inside
    assert ck["step"] == 3 and all(torch.equal(v, m.state_dict()[k]) for k, v in ck["model"].items())
    assert not os.path.exists(path + ".tmp")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(common.UserError, match="not a readable"):
        common.load_checkpoint(path)
