"""A minimal, independent S4L-Rotation reference (paper Sec. 3.1 and 4.4) on top of tests/reference_timm.py's baseline:
timm's resnetv2_18 on 10% of the labels of the Fashion-MNIST tree, in memory, on CPU. Needs timm.

    python tests/reference_timm_rotation.py --data data/fmnist20k --seed 0   # appends a row to --out

Per step: 64 labeled + 64 unlabeled images, each augmented, then all 4 rotations of each: 512 images, one forward pass.
Loss = L_sup + w * L_rot, w = 1. Choices where the paper is silent (or where this small setting forces one):
- Unlabeled pool = all 20,000 training images (the 2,000 labeled ones included, labels unused); both batches drawn
  uniformly with replacement, independently of each other (equal batch sizes, as in Sec. 3.1).
- Augmentation (reflect pad 4, random 32 crop, h-flip) is drawn once per image; its four rotations share that crop
  and flip. Rotation k (label k = 0..3) is torch.rot90(x, k, dims=(2, 3)), i.e. k * 90 degrees counter-clockwise.
- L_rot = mean cross-entropy over all 512 images (labeled and unlabeled: Sec. 3.1 applies it to both); Eq. (2)'s
  sum over images is taken as a batch mean. L_sup = mean cross-entropy of the class head over the 256 rotated
  copies (4 x 64) of the labeled images (Sec. 4.4: supervised loss on all copies).
- One batch-norm batch of 512 (train mode); evaluation uses the running statistics.
- Rotation head: nn.Linear(512, 4) on the same pooled pre-logits features as the class head (forward_features +
  forward_head(pre_logits=True)), initialised like timm's head.fc (weight N(0, 0.01), bias 0).
- Optimiser, lr 0.1, weight decay 1e-3 (on every parameter, both heads), schedule and step count unchanged from the
  baseline (Sec. 4.4: the optimal lr and wd were the supervised baseline's); lr not rescaled for the 8x larger batch.
- Evaluation: whole val set, upright images only, class head, top-1 after the last step (no test-time averaging over
  rotations, as in the paper's reported numbers).
"""
import argparse, json, math, os, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F, timm
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=0)
p.add_argument("--data", default="data/fmnist20k")
p.add_argument("--steps", type=int, default=930)
p.add_argument("--out", default="runs/reference_timm_rotation.jsonl")
p.add_argument("--threads", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(a.threads); t0 = time.time()

def load(split):  # whole split as uint8 NCHW tensor + int64 labels; classes sorted by folder name
    root = os.path.join(a.data, split); classes = sorted(os.listdir(root)); xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, name))):
            xs.append(np.array(Image.open(os.path.join(root, name, f)).convert("RGB"))); ys.append(c)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys), classes

xtr, ytr, classes = load("train"); xva, yva, _ = load("val")
xf = xtr.double() / 255
mean = xf.mean(dim=(0, 2, 3)).float().view(1, 3, 1, 1); std = xf.std(dim=(0, 2, 3)).float().view(1, 3, 1, 1); del xf
print(f"train {tuple(xtr.shape)} val {tuple(xva.shape)} classes {classes}\n"
      f"mean {mean.flatten().tolist()} std {std.flatten().tolist()}")

g = torch.Generator().manual_seed(a.seed)  # labeled subset: 200 random images per class (as reference_timm.py)
lab = torch.cat([torch.nonzero(ytr == c).flatten()[torch.randperm(2000, generator=g)[:200]] for c in range(10)])
xl, yl = xtr[lab], ytr[lab]
print(f"labeled {len(lab)} per-class {torch.bincount(yl).tolist()} first idx {lab[:5].tolist()}")

torch.manual_seed(a.seed)
model = timm.create_model("resnetv2_18", pretrained=False, num_classes=10)
rot_head = nn.Linear(model.num_features, 4); nn.init.normal_(rot_head.weight, 0.0, 0.01); nn.init.zeros_(rot_head.bias)
params = sum(q.numel() for q in list(model.parameters()) + list(rot_head.parameters()))
assert params == 11179850 + 512 * 4 + 4, params
print(f"params {params} (backbone+class head 11179850, rotation head {512 * 4 + 4})")

norm = lambda x: (x.float() / 255 - mean) / std

def augment(x):  # per image: reflect pad 4, random 32x32 crop, random h-flip
    n = x.shape[0]; xp = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (n,)), torch.randint(0, 9, (n,))
    r = (i.view(n, 1) + torch.arange(32)).view(n, 1, 32, 1); c = (j.view(n, 1) + torch.arange(32)).view(n, 1, 1, 32)
    out = xp[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), r, c]
    flip = torch.rand(n) < 0.5; out[flip] = out[flip].flip(3)
    return out

@torch.no_grad()
def evaluate():  # upright val images, class head
    model.eval()
    correct = sum((model(norm(xva[k:k + 500])).argmax(1) == yva[k:k + 500]).sum().item()
                  for k in range(0, len(xva), 500))
    model.train(); return 100.0 * correct / len(xva)

LR, S, B = 0.1, a.steps, 64; W = int(round(0.1 * S))
def lr_at(s):  # s = 0..S-1; linear warmup lr/25 -> lr over W steps, then cosine lr -> lr/1e4 at the last step
    if s < W: return LR / 25 + (LR - LR / 25) * s / W
    t = (s - W) / max(1, S - 1 - W); return LR / 1e4 + (LR - LR / 1e4) * 0.5 * (1 + math.cos(math.pi * t))

opt = torch.optim.SGD(list(model.parameters()) + list(rot_head.parameters()), lr=LR, momentum=0.9, weight_decay=1e-3)
y_rot = torch.arange(4).repeat_interleave(2 * B)  # block k of 128 = [64 labeled, 64 unlabeled] rotated by k * 90 deg
is_lab = (torch.arange(2 * B) < B).repeat(4)
model.train(); ls, lr_, top1_at, t1 = [], [], {}, time.time()
for s in range(S):
    for gr in opt.param_groups: gr["lr"] = lr_at(s)
    il, iu = torch.randint(0, len(xl), (B,)), torch.randint(0, len(xtr), (B,))  # uniform with replacement
    x = (augment(torch.cat([xl[il], xtr[iu]])) / 255 - mean) / std  # (128, 3, 32, 32)
    x = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])  # (512, 3, 32, 32), one BN batch
    feats = model.forward_features(x)
    logits_cls = model.forward_head(feats)[is_lab]  # (256, 10)
    logits_rot = rot_head(model.forward_head(feats, pre_logits=True))  # (512, 4)
    l_sup = F.cross_entropy(logits_cls, yl[il].repeat(4)); l_rot = F.cross_entropy(logits_rot, y_rot)
    loss = l_sup + 1.0 * l_rot
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); ls.append(l_sup.item()); lr_.append(l_rot.item())
    if (s + 1) == 31 or (s + 1) % W == 0 or (s + 1) == S:
        top1_at[s + 1] = evaluate(); n = min(len(ls), W)
        print(f"step {s + 1} lr {lr_at(s):.5f} L_sup(last {n}) {np.mean(ls[-n:]):.4f} L_rot {np.mean(lr_[-n:]):.4f} "
              f"val top1 {top1_at[s + 1]:.2f} t {time.time() - t1:.0f}s", flush=True)
top1 = top1_at[S]
row = dict(seed=a.seed, top1=top1, seconds=round(time.time() - t0, 1), steps=S, params=params,
           train_seconds=round(time.time() - t1, 1), top1_at=top1_at, threads=a.threads)
print(json.dumps(row))
os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")
