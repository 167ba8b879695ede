"""A minimal supervised baseline written by a helper from the issue's description alone (README, "Small images"):
timm's resnetv2_18 on 10% of the labels of the Fashion-MNIST tree, in memory, on CPU. Needs timm.

    python tests/reference_timm.py --data data/fmnist20k --seed 0   # appends a row to --out
"""
import argparse, json, math, os, time
import numpy as np, torch, torch.nn.functional as F, timm
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=0)
p.add_argument("--data", default="data/fmnist20k")
p.add_argument("--steps", type=int, default=930)
p.add_argument("--out", default="runs/reference_timm.jsonl")
p.add_argument("--zero_init_last", action="store_true", help="non-default: also zero the last conv of each block")
a = p.parse_args()
t0 = time.time()

def load(split):  # whole split as uint8 NCHW tensor + int64 labels; classes sorted by folder name
    root = os.path.join(a.data, split); classes = sorted(os.listdir(root)); xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, name))):
            xs.append(np.array(Image.open(os.path.join(root, name, f)).convert("RGB"))); ys.append(c)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys), classes

xtr, ytr, classes = load("train"); xva, yva, _ = load("val")
xf = xtr.double() / 255
mean = xf.mean(dim=(0, 2, 3)).float().view(1, 3, 1, 1); std = xf.std(dim=(0, 2, 3)).float().view(1, 3, 1, 1); del xf
print(f"train {tuple(xtr.shape)} val {tuple(xva.shape)} classes {classes}\nmean {mean.flatten().tolist()} std {std.flatten().tolist()}")

g = torch.Generator().manual_seed(a.seed)  # labeled subset: 200 random images per class
lab = torch.cat([torch.nonzero(ytr == c).flatten()[torch.randperm(2000, generator=g)[:200]] for c in range(10)])
xl, yl = xtr[lab], ytr[lab]
print(f"labeled {len(lab)} per-class {torch.bincount(yl).tolist()} first idx {lab[:5].tolist()}")

torch.manual_seed(a.seed)
model = timm.create_model("resnetv2_18", pretrained=False, num_classes=10)
if a.zero_init_last:
    for m in model.modules():
        if hasattr(m, "zero_init_last"): m.zero_init_last()
params = sum(q.numel() for q in model.parameters())
assert params == 11179850, params
print(f"params {params}; head.fc.weight norm {model.head.fc.weight.norm():.4f} (std {model.head.fc.weight.std():.5f}), "
      f"head.fc.bias norm {model.head.fc.bias.norm():.4f}; stages.0.blocks.0.conv2 norm {model.stages[0].blocks[0].conv2.weight.norm():.4f}; "
      f"stages.3.blocks.1.conv2 norm {model.stages[3].blocks[1].conv2.weight.norm():.4f}")

norm = lambda x: (x.float() / 255 - mean) / std

def augment(x):  # per image: reflect pad 4, random 32x32 crop, random h-flip
    n = x.shape[0]; xp = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (n,)), torch.randint(0, 9, (n,))
    r = (i.view(n, 1) + torch.arange(32)).view(n, 1, 32, 1); c = (j.view(n, 1) + torch.arange(32)).view(n, 1, 1, 32)
    out = xp[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), r, c]
    flip = torch.rand(n) < 0.5; out[flip] = out[flip].flip(3)
    return out

@torch.no_grad()
def evaluate():
    model.eval(); correct = sum((model(norm(xva[k:k + 500])).argmax(1) == yva[k:k + 500]).sum().item() for k in range(0, len(xva), 500))
    model.train(); return 100.0 * correct / len(xva)

LR, S = 0.1, a.steps; W = int(round(0.1 * S))
def lr_at(s):  # s = 0..S-1; linear warmup lr/25 -> lr over W steps, then cosine lr -> lr/1e4 at the last step
    if s < W: return LR / 25 + (LR - LR / 25) * s / W
    t = (s - W) / max(1, S - 1 - W); return LR / 1e4 + (LR - LR / 1e4) * 0.5 * (1 + math.cos(math.pi * t))

opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)
model.train(); losses, top1_at, t1 = [], {}, time.time()
for s in range(S):
    for gr in opt.param_groups: gr["lr"] = lr_at(s)
    idx = torch.randint(0, len(xl), (64,))  # uniform with replacement
    x = (augment(xl[idx]) / 255 - mean) / std
    loss = F.cross_entropy(model(x), yl[idx])
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); losses.append(loss.item())
    if (s + 1) == 31 or (s + 1) % W == 0 or (s + 1) == S:
        top1_at[s + 1] = evaluate()
        print(f"step {s + 1} lr {lr_at(s):.5f} loss(last {min(len(losses), W)}) {np.mean(losses[-W:]):.4f} "
              f"val top1 {top1_at[s + 1]:.2f} t {time.time() - t1:.0f}s", flush=True)
top1 = top1_at[S]
row = dict(seed=a.seed, top1=top1, seconds=round(time.time() - t0, 1), steps=S, params=params,
           train_seconds=round(time.time() - t1, 1), top1_at=top1_at, zero_init_last=a.zero_init_last)
print(json.dumps(row))
os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")
