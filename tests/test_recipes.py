"""SPEC's recipes and its "Settled after the issues were filed" items, script by script: the defaults
against SPEC's numbers (typed here from SPEC, not read from the scripts), and what each data stream
holds, captured by running a script's main() in this process with --epochs 0."""
import argparse
import sys

import numpy as np
import pytest
import torch

import baseline
import common
import exemplar
import linear_eval
import moam
import pseudolabel
import rotation
import vat
from conftest import TINY, run

A224 = argparse.Namespace(img_size=224, batch_size=256)
BASE10 = dict(epochs=200, batch_size=256, lr=0.1, wd=1e-3, warmup=5, decay_epochs=[140, 160, 180])
BASE1 = dict(epochs=1000, batch_size=256, lr=0.01, wd=1e-2, warmup=10, decay_epochs=[700, 800, 900])


def subset(d, keys):
    return {k: d[k] for k in keys}


def test_recipes_are_spec():
    for script in (baseline, rotation, exemplar):  # the paper: S4L uses the baseline's lr and wd, batch 256
        assert subset(script.RECIPES[10], BASE10) == BASE10, script.__name__
        assert subset(script.RECIPES[1], BASE1) == BASE1, script.__name__
    assert baseline.RECIPES[1]["color"] and not baseline.RECIPES[10].get("color") and rotation.RECIPES[1]["color"]
    assert vat.RECIPES[10]["lr"] == 0.03 and vat.RECIPES[1]["lr"] == 0.01  # released config / the baseline's
    assert {**vat.RECIPES[10], "lr": 0.1} | BASE10 == {**vat.RECIPES[10], "lr": 0.1}
    for script in (rotation, exemplar):  # --labels 0: 35 epochs, lr 0.1 x batch/256, wd 1e-4, warm-up 5, 15/25
        r = script.RECIPES[0]
        assert (r["epochs"], r["wd"], r["warmup"], r["decay_epochs"]) == (35, 1e-4, 5, [15, 25])
        assert r["lr"](A224) == 0.1 and r["lr"](argparse.Namespace(batch_size=2048)) == 0.8
    for p in (1, 10):
        assert subset(pseudolabel.RECIPES[p], ["epochs", "batch_size", "lr", "wd", "warmup", "decay_epochs"]) == dict(
            epochs=100, batch_size=256, lr=0.1, wd=1e-4, warmup=5, decay_epochs=[30, 60, 90])
        assert subset(linear_eval.LINEAR[p], ["epochs", "batch_size", "lr", "wd"]) == dict(epochs=70, batch_size=2048, lr=0.1, wd=1e-4)
    assert subset(linear_eval.FINETUNE[10], BASE10) == BASE10 and linear_eval.FINETUNE[1]["color"]
    m1 = moam.RECIPES[10]
    assert subset(m1, ["epochs", "batch_size", "lr", "wd", "warmup", "decay_epochs"]) == dict(
        epochs=200, batch_size=128, lr=0.1, wd=2e-4, warmup=10, decay_epochs=[100, 150, 190]) and moam.RECIPES[100] == m1
    assert subset(moam.STEP2, ["epochs", "batch_size", "lr", "wd", "warmup", "decay_epochs"]) == dict(
        epochs=18, batch_size=128, lr=0.1, wd=2e-4, warmup=0, decay_epochs=[6, 12])
    assert subset(moam.STEP3, ["epochs", "batch_size", "lr", "wd", "warmup", "decay_epochs"]) == dict(
        epochs=20, batch_size=128, lr=5e-4, wd=3e-3, warmup=0, decay_epochs=[5, 10, 15])
    assert (moam.W_SUP, moam.W_ROT, moam.W_VAT, moam.W_ENTMIN) == (0.3, 0.7, 0.3, 0.3)
    assert m1["vat_eps"](A224) == 32 and vat.RECIPES[10]["vat_eps"](A224) == 40


def test_moam_is_four_times_wider_by_default(monkeypatch, tmp_path):
    """MOAM's network is ResNet50v2 4x wider unless --width says otherwise; the others are standard width."""
    assert common.parser("").parse_args([]).width == 1.0
    monkeypatch.setattr(sys, "argv", ["moam.py", "--data", "synthetic", "--epochs", "0", "--step", "1", "--img-size", "32",
                                      "--batch-size", "32", "--workers", "0", "--out", str(tmp_path)])
    moam.main()
    ck = torch.load(tmp_path / "final.pt", weights_only=True)
    assert ck["args"]["width"] == 4.0 and ck["model"]["fc.weight"].shape[1] == 4 * 2048


class Captured(Exception):
    pass


def capture(monkeypatch, tmp_path, script, *flags):
    """Run script.main() here with --epochs 0 and record the indices each sampler was built on."""
    seen = {}
    for cls in ("EpochBatches", "StreamBatches"):
        real = getattr(common, cls)
        monkeypatch.setattr(common, cls, type(cls, (real,), {"__init__": lambda self, idx, *a, _r=real, _n=cls, **k: (
            seen.setdefault(_n, np.asarray(idx)), _r.__init__(self, idx, *a, **k))[1]}))
    monkeypatch.setattr(sys, "argv", [script.__file__, *map(str, TINY), "--epochs", "0", "--out", str(tmp_path), *map(str, flags)])
    script.main()
    d = common.load_data(common.finish_args(common.parser("").parse_args(
        [*map(str, TINY), "--out", str(tmp_path), *[f for f in map(str, flags) if f not in ("--no-rot-on-labeled",)]]),
        {k: {"batch_size": 32} for k in (0, 1, 10)}), 0, 1)
    return seen, d


def test_rotation_streams(monkeypatch, tmp_path):
    seen, d = capture(monkeypatch, tmp_path / "a", rotation, "--labels", "10")
    assert np.array_equal(seen["EpochBatches"], d.labeled) and np.array_equal(seen["StreamBatches"], d.unlabeled)
    assert np.isin(d.labeled, d.unlabeled).all()  # SPEC: x_u is every image, the labeled ones included
    seen, d = capture(monkeypatch, tmp_path / "b", rotation, "--labels", "10", "--no-rot-on-labeled")
    assert not np.isin(seen["StreamBatches"], d.labeled).any()  # Section 4.4: they leave the unlabeled stream
    assert len(seen["StreamBatches"]) == len(d.unlabeled) - len(d.labeled)
    seen, d = capture(monkeypatch, tmp_path / "c", rotation, "--labels", "0")
    assert np.array_equal(seen["EpochBatches"], d.unlabeled) and "StreamBatches" not in seen  # an epoch: all images


def test_exemplar_selfsupervised_epoch_is_all_images(monkeypatch, tmp_path):
    seen, d = capture(monkeypatch, tmp_path, exemplar, "--labels", "0")
    assert np.array_equal(seen["EpochBatches"], d.unlabeled) and len(d.unlabeled) == 1000


def test_exemplar_mines_x_l_and_x_u_separately(monkeypatch, tmp_path):
    """The released triplet_loss_sup / triplet_loss_unsup: in a real training step, two triplet losses,
    one on the 8 x B_l instances of x_l and one on the 8 x B_u of x_u, never one over both."""
    calls, real = [], exemplar.L_triplet
    monkeypatch.setattr(exemplar, "L_triplet", lambda emb, image: calls.append((len(emb), image)) or real(emb, image))
    monkeypatch.setattr(sys, "argv", ["exemplar.py", *map(str, TINY), "--labels", "10", "--epochs", "1", "--out", str(tmp_path)])
    exemplar.main()
    assert [n for n, _ in calls] == [8 * 32] * 2 * 3  # 3 steps, each: x_l's 256 instances, then x_u's 256
    labeled = set(common.make_splits(np.repeat(np.arange(10), 100), 10, argparse.Namespace(
        split_seed=0, val_split="public", val_size=50046, val_subsets=[], split_file=None, labels=10))[0].tolist())
    for k, (_, image) in enumerate(calls):  # each instance is known by its image's index in the data set
        assert len(image) == 32 and (set(image.tolist()) <= labeled) == (k % 2 == 0), k


def test_vat_on_labeled_is_the_default_and_can_be_off(tmp_path):
    assert "--vat-on-labeled" in open(vat.__file__).read() and "--vat-on-labeled" in open(moam.__file__).read()
    run("vat.py", *TINY, "--labels", "10", "--epochs", "1", "--no-vat-on-labeled", "--out", tmp_path)


def test_moam_step_all_refuses_per_step_overrides(tmp_path):
    p = run("moam.py", *TINY, "--step", "all", "--lr", "0.3", "--out", tmp_path, check=False)
    assert p.returncode != 0 and "run the steps one by one" in p.stderr


@pytest.mark.parametrize("labels,val_size", [(10, 50046), (100, 50046), (1, 5000)])
def test_custom_validation_size_defaults(labels, val_size):
    args = common.parser("").parse_args(["--labels", str(labels), "--val-split", "custom"])
    assert common.finish_args(args, {k: {"batch_size": 8} for k in (1, 10, 100)}).val_size == val_size


def test_s4l_rotation_losses_by_hand():
    """L_sup over the 4 rotated copies of x_l only, L_rot the mean over every rotated image, each row's
    targets written out one by one (rows: rotation-major within x_l, then within x_u)."""
    torch.manual_seed(0)
    B_l, B_u, C = 2, 3, 5
    logits, rot_logits, y = torch.randn(4 * B_l + 4 * B_u, C), torch.randn(4 * B_l + 4 * B_u, 4), torch.tensor([3, 1])
    ce = lambda z, t: -torch.log_softmax(z, 0)[t]
    rows_l = [(r * B_l + i, y[i], r) for r in range(4) for i in range(B_l)]
    rows_u = [(4 * B_l + r * B_u + i, None, r) for r in range(4) for i in range(B_u)]
    want_sup = sum(ce(logits[j], t) for j, t, _ in rows_l) / len(rows_l)
    want_rot = sum(ce(rot_logits[j], r) for j, _, r in rows_l + rows_u) / (len(rows_l) + len(rows_u))
    L_sup, L_rot = rotation.s4l_rotation_losses(logits, rot_logits, y, B_u)
    assert torch.allclose(L_sup, want_sup) and torch.allclose(L_rot, want_rot)
    _, L_rot_u = rotation.s4l_rotation_losses(logits, rot_logits, y, B_u, rot_on_labeled=False)
    assert torch.allclose(L_rot_u, sum(ce(rot_logits[j], r) for j, _, r in rows_u) / len(rows_u))
    L_up, _ = rotation.s4l_rotation_losses(logits, rot_logits, y, B_u, sup_upright_only=True)
    assert torch.allclose(L_up, sum(ce(logits[j], t) for j, t, r in rows_l if r == 0) / B_l)
    assert "loss, losses = L_sup + args.rot_weight * L_rot" in open(rotation.__file__).read()  # L = L_sup + w L_rot


def test_moam_step2_labels_every_example_by_its_pseudo_label(monkeypatch, tmp_path):
    """Step 2 trains on every image outside the hold-out, each labeled by its pseudo label (the paper:
    no ground truth kept), the labels step 2's own labelling wrote."""
    seen = []
    real = common.loader
    monkeypatch.setattr(common, "loader", lambda files, labels, view, batches, *a, **k: (
        seen.append((np.asarray(labels).copy(), batches.indices if type(batches) is common.EpochBatches else None)),
        real(files, labels, view, batches, *a, **k))[1])
    monkeypatch.setattr(sys, "argv", ["moam.py", *map(str, TINY), "--epochs", "0", "--step", "all", "--out", str(tmp_path)])
    moam.main()
    pl = torch.load(tmp_path / "step2" / "pseudo_labels.pt", weights_only=True)
    step2 = [(labels, idx) for labels, idx in seen if idx is not None and len(idx) == 1000]
    assert len(step2) == 1  # step 2's labeled stream: all 1000 images (step 1's and 3's: the 100 labeled)
    labels, idx = step2[0]
    assert np.array_equal(labels[pl["index"].numpy()], pl["label"].numpy()) and len(pl["index"]) == 1000
