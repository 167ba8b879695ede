"""Linear evaluation (frozen features) and fine-tuning of any s4l checkpoint (Sections 4.3, 6).

    torchrun --nproc_per_node 8 linear_eval.py --ckpt runs/rotation-labels0/final.pt --labels 10
        # Table 1, "Self-sup. Rotation + Linear": 39.75% top-5 (1%: 25.98%)
    torchrun --nproc_per_node 8 linear_eval.py --ckpt runs/rotation-labels0/final.pt --labels 10 \\
        --mode finetune  # Table 1, "Self-sup. Rotation + Fine-tune": 78.53% top-5 (1%: 45.11%)
    torchrun --nproc_per_node 8 linear_eval.py --ckpt runs/rotation-labels10/final.pt \\
        --data $PLACES205 --labels 100  # transfer (Section 6, Figure 2): see metrics.jsonl

Output: runs/linear_eval-<the checkpoint's folder>-<mode>-labels<P> unless --out says otherwise.
--mode linear (default): a logistic regression on the frozen pooled penultimate features (after the
final BN+ReLU), the backbone in eval mode so that its BN statistics stay fixed; the backbone is
checked bit-identical after training. --mode finetune: the whole network from the checkpoint, with
baseline.py's recipe. Forked from baseline.py.
"""
import functools
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# --mode linear: the paper's lr 0.1, wd 1e-4, batch 2048 (Sections 4.3, 6); the schedule of the
# authors' evaluation config (70 epochs, x0.1 at 30 and 50). Self-supervised features on a transfer
# set need far longer (Figure 2, 520 epochs): --epochs 520 --decay-epochs 480,500.
LINEAR = {p: dict(epochs=70, batch_size=2048, lr=0.1, wd=1e-4, warmup=0, decay_epochs=[30, 50])
          for p in (1, 10, 100)}
# --mode finetune: baseline.py's recipes (Section 4.3: "our established protocol").
FINETUNE = {
    10: dict(epochs=200, batch_size=256, lr=0.1, wd=1e-3, warmup=5, decay_epochs=[140, 160, 180]),
    1: dict(epochs=1000, batch_size=256, lr=0.01, wd=1e-2, warmup=10, decay_epochs=[700, 800, 900],
            color=True, eval_every=10),
    100: dict(epochs=90, batch_size=256, lr=0.1, wd=1e-4, warmup=5, decay_epochs=[30, 60, 80]),
}
BACKBONE = ("stem.", "blocks.", "norm.")  # state-dict prefixes of the ResNetV2 trunk; others: heads


def main():
    p = common.parser(__doc__)
    p.add_argument("--ckpt", required=True, help="last.pt or final.pt of any s4l script")
    p.add_argument("--mode", choices=["linear", "finetune"], default="linear")
    p.set_defaults(arch=None, width=None, stem=None)  # the checkpoint's (--img-size: this run's)
    args = p.parse_args()
    ckpt = common.load_checkpoint(args.ckpt)
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    run_name = os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))  # rotation-labels0
    mode = f"{run_name}-{args.mode}-labels{args.labels:g}"
    args.out = args.out or os.path.join("runs", f"{script}-{mode}")
    a = ckpt["args"]
    args.arch, args.width, args.stem = (args.arch or a["arch"], args.width or a["width"],
                                        args.stem or a.get("stem", "imagenet"))
    args.normalize = args.normalize or a.get("normalize", False)  # the network's first layer
    args = common.finish_args(args, LINEAR if args.mode == "linear" else FINETUNE)
    args.color = bool(args.color) and args.mode == "finetune"  # linear: the standard augmentation
    rank, world, device = common.setup(args)

    # ---- data ----
    d = common.load_data(args, rank, world)
    keys = ["arch", "width", "stem", "normalize"]  # the network; on the same data, the views too
    if (ckpt.get("data") or {}).get("classes") == d.record["classes"]:
        keys += ["img_size", "crop"]
        if args.val_split == "custom":  # never score images it trained on
            keys += ["val_split", "val_size", "split_seed", "held_out"]
    common.check_data(ckpt, args.ckpt, d.record, keys, "pass the checkpoint's flags")
    view = functools.partial(common.train_view, size=args.img_size, crop=args.crop)
    batches = common.EpochBatches(d.labeled, args.batch_size, args.seed, rank, world)
    train = common.loader(d.files, d.labels, view, batches, args, device)
    val = common.eval_loader(d.val_files, d.val_labels, d.val_index, args, rank, world, device)

    # ---- model: the checkpoint's trunk, a new class head for this data set ----
    model = common.resnet(args, len(d.classes))
    trunk = {k: v for k, v in ckpt["model"].items() if k.startswith(BACKBONE)}
    missing, _ = model.load_state_dict(trunk, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"}, f"{args.ckpt}: no {sorted(missing)[:3]}"
    nn.init.normal_(model.fc.weight, std=0.01)
    nn.init.zeros_(model.fc.bias)
    if args.mode == "linear":  # MoCo's guards: only the head trains, the trunk runs in eval mode
        model.requires_grad_(False).eval()
        model.fc.requires_grad_(True)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained == ["fc.weight", "fc.bias"], trained
    layout = torch.channels_last if args.channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout)
    opt = torch.optim.SGD(common.param_groups(model, args.wd), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run = common.Run(args, model, opt, scaler, train, d.record, rank, world, device)
    step = run.resume()
    predict = None  # evaluate's default: the class head on the whole model
    if args.mode == "linear":  # the trunk's features (compiled once), no autograd; DDP: the head
        features = torch.compile(model.forward_features) if args.compile else model.forward_features
        head = common.ddp(model.fc, args, device, world)
        net = lambda x: head(features(x).detach())
        predict = lambda x, y: {"": (model.fc(features(x)), y)}
    else:
        net = common.ddp(model, args, device, world)  # trains `model`; its backward averages grads

    # ---- train ----
    for epoch in range(run.epoch, args.epochs):
        for x, hsv, y, _ in run.batches(epoch):
            run.lr(step)
            x = common.to_input(x, hsv, device, args, args.color)  # [B, 3, S, S] in [-1, 1]
            y = y.to(device, non_blocking=True)
            with common.autocast(args, device):
                L_sup = F.cross_entropy(net(x), y)
                loss, losses, images = L_sup, dict(L_sup=L_sup), len(x)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            run.log(step, images, **losses)
            run.save_or_stop()  # last.pt every --save-every minutes; a stop signal: saves, exits
            step += 1

        # ---- evaluate and save ----
        evaluate = functools.partial(common.evaluate, model, val, d, args, device, world, predict)
        run.end_epoch(epoch, evaluate)
    if args.mode == "linear":  # MoCo's sanity check: the frozen trunk, BN statistics too, unchanged
        now = {k: v.cpu() for k, v in model.state_dict().items()}
        changed = [k for k, v in trunk.items() if not torch.equal(now[k], v)]
        assert not changed, f"the frozen backbone changed: {changed[:3]}"
    run.finish()


if __name__ == "__main__":
    common.main_guard(main)
