"""Independent reference: supervised baseline vs S4L-Rotation (Zhai et al. 2019) on Fashion-MNIST 20k.

Written from the paper alone by someone who had not read this repository's code, for README's comparison;
kept as written but for the two default paths. python tests/reference.py --method baseline|rotation --seed S
"""
import argparse, json, math, os, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument('--method', choices=['baseline', 'rotation'], required=True)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--steps', type=int, default=620)
p.add_argument('--data', default='data/fmnist20k')
p.add_argument('--out', default='reference.jsonl')
args = p.parse_args()
torch.manual_seed(args.seed); np.random.seed(args.seed)
t0 = time.time()

def load(split):
    classes = sorted(os.listdir(f'{args.data}/{split}'))
    xs, ys = [], []
    for c, name in enumerate(classes):
        d = f'{args.data}/{split}/{name}'
        for f in sorted(os.listdir(d)):
            xs.append(np.asarray(Image.open(f'{d}/{f}').convert('RGB'))); ys.append(c)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)

xtr, ytr = load('train'); xva, yva = load('val')
g = torch.Generator().manual_seed(args.seed)
lab_idx = torch.cat([torch.nonzero(ytr == c).flatten()[torch.randperm(int((ytr == c).sum()), generator=g)[:200]]
                     for c in range(10)])
xl_all, yl_all = xtr[lab_idx], ytr[lab_idx]
print(f'train {tuple(xtr.shape)} val {tuple(xva.shape)} labeled {len(lab_idx)}', flush=True)

def scale(x): return x.float() / 127.5 - 1.0

def augment(x):  # x uint8 (B,3,32,32): reflect-pad 4, random 32x32 crop, random hflip, per image
    B = x.shape[0]
    xp = F.pad(x.float(), (4, 4, 4, 4), mode='reflect')
    ox, oy = torch.randint(0, 9, (B,), generator=g), torch.randint(0, 9, (B,), generator=g)
    ar = torch.arange(32)
    rows = (oy[:, None] + ar)[:, None, :, None].expand(B, 3, 32, 40)
    xp = xp.gather(2, rows)
    cols = (ox[:, None] + ar)[:, None, None, :].expand(B, 3, 32, 32)
    xp = xp.gather(3, cols)
    flip = torch.rand(B, generator=g) < 0.5
    xp = torch.where(flip[:, None, None, None], xp.flip(3), xp)
    return xp / 127.5 - 1.0

class PreActBlock(nn.Module):
    def __init__(s, cin, cout, stride):
        super().__init__()
        s.bn1, s.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        s.bn2, s.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        s.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None
    def forward(s, x):
        o = F.relu(s.bn1(x))
        sc = s.short(o) if s.short is not None else x
        o = s.conv1(o)
        o = s.conv2(F.relu(s.bn2(o)))
        return o + sc

class ResNet18v2(nn.Module):
    def __init__(s, widths=(32, 64, 128, 256), stem=32, rot_head=False):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], stem
        for i, w in enumerate(widths):
            layers += [PreActBlock(cin, w, 1 if i == 0 else 2), PreActBlock(w, w, 1)]; cin = w
        s.layers = nn.Sequential(*layers)
        s.bn = nn.BatchNorm2d(cin)
        s.fc = nn.Linear(cin, 10)
        s.rot = nn.Linear(cin, 4) if rot_head else None
        for m in s.modules():
            if isinstance(m, nn.Conv2d): nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    def forward(s, x):
        h = F.relu(s.bn(s.layers(s.stem(x)))).mean((2, 3))
        return s.fc(h), (s.rot(h) if s.rot is not None else None)

rot = args.method == 'rotation'
model = ResNet18v2(rot_head=rot)
decay = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
ids = {id(q) for q in decay}
no_decay = [q for q in model.parameters() if id(q) not in ids]
opt = torch.optim.SGD([{'params': decay, 'weight_decay': 1e-3}, {'params': no_decay, 'weight_decay': 0.0}],
                      lr=0.1, momentum=0.9)
BS, LR, STEPS = 64, 0.1, args.steps
SPE = len(xl_all) // BS  # 31 steps per epoch, last partial batch dropped
WARM = SPE
def lr_at(t):  # t = 0-based step index; value used for update t
    if t < WARM: return LR * t / WARM
    return 0.5 * LR * (1 + math.cos(math.pi * (t - WARM) / (STEPS - WARM)))

def stream(n, drop_last):  # endless reshuffled index batches
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, (n // BS) * BS if drop_last else n, BS): yield perm[i:i + BS]
lab_stream, unl_stream = stream(len(xl_all), True), stream(len(xtr), True)

def rot4(x):  # (B,C,H,W) -> (4B,...) ordered by rotation k=0..3 (counter-clockwise 90k degrees)
    return torch.cat([torch.rot90(x, k, (2, 3)) for k in range(4)])

model.train()
for t in range(STEPS):
    for grp in opt.param_groups: grp['lr'] = lr_at(t)
    bi = next(lab_stream); xl, yl = augment(xl_all[bi]), yl_all[bi]
    if not rot:
        logits, _ = model(xl); loss = F.cross_entropy(logits, yl); lrot = torch.tensor(0.)
    else:
        xu = augment(xtr[next(unl_stream)])
        x = torch.cat([rot4(xl), rot4(xu)])  # 256 labeled-rotated + 256 unlabeled-rotated, one BN batch
        r = torch.arange(4).repeat_interleave(BS).repeat(2)
        logits, rlog = model(x)
        lsup = F.cross_entropy(logits[:4 * BS], yl.repeat(4))
        lrot = F.cross_entropy(rlog, r)
        loss = lsup + lrot
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if t % 31 == 0 or t == STEPS - 1:
        print(f'step {t} lr {lr_at(t):.4f} loss {loss.item():.4f} rot {lrot.item():.4f} {time.time()-t0:.0f}s', flush=True)

model.eval(); correct = 0
with torch.no_grad():
    for i in range(0, len(xva), 500):
        correct += (model(scale(xva[i:i + 500]))[0].argmax(1) == yva[i:i + 500]).sum().item()
top1 = 100.0 * correct / len(xva); secs = time.time() - t0
print(f'RESULT method={args.method} seed={args.seed} top1={top1:.2f} seconds={secs:.0f}', flush=True)
if args.steps == 620:
    with open(args.out, 'a') as f: f.write(json.dumps({'method': args.method, 'seed': args.seed, 'top1': top1, 'seconds': round(secs, 1)}) + '\n')
