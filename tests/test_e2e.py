"""Every script end to end, as a user runs it, on CPU with a tiny model on synthetic data: its outputs,
learning above chance, and exact resume: a run extended with --epochs after its end, then stopped by a real
SIGTERM in the middle of an epoch, and re-run with the same command ends with the same weights, bit for
bit, and the same metrics.jsonl as a run that was never stopped. VAT (a random start per rank) runs under
torchrun with 2 processes (gloo), where the signal reaches only the last rank and every rank must stop at the
same step; the other scripts' two-process runs are in test_signals.py, test_resume.py, test_reliability.py,
test_fork.py (MOAM's: tests/test_signals.py, stopped between its steps) and the pseudo-labelling test below."""

import numpy as np
import pytest
import torch

from conftest import TINY, launch, metrics, run, same_rows, same_weights, weights


@pytest.fixture(scope="session")
def ssl_rotation(tmp_path_factory):
    """A self-supervised Rotation checkpoint (--labels 0) for linear_eval.py."""
    out = tmp_path_factory.mktemp("ssl") / "rotation"
    run("rotation.py", *TINY, "--labels", "0", "--epochs", "1", "--out", out, nproc=2)
    return out


@pytest.fixture(scope="session")
def small_teacher(tmp_path_factory):
    """A baseline checkpoint on the 100-image synthetic set (its 10 labeled images, batches of 8): the teacher
    of the pseudolabel case, which must share its data and split."""
    out = tmp_path_factory.mktemp("small_teacher") / "baseline"
    run("baseline.py", *TINY, "--labels", "10", "--synthetic", "10,10,48", "--batch-size", "8", "--epochs", "1",
        "--out", out)
    return out


def test_baseline_learns_the_synthetic_classes(tmp_path):
    """A tiny model, well under a minute of CPU: clearly above the 10% chance of 10 classes."""
    run("baseline.py", *TINY, "--labels", "100", "--epochs", "6", "--lr", "0.1", "--warmup", "1", "--out", tmp_path)
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(1, 7)) and rows[-1]["step"] == 6 * (1000 // 32)
    assert rows[-1]["top1"] >= 25 and max(r["top1"] for r in rows) >= 35 and rows[-1]["L_sup"] < rows[0]["L_sup"]
    for f in ["args.json", "metrics.jsonl", "last.pt", "final.pt"]:
        assert (tmp_path / f).is_file()


def test_rotation_head_learns(ssl_rotation):
    assert metrics(ssl_rotation)[-1]["rot_top1"] > 60  # chance: 25%


# name: (script, flags, processes). Each is stopped by SIGTERM at step 4, in its second epoch.
CASES = {
    "baseline": ("baseline.py", ["--labels", "10"], 1),
    "baseline-1%-colour": ("baseline.py", ["--labels", "1", "--synthetic", "10,300,48", "--batch-size", "8",
                                           "--eval-every", "1"], 1),
    "rotation": ("rotation.py", ["--labels", "10", "--eval-rotations"], 1),
    "rotation-selfsup": ("rotation.py", ["--labels", "0", "--synthetic", "10,10,48"], 1),
    "vat+entmin": ("vat.py", ["--labels", "10", "--entmin-weight", "1"], 2),
    "exemplar": ("exemplar.py", ["--labels", "10"], 1),
    "exemplar-selfsup": ("exemplar.py", ["--labels", "0", "--synthetic", "10,10,48"], 1),
    "pseudolabel": ("pseudolabel.py", ["--labels", "10", "--synthetic", "10,10,48", "--tta"], 1),
    "linear_eval": ("linear_eval.py", ["--labels", "10"], 1),
    "finetune": ("linear_eval.py", ["--labels", "10", "--mode", "finetune"], 1),
}


@pytest.mark.parametrize("case", CASES)
def test_exact_resume_after_sigterm(case, tmp_path, small_teacher, ssl_rotation):
    script, flags, nproc = CASES[case]
    flags = [*TINY, *flags, "--epochs", "2", "--deterministic"]
    if script == "pseudolabel.py":
        flags += ["--teacher", small_teacher / "final.pt"]
    if script == "linear_eval.py":
        flags += ["--ckpt", ssl_rotation / "final.pt"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(script, *flags, "--out", whole, nproc=nproc)
    if script != "moam.py":  # first to an epoch's end, then on with --epochs 2 (README's demo): the rows must not count twice
        run(script, *flags, "--epochs", 1, "--out", cut, nproc=nproc)
    stopped = launch(["--stop-at", 4], script, *flags, "--out", cut, nproc=nproc, check=False)
    at = 4 + (nproc > 1)  # the ranks agree on a signal one step after it arrives
    assert stopped.returncode != 0 and f"stopped at step {at}" in stopped.stderr
    first = cut / "step1" if script == "moam.py" else cut
    assert torch.load(first / "last.pt", weights_only=True)["step"] == at and not (first / "final.pt").exists()
    if script == "moam.py":  # step 1 ends, step 2 labels every image and is stopped in its turn
        again = launch(["--stop-at", 10], script, *flags, "--out", cut, nproc=nproc, check=False)
        assert again.returncode != 0 and (cut / "step1" / "final.pt").exists() and (cut / "step2" / "pseudo_labels.pt").exists()
        assert torch.load(cut / "step2" / "last.pt", weights_only=True)["step"] == 10 + (nproc > 1)
    run(script, *flags, "--out", cut, nproc=nproc)  # the same command again
    for sub in ["step1", "step2", "step3"] if script == "moam.py" else [""]:
        assert same_weights(weights(whole / sub / "final.pt"), weights(cut / sub / "final.pt")), sub
        assert same_rows(metrics(whole / sub), metrics(cut / sub)) and len(metrics(cut / sub)) == 2, sub
    if script == "linear_eval.py":
        check_linear_eval(ssl_rotation / "final.pt", whole / "final.pt", flags)
    if script == "pseudolabel.py":
        check_pseudo_labels(whole, cut)


def check_linear_eval(ckpt, trained, flags):
    """Issue 3: in linear mode the trunk, BN statistics included, is bit-identical after training and only
    the new class head changed; in fine-tuning mode the trunk trains."""
    before, after = weights(ckpt), weights(trained)
    trunk = [k for k in before if k.startswith(("stem.", "blocks.", "norm."))]
    assert any("running_mean" in k for k in trunk) and "rot.weight" not in after
    unchanged = sum(torch.equal(before[k], after[k]) for k in trunk)
    assert unchanged == len(trunk) if "finetune" not in flags else unchanged < len(trunk) / 2
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


def check_pseudo_labels(whole, cut):
    """One label per training image (100), confidences in (0, 1]; the resumed run reused the file."""
    pl = torch.load(whole / "pseudo_labels.pt", weights_only=True)
    assert pl["index"].tolist() == list(range(100)) and pl["label"].max() < 10
    assert ((pl["confidence"] > 0) & (pl["confidence"] <= 1)).all() and pl["tta"]
    again = torch.load(cut / "pseudo_labels.pt", weights_only=True)
    assert all(torch.equal(pl[k], again[k]) for k in ["index", "label", "confidence"])


def test_exemplar_selfsupervised_then_linear_eval(tmp_path):
    run("exemplar.py", *TINY, "--labels", "0", "--epochs", "1", "--synthetic", "10,20,48", "--out", tmp_path / "ex", nproc=2)
    assert "L_u" in metrics(tmp_path / "ex")[0]
    run("linear_eval.py", *TINY, "--labels", "100", "--epochs", "1", "--ckpt", tmp_path / "ex" / "final.pt",
        "--synthetic", "10,20,48", "--out", tmp_path / "lin")
    assert "top1" in metrics(tmp_path / "lin")[0]


def test_pseudo_labels_in_two_processes_skip_the_hold_out(tmp_path, teacher):
    """Each of the 900 training images outside a 100-image hold-out labeled exactly once over 2 ranks; a
    teacher trained on another split is refused (it saw other labels, or the hold-out)."""
    out, split = tmp_path / "pl", ["--val-split", "custom", "--val-size", "100"]
    p = run("pseudolabel.py", *TINY, "--labels", "10", *split, "--teacher", teacher / "final.pt", "--out", out, check=False)
    assert p.returncode != 0 and "was made with --val-split public, this run has custom" in p.stderr
    run("baseline.py", *TINY, "--labels", "10", *split, "--epochs", "1", "--out", tmp_path / "teacher")
    run("pseudolabel.py", *TINY, "--labels", "10", "--epochs", "1", "--teacher", tmp_path / "teacher" / "final.pt",
        "--out", out, *split, nproc=2)
    pl = torch.load(out / "pseudo_labels.pt", weights_only=True)
    assert len(pl["index"]) == len(set(pl["index"].tolist())) == 900 and not pl["tta"]
    assert "top1" in metrics(out)[0]


def test_pseudo_label_selection():
    """Step 2's examples by hand: threshold 0.5 keeps the confident predictions; the labeled subset keeps
    its ground truth (and stays in, however unsure the teacher) unless told otherwise."""
    import pseudolabel
    pl = {"index": torch.tensor([0, 1, 2, 3, 5]), "label": torch.tensor([7, 7, 8, 8, 9]),
          "confidence": torch.tensor([0.9, 0.4, 0.6, 0.2, 0.51])}
    truth, labeled = np.array([1, 2, 3, 4, 5, 6]), np.array([3])
    keep, target = pseudolabel.training_set(pl, truth, labeled, 0.5, True)
    assert keep.tolist() == [0, 2, 3, 5] and target[[0, 2, 3, 5]].tolist() == [7, 8, 4, 9]
    keep, target = pseudolabel.training_set(pl, truth, labeled, 0.5, False)
    assert keep.tolist() == [0, 2, 5] and target[3] == 8
    keep, _ = pseudolabel.training_set(pl, truth, labeled, 0.0, False)
    assert keep.tolist() == [0, 1, 2, 3, 5]  # the default: every prediction


def test_tta_pseudo_labels_average_five_crops_and_four_rotations(tmp_path):
    """pseudo_label(tta=True) against an explicit loop over the 20 views of each image (MOAM step 2)."""
    import common
    import moam
    root = common.make_synthetic(str(tmp_path / "syn"), 3, 10, 24)
    _, files, labels = common.scan(root + "/train", "train")
    torch.manual_seed(0)
    net = common.ResNetV2(18, 0.25, 3).eval()
    args = type("A", (), dict(batch_size=4, img_size=16, workers=0, out=str(tmp_path), skip_bad_images=False,
                              amp="none", channels_last=True, crop="inception"))()
    loader = common.eval_loader(files, labels, np.arange(len(files)), args, 0, 1, torch.device("cpu"), crops=5)
    index, label, conf = moam.pseudo_label(net, loader, args, torch.device("cpu"), tta=True)
    with torch.no_grad():
        for i in [0, 7, 29]:
            crops = common.eval_view(common.read_image(files[i]), None, 16, crops=5)[0].float() / 127.5 - 1
            p = torch.stack([net(torch.rot90(c[None], r, (2, 3))).softmax(1)[0] for c in crops for r in range(4)]).mean(0)
            j = index.tolist().index(i)
            assert label[j] == p.argmax() and conf[j] == pytest.approx(p.max().item(), abs=1e-5)
