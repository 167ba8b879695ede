# ALGO LOGIC: the method (this docstring is also --help)
"""Supervised baseline: a ResNet50v2 trained on the labeled subset alone (S4L paper, Section 4.1).

    torchrun --nproc_per_node 8 baseline.py --labels 10   # Table 1: 80.43% top-5, 56.35% top-1
    torchrun --nproc_per_node 8 baseline.py --labels 1    # Table 1: 48.43% top-5, 25.39% top-1

Every method script is forked from this one: `diff baseline.py rotation.py` shows the method. What
a method changes sits in the blocks marked ALGO LOGIC (each with its END); the rest is the same in
every script.
"""
# END ALGO LOGIC
import functools

import torch
import torch.nn.functional as F

import common

# ALGO LOGIC: the paper's recipes (Section 4.1), chosen by --labels; each entry its flag's default
RECIPES = {
    10: dict(epochs=200, batch_size=256, lr=0.1, wd=1e-3, warmup=5, decay_epochs=[140, 160, 180]),
    1: dict(epochs=1000, batch_size=256, lr=0.01, wd=1e-2, warmup=10, decay_epochs=[700, 800, 900],
            color=True, eval_every=10),  # the released config warms up for 5 epochs; the paper: 10
    100: dict(epochs=90, batch_size=256, lr=0.1, wd=1e-4, warmup=5, decay_epochs=[30, 60, 80]),
}
# END ALGO LOGIC


def main():
    p = common.parser(__doc__)
    args = common.finish_args(p.parse_args(), RECIPES)
    rank, world, device = common.setup(args)

    # ---- data ----
    d = common.load_data(args, rank, world)
    view = functools.partial(common.train_view, size=args.img_size, crop=args.crop)
    batches = common.EpochBatches(d.labeled, args.batch_size, args.seed, rank, world)
    train = common.loader(d.files, d.labels, view, batches, args, device)
    val = common.eval_loader(d.val_files, d.val_labels, d.val_index, args, rank, world, device)

    # ---- model ----
    model = common.resnet(args, len(d.classes))
    layout = torch.channels_last if args.channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout)
    opt = torch.optim.SGD(common.param_groups(model, args.wd), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run = common.Run(args, model, opt, scaler, train, d.record, rank, world, device)
    step = run.resume()
    net = common.ddp(model, args, device, world)  # trains `model`; its backward averages gradients

    # ---- train ----
    for epoch in range(run.epoch, args.epochs):
        for x, hsv, y, _ in run.batches(epoch):
            run.lr(step)
            x = common.to_input(x, hsv, device, args, args.color)  # [B, 3, S, S] in [-1, 1]
            y = y.to(device, non_blocking=True)
            with common.autocast(args, device):
                # ALGO LOGIC: the loss of one step and the images it showed the network
                L_sup = F.cross_entropy(net(x), y)  # the labeled batch x_l
                loss, losses, images = L_sup, dict(L_sup=L_sup), len(x)
                # END ALGO LOGIC
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            run.log(step, images, **losses)
            run.save_or_stop()  # last.pt every --save-every minutes; a stop signal: saves, exits
            step += 1

        # ---- evaluate and save ----
        evaluate = functools.partial(common.evaluate, model, val, d, args, device, world)
        run.end_epoch(epoch, evaluate)
    run.finish()


if __name__ == "__main__":
    common.main_guard(main)
