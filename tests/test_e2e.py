"""Every script end to end, as a user runs it: torchrun with 2 processes on CPU (gloo) on --data
synthetic with a tiny model; its outputs; learning above chance; and exact resume: a run stopped by
SIGTERM in the middle of an epoch and re-run with the same command ends with the same weights, bit for
bit, and the same metrics.jsonl as a run that was never stopped."""
import os

import numpy as np
import pytest
import torch

from conftest import TINY, metrics, run, same_rows, same_weights, weights


def test_baseline_learns_the_synthetic_classes(tmp_path):
    """A tiny model, a minute of CPU at most: clearly above the 10% chance of 10 classes."""
    run("baseline.py", *TINY, "--labels", "100", "--epochs", "6", "--lr", "0.1", "--warmup", "1", "--out", tmp_path)
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(1, 7)) and rows[-1]["step"] == 6 * (1000 // 32)
    assert rows[-1]["top1"] >= 25 and max(r["top1"] for r in rows) >= 35 and rows[-1]["L_sup"] < rows[0]["L_sup"]
    for f in ["args.json", "metrics.jsonl", "last.pt", "final.pt"]:
        assert (tmp_path / f).is_file()


def test_rotation_head_learns(tmp_path):
    run("rotation.py", *TINY, "--labels", "0", "--epochs", "1", "--out", tmp_path, nproc=2)
    assert metrics(tmp_path)[-1]["rot_top1"] > 60  # chance: 25%


# (script, its flags): each resumed after SIGTERM at step STOP, in the second epoch.
CASES = {
    "baseline": ("baseline.py", ["--labels", "10"]),
    "baseline-1%-colour": ("baseline.py", ["--labels", "1", "--synthetic", "10,300,48", "--batch-size", "8", "--eval-every", "1"]),
    "rotation": ("rotation.py", ["--labels", "10", "--eval-rotations"]),
    "rotation-selfsup": ("rotation.py", ["--labels", "0", "--synthetic", "10,10,48"]),
    "vat+entmin": ("vat.py", ["--labels", "10", "--entmin-weight", "1"]),
    "exemplar": ("exemplar.py", ["--labels", "10"]),
    "exemplar-selfsup": ("exemplar.py", ["--labels", "0", "--synthetic", "10,10,48"]),
    "pseudolabel": ("pseudolabel.py", ["--labels", "10", "--synthetic", "10,10,48"]),
    "linear_eval": ("linear_eval.py", ["--labels", "10"]),
    "finetune": ("linear_eval.py", ["--labels", "10", "--mode", "finetune"]),
    "moam": ("moam.py", ["--labels", "10", "--step", "all"]),
}


@pytest.mark.parametrize("case", CASES)
def test_exact_resume_after_sigterm(case, tmp_path, teacher):
    script, flags = CASES[case]
    flags = [*TINY, *flags, "--epochs", "2", "--deterministic"]
    if script in ("pseudolabel.py", "linear_eval.py"):
        flags += ["--teacher" if script == "pseudolabel.py" else "--ckpt", teacher / "final.pt"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(script, *flags, "--out", whole, nproc=2)
    stopped = run(script, *flags, "--out", cut, "--debug-stop-at", 4, nproc=2, check=False)
    assert stopped.returncode != 0 and "stopped by signal at step 4" in stopped.stderr
    first = cut / "step1" if script == "moam.py" else cut
    ck = torch.load(first / "last.pt", weights_only=True)
    assert ck["step"] == 4 and not (first / "final.pt").exists()
    run(script, *flags, "--out", cut, nproc=2)  # the same command again
    for sub in ["step1", "step2", "step3"] if script == "moam.py" else [""]:
        assert same_weights(weights(whole / sub / "final.pt"), weights(cut / sub / "final.pt")), sub
        assert same_rows(metrics(whole / sub), metrics(cut / sub)) and len(metrics(cut / sub)) == 2, sub


def test_linear_eval_keeps_the_backbone_and_trains_only_the_head(tmp_path):
    """On a self-supervised checkpoint (issue 3): the trunk and its BN statistics bit-identical, the head new."""
    ssl = tmp_path / "rotation"
    run("rotation.py", *TINY, "--labels", "0", "--epochs", "1", "--synthetic", "10,20,48", "--out", ssl, nproc=2)
    for mode in ["linear", "finetune"]:
        out = tmp_path / mode
        run("linear_eval.py", *TINY, "--labels", "10", "--mode", mode, "--epochs", "2", "--ckpt", ssl / "final.pt",
            "--out", out, nproc=2)
        before, after = weights(ssl / "final.pt"), weights(out / "final.pt")
        trunk = [k for k in before if k.startswith(("stem.", "blocks.", "norm."))]
        assert any("running_mean" in k for k in trunk)
        unchanged = [k for k in trunk if torch.equal(before[k], after[k])]
        assert len(unchanged) == (len(trunk) if mode == "linear" else 0) or mode == "finetune" and len(unchanged) < len(trunk) / 2
        assert not torch.equal(after["fc.weight"], before["fc.weight"]) and "rot.weight" not in after
        assert "top1" in metrics(out)[-1]


def test_exemplar_selfsupervised_then_linear_eval(tmp_path):
    run("exemplar.py", *TINY, "--labels", "0", "--epochs", "1", "--synthetic", "10,20,48", "--out", tmp_path / "ex", nproc=2)
    assert "L_u" in metrics(tmp_path / "ex")[0]
    run("linear_eval.py", *TINY, "--labels", "10", "--epochs", "1", "--ckpt", tmp_path / "ex" / "final.pt",
        "--out", tmp_path / "lin", nproc=2)
    assert "top1" in metrics(tmp_path / "lin")[0]


def test_pseudo_labels_file(tmp_path, teacher):
    """One label per training image, each labeled once over 2 processes; ground truth kept; a re-run
    reuses the file; the threshold filters."""
    out = tmp_path / "pl"
    run("pseudolabel.py", *TINY, "--labels", "10", "--epochs", "1", "--teacher", teacher / "final.pt", "--out", out,
        "--val-split", "custom", "--val-size", "100", nproc=2)
    pl = torch.load(out / "pseudo_labels.pt", weights_only=True)
    assert len(pl["index"]) == len(set(pl["index"].tolist())) == 900  # 1000 images, 100 held out
    assert ((pl["confidence"] > 0) & (pl["confidence"] <= 1)).all() and pl["label"].max() < 10
    stamp = os.stat(out / "pseudo_labels.pt").st_mtime_ns
    again = run("pseudolabel.py", *TINY, "--labels", "10", "--epochs", "2", "--teacher", teacher / "final.pt", "--out", out,
                "--val-split", "custom", "--val-size", "100", nproc=2)
    assert os.stat(out / "pseudo_labels.pt").st_mtime_ns == stamp and len(metrics(out)) == 2, again.stderr[-500:]


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
