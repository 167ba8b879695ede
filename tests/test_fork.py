"""Forking is the product (issue "Forking is the product"): a new pretext task made from rotation.py by
replacing its `# ALGO LOGIC` blocks and nothing else runs under torchrun, stops on SIGTERM, resumes bit for
bit, and feeds linear_eval.py. The fork here predicts a horizontal flip drawn per image on the device from
common.step_generator for the global batch (README's pattern): the same coin for an image whatever the
number of processes, and the same after a resume."""
import difflib
import math
import os
import re
import shutil
import sys

import pytest
import torch

from conftest import ROOT, TINY, launch, metrics, run, same_rows, same_weights, weights

BLOCK = re.compile(r"^( *)# ALGO LOGIC:[^\n]*\n.*?^\1# END ALGO LOGIC\n", re.M | re.S)
SCRIPTS = ["baseline.py", "rotation.py", "vat.py", "exemplar.py", "pseudolabel.py", "moam.py"]

FLIP = ['''\
"""S4L-Flip, a test fork of rotation.py: predict whether each image was mirrored."""
''', '''\
RECIPES = {10: dict(epochs=200, batch_size=256, lr=0.1, wd=1e-3, warmup=5, decay_epochs=[140, 160, 180], color=False),
           0: dict(epochs=35, batch_size=256, lr=0.1, wd=1e-4, warmup=5, decay_epochs=[15, 25], color=False)}


def random_flip(x, gen, rank, world):
    """Mirror each image by a coin drawn for the global batch, keeping this rank's rows: [N] labels."""
    coin = torch.randint(2, (len(x) * world,), generator=gen, device=x.device)[rank * len(x):(rank + 1) * len(x)]
    return torch.where(coin.view(-1, 1, 1, 1) == 1, x.flip(-1), x), coin
''', '''\
    p.add_argument("--flip-weight", type=common.number(float, 0), default=1.0)
''', '''\
    unlabeled = d.unlabeled
''', '''\
    model.flip = nn.Linear(model.num_features, 2)
''', '''\
                gen = common.step_generator(args.seed, step, device)
                if args.labels == 0:
                    x_f, f = random_flip(x, gen, rank, world)
                    flip_logits = net(x_f, heads=("flip",))
                    L_flip = F.cross_entropy(flip_logits, f)
                    loss, losses = L_flip, dict(L_flip=L_flip)
                else:
                    (x_l, f_l), (x_u, f_u) = random_flip(x, gen, rank, world), random_flip(x_u, gen, rank, world)
                    logits, flip_logits = net(torch.cat([x_l, x_u]), heads=("fc", "flip"))
                    L_sup = F.cross_entropy(logits[:len(y)], y)
                    L_flip = F.cross_entropy(flip_logits, torch.cat([f_l, f_u]))
                    loss, losses = L_sup + args.flip_weight * L_flip, dict(L_sup=L_sup, L_flip=L_flip)
                images = len(flip_logits)
''', '''\
        def predict(x, y):
            logits, flip_logits = model(torch.cat([x, x.flip(-1)]), heads=("fc", "flip"))
            out = {"flip_": (flip_logits, torch.arange(2, device=device).repeat_interleave(len(x)))}
            if args.labels > 0:
                out[""] = (logits[:len(x)], y)
            return out
''']


def fork(source, new_blocks):
    """Replace the inside of each ALGO LOGIC block of `source`, in order; everything else stays as it is."""
    blocks = list(BLOCK.finditer(source))
    assert len(blocks) == len(new_blocks), f"{len(blocks)} ALGO LOGIC blocks"
    out, at = [], 0
    for m, new in zip(blocks, new_blocks):
        first, *_ = m.group(0).splitlines(keepends=True)
        out += [source[at:m.start()], first, new, m.group(1) + "# END ALGO LOGIC\n"]
        at = m.end()
    return "".join(out + [source[at:]])


def outside(text):
    return BLOCK.sub("", text)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_marks_its_method_the_same_way(script):
    """Every begin has its end, never nested; the shared plumbing is the same text in every script."""
    text = (ROOT / script).read_text()
    assert text.count("# ALGO LOGIC:") == text.count("# END ALGO LOGIC") == len(BLOCK.findall(text)) >= 3
    assert "# ALGO LOGIC" not in outside(text)
    rest = outside(text)
    for line in ["    run.log(step, images, **losses)", "    run.save_or_stop()",
                 "    rank, world, device = common.setup(args)",
                 "    step = run.resume()", "            scaler.scale(loss).backward()"]:
        assert line in rest, line
    assert not re.search(r'common\.Run\([^)]*"|finish_args\([^)]*"', text)  # no method name as a literal


def test_a_fork_changes_nothing_outside_the_blocks_and_runs(tmp_path):
    source = (ROOT / "rotation.py").read_text()
    flip = fork(source, FLIP)
    assert outside(flip) == outside(source)
    (tmp_path / "flip.py").write_text(flip)
    env = {"PYTHONPATH": str(ROOT)}
    flags = [*TINY, "--labels", "10", "--epochs", "2", "--deterministic", "--log-every", "1"]
    run(tmp_path / "flip.py", *flags, "--out", tmp_path / "whole", nproc=2, env=env)
    p = launch(["--stop-at", 4], tmp_path / "flip.py", *flags, "--out", tmp_path / "cut", nproc=2, env=env,
               check=False)
    assert p.returncode != 0 and "stopped at step 5" in p.stderr
    run(tmp_path / "flip.py", *flags, "--out", tmp_path / "cut", nproc=2, env=env)
    assert same_weights(weights(tmp_path / "whole" / "final.pt"), weights(tmp_path / "cut" / "final.pt"))
    rows = metrics(tmp_path / "cut")
    assert same_rows(metrics(tmp_path / "whole"), rows) and {"L_sup", "L_flip", "flip_top1", "top1"} <= rows[-1].keys()
    ck = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)
    assert ck["method"] == "flip" and ck["args"]["out"] == str(tmp_path / "cut") and "flip.weight" in ck["model"]
    run("linear_eval.py", *TINY, "--labels", "10", "--epochs", "1", "--ckpt", tmp_path / "cut" / "final.pt",
        "--out", tmp_path / "linear")
    assert "top1" in metrics(tmp_path / "linear")[0]
    # the same fork on 1 process draws the same coins for the same images: the first steps agree
    run(tmp_path / "flip.py", *flags, "--epochs", "1", "--out", tmp_path / "one", nproc=1, env=env)
    assert metrics(tmp_path / "one")[0]["L_flip"] == pytest.approx(rows[0]["L_flip"], rel=0.1)


def test_a_fork_never_resumes_or_writes_into_another_methods_run(tmp_path):
    """The method stamp and the default --out come from the file name, not from a literal in the script."""
    shutil.copy(ROOT / "rotation.py", tmp_path / "jigsaw.py")  # a fork that has not even been edited yet
    env = {"PYTHONPATH": str(ROOT)}
    flags = [*TINY, "--labels", "10", "--epochs", "1"]
    run("rotation.py", *flags, "--out", tmp_path / "rot")
    before = {f: (tmp_path / "rot" / f).read_bytes() for f in os.listdir(tmp_path / "rot") if f.endswith((".pt", ".json", "jsonl"))}
    p = run(tmp_path / "jigsaw.py", *flags, "--epochs", "2", "--out", tmp_path / "rot", env=env, check=False)
    assert p.returncode == 1 and "is a rotation checkpoint, not jigsaw" in p.stderr.splitlines()[-1]
    assert before == {f: (tmp_path / "rot" / f).read_bytes() for f in before}
    run(tmp_path / "jigsaw.py", *flags, "--epochs", "0", "--out", tmp_path / "j", env=env)
    assert torch.load(tmp_path / "j" / "final.pt", weights_only=True)["method"] == "jigsaw"
    import common, sys
    argv = sys.argv
    try:
        sys.argv = [str(tmp_path / "jigsaw.py")]
        args = common.finish_args(common.parser("").parse_args([]), {10: {"batch_size": 8}})
    finally:
        sys.argv = argv
    assert args.out == os.path.join("runs", "jigsaw-labels10") and args.method == "jigsaw"


def changed_lines(a, b):
    return sum(1 for l in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
               if l[:1] in "+-" and not l.startswith(("+++", "---")))


def test_readme_diff_counts_are_the_real_ones():
    """README's walkthrough counts the lines `diff baseline.py X.py` changes and the lines a fork may touch."""
    readme = (ROOT / "README.md").read_text()
    base = (ROOT / "baseline.py").read_text()
    for script in SCRIPTS[1:]:
        n = changed_lines(base, (ROOT / script).read_text())
        assert f"| `{script}` | {n} |" in readme, (script, n)
    source = (ROOT / "rotation.py").read_text()
    inside = sum(len(m.group(0).splitlines()) - 2 for m in BLOCK.finditer(source))
    assert f"{inside} lines inside its {len(BLOCK.findall(source))} ALGO LOGIC blocks" in readme, inside


def readme_simclr_blocks():
    """The blocks of README's multi-view fork, by number, exactly as README gives them."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# ---- block 1, .*?)```", text, re.S).group(1)
    parts = re.split(r"^# ---- block (\d+), [^\n]*----\n", code, flags=re.M)[1:]
    return {int(n): body for n, body in zip(parts[::2], parts[1::2])}


def simclr_source():
    """exemplar.py with README's blocks: block 2 keeps RECIPES and Gather, VIEWS for INSTANCES, nt_xent for
    the triplet loss; block 7 (evaluation) is exemplar's own."""
    source = (ROOT / "exemplar.py").read_text()
    new = readme_simclr_blocks()
    old = [m.group(0).split("\n", 1)[1].rsplit("# END ALGO LOGIC", 1)[0] for m in BLOCK.finditer(source)]
    assert len(old) == 7 and "INSTANCES = 8\n" in old[1]
    block2 = old[1].replace("INSTANCES = 8\n", "VIEWS = 2\n").split("\n\ndef batch_hard_triplet")[0]
    blocks = [new[1], block2 + "\n\n" + new[2], new[3], new[4], new[5], new[6], old[6]]
    return fork(source, [b if b.endswith("\n") else b + "\n" for b in blocks])


def test_readmes_multi_view_fork_of_exemplar_runs(tmp_path):
    """README's SimCLR walkthrough: only the ALGO LOGIC blocks change; NT-Xent equals a loop written from its
    definition (two copies of an image count as one image's views); the fork trains, resumes, evaluates."""
    source, simclr = (ROOT / "exemplar.py").read_text(), simclr_source()
    assert outside(simclr) == outside(source)
    (tmp_path / "simclr.py").write_text(simclr)
    sys.path.insert(0, str(tmp_path))
    try:
        import simclr as fork_module
    finally:
        sys.path.remove(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    emb, image, tau = torch.randn(8, 5, generator=g), torch.tensor([3, 1, 3, 7]), 0.5
    z = torch.nn.functional.normalize(emb.double(), dim=1)
    ids = image.repeat_interleave(2).tolist()
    want = 0.0
    for i in range(8):  # -mean over the positives of log(exp(s_ip) / sum over k != i of exp(s_ik))
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(8) if k != i)
        positives = [p for p in range(8) if p != i and ids[p] == ids[i]]
        want += -sum(float(z[i] @ z[p]) / tau - math.log(denominator) for p in positives) / len(positives) / 8
    assert fork_module.nt_xent(emb, image, tau).item() == pytest.approx(want, rel=1e-5)
    flags = [*TINY, "--labels", "10", "--epochs", "2", "--deterministic"]
    run(tmp_path / "simclr.py", *flags, "--out", tmp_path / "whole")
    launch(["--stop-at", 4], tmp_path / "simclr.py", *flags, "--out", tmp_path / "cut", check=False)
    run(tmp_path / "simclr.py", *flags, "--out", tmp_path / "cut")
    assert same_weights(weights(tmp_path / "whole" / "final.pt"), weights(tmp_path / "cut" / "final.pt"))
    rows = metrics(tmp_path / "cut")
    assert same_rows(metrics(tmp_path / "whole"), rows) and {"L_sup", "L_u", "top1"} <= rows[-1].keys()
