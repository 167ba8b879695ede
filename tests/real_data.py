r"""README's real-data table: every method of Table 1 and MOAM's three steps on Fashion-MNIST, one budget.

    python ../shared/data/fashion_mnist.py data/fmnist20k --train-per-class 2000   # README, "Real data"
    python tests/real_data.py --data data/fmnist20k --seeds 0 1 --jobs 2             # runs what is missing
    python tests/real_data.py --data data/fmnist20k --seeds 0 1 --report             # the table alone

Every run is a plain command of this repository (printed as it starts); a stopped runner resumes the
stopped runs when started again. --jobs N runs N commands at a time, one thread each.
The budget: 20 epochs of the labeled 10% (620 steps of 64 labeled images, and 64 unlabeled for the
semi-supervised methods), or 2 epochs of all 20,000 images (624 steps) for a run over the whole set
(self-supervised pre-training, Pseudo-Label's student, MOAM step 2); linear evaluation 70 epochs (its
recipe); MOAM step 3 20 epochs (the labeled set's budget, as the paper's step 3 is a fine-tuning of it).
ResNet-18v2 at width 1/4 (all rows, MOAM too), 32 px, --crop pad, --schedule cosine.
README's rows at width 1 (the small-image recipe, 930 steps):
    python tests/real_data.py --data data/fmnist20k --seeds 0 1 --jobs 2 --width 1 --epochs 30 --warmup 3 \
        --flags='--normalize --zero-init-last' --rows baseline s4l_rotation s4l_exemplar --out runs/w1
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = ["--arch", "resnet18", "--img-size", "32", "--crop", "pad", "--schedule", "cosine", "--batch-size", "64",
       "--eval-every", "1000", "--workers", "1"]
WHOLE_SET = ["--epochs", "2", "--warmup", "0.1"]  # 624 steps


def runs(seed, out, width, epochs=20, warmup=1, extra=()):
    """(name, script, flags, the runs it needs), in an order that respects the needs."""
    o = lambda name: os.path.join(out, f"seed{seed}", name)
    w = ["--width", str(width), "--seed", str(seed), *extra]
    labeled = ["--labels", "10", "--epochs", str(epochs), "--warmup", str(warmup)]  # 620 steps at 20
    r = [("baseline", "baseline.py", [*w, *labeled], []),
         ("pseudolabel", "pseudolabel.py", [*w, "--labels", "10", *WHOLE_SET, "--teacher", o("baseline") + "/final.pt"], ["baseline"]),
         ("vat", "vat.py", [*w, *labeled], []),
         ("vat_entmin", "vat.py", [*w, *labeled, "--entmin-weight", "1"], [])]
    for ss in ("rotation", "exemplar"):
        ck = o(f"{ss}_ss") + "/final.pt"
        r += [(f"{ss}_ss", f"{ss}.py", [*w, "--labels", "0", *WHOLE_SET], []),
              (f"{ss}_ss_linear", "linear_eval.py", [*w, "--labels", "10", "--batch-size", "256", "--ckpt", ck], [f"{ss}_ss"]),
              (f"{ss}_ss_finetune", "linear_eval.py", [*w, *labeled, "--mode", "finetune", "--ckpt", ck], [f"{ss}_ss"])]
    r += [("s4l_rotation", "rotation.py", [*w, *labeled], []),
          ("s4l_exemplar", "exemplar.py", [*w, *labeled], [])]
    m = [*w, "--labels", "10"]
    r += [("moam/step1", "moam.py", [*m, "--step", "1", "--epochs", "20", "--warmup", "1"], []),
          ("moam/step2", "moam.py", [*m, "--step", "2", "--epochs", "2"], ["moam/step1"]),
          ("moam/step3", "moam.py", [*m, "--step", "3", "--epochs", "20"], ["moam/step2"])]
    return [(name, [sys.executable, os.path.join(ROOT, script), "--data", DATA, *NET, *flags, "--out", o(name)],
             [o(n) for n in needs], o(name)) for name, script, flags, needs in r]


ROWS = [("Supervised baseline", "baseline"), ("Pseudo-Label", "pseudolabel"), ("VAT", "vat"),
        ("VAT + EntMin", "vat_entmin"), ("Self-sup. Rotation + Linear", "rotation_ss_linear"),
        ("Self-sup. Exemplar + Linear", "exemplar_ss_linear"), ("Self-sup. Rotation + Fine-tune", "rotation_ss_finetune"),
        ("Self-sup. Exemplar + Fine-tune", "exemplar_ss_finetune"), ("S4L-Rotation", "s4l_rotation"),
        ("S4L-Exemplar", "s4l_exemplar"), ("MOAM step 1 (Rotation + VAT + EntMin)", "moam/step1"),
        ("MOAM step 2 (+ pseudo-labels)", "moam/step2"), ("MOAM step 3 (fine-tuned)", "moam/step3")]


def done(folder):
    return os.path.exists(os.path.join(folder, "final.pt"))


def main():
    global DATA
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="runs/real")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=20, help="of the labeled set (baseline, S4L, VAT)")
    p.add_argument("--warmup", type=float, default=1, help="epochs, for the runs of --epochs")
    p.add_argument("--flags", default="", help="more flags for every run: --flags='--normalize --zero-init-last'")
    p.add_argument("--rows", nargs="+", help="only these runs (what they need must be done), e.g. baseline s4l_rotation")
    p.add_argument("--report", action="store_true")
    a = p.parse_args()
    DATA = a.data
    todo = [job for s in a.seeds for job in runs(s, a.out, a.width, a.epochs, a.warmup, a.flags.split())
            if not a.rows or job[0] in a.rows]
    running, log = {}, os.path.join(a.out, "times.jsonl")
    os.makedirs(a.out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if a.jobs > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    t_all = time.time()
    while not a.report and (todo or running):
        for name, (proc, t0, folder) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    sys.exit(f"{folder} failed (exit {proc.returncode}): see {folder}.log")
                with open(log, "a") as f:
                    f.write(json.dumps({"run": folder, "seconds": round(time.time() - t0, 1)}) + "\n")
        for job in list(todo):
            name, cmd, needs, folder = job
            if len(running) >= a.jobs:
                break
            if done(folder):
                todo.remove(job)
            elif all(done(n) for n in needs):
                todo.remove(job)
                print(" ".join(cmd), flush=True)
                os.makedirs(os.path.dirname(folder), exist_ok=True)
                running[folder] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(folder + ".log", "a"),
                                                    stderr=subprocess.STDOUT), time.time(), folder)
        time.sleep(1)
    if not a.report:
        print(f"all runs done in {time.time() - t_all:.0f} s")
    report(a)


def report(a):
    """Top-1 of the last epoch, mean over the seeds and each seed's value, and the wall time of the runs."""
    print(f"| method | top-1 %, mean over seeds {a.seeds} | each seed |\n|---|---|---|")
    for label, name in ROWS:
        if a.rows and name not in a.rows:
            continue
        vals = []
        for s in a.seeds:
            path = os.path.join(a.out, f"seed{s}", name, "metrics.jsonl")
            rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
            vals.append(rows[-1]["top1"] if rows and "top1" in rows[-1] else None)
        got = [v for v in vals if v is not None]
        mean = f"{sum(got) / len(got):.1f}" if got else "-"
        print(f"| {label} | {mean} | {', '.join('-' if v is None else f'{v:.1f}' for v in vals)} |")
    log = os.path.join(a.out, "times.jsonl")
    if os.path.exists(log):
        secs = sum(json.loads(l)["seconds"] for l in open(log))
        print(f"\nsum of the runs' wall times: {secs / 60:.0f} min")


if __name__ == "__main__":
    main()
