"""Distil a student from a kdcache cache in a plain PyTorch loop.

The loop below is all there is: kdcache gives the batches (the exact views the teacher saw, with
its stored targets) and the loss; the model, optimiser and schedule are yours. With the settings
of `kdcache train` (AdamW without decay on 1-D weights, linear warm-up then cosine) it trains the
very same weights; the test suite checks that.

    kdcache demo --out kdcache-demo          # makes data and a cache (or use your own)
    python examples/own_loop.py --data kdcache-demo/data/train --cache kdcache-demo/cache.zarr \\
        --student py:kdcache.models.zoo:student_cnn --epochs 16 --batch-size 64 --lr 3e-3 --out own.pt
"""

import argparse
import math

import torch

import kdcache

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--data", required=True)
p.add_argument("--cache", required=True)
p.add_argument("--student", default="py:kdcache.models.zoo:student_cnn")
p.add_argument("--epochs", type=int, default=16)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--weight-decay", type=float, default=0.05)
p.add_argument("--warmup-steps", type=int, default=0)
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--workers", type=int, default=0)
p.add_argument("--device", default="cpu")
p.add_argument("--out", default="own_loop.pt")
args = p.parse_args()

cache = kdcache.open_cache(args.cache)
print(cache)
torch.manual_seed(args.seed)
info = kdcache.create_model(args.student, num_classes=cache.num_classes, resolution=cache.resolution)
model = info.model.to(args.device).train()
loader = kdcache.ReplayLoader(args.data, cache, args.batch_size, workers=args.workers, seed=args.seed,
                              device=args.device, mean=info.mean, std=info.std)

decay = [w for w in model.parameters() if w.ndim > 1]
no_decay = [w for w in model.parameters() if w.ndim <= 1]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                         {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
total = sum(loader.plan(e).steps for e in range(args.epochs))


def lr_at(step):  # linear warm-up, then a cosine to 0 (docs/training.md, "Schedule")
    if step < args.warmup_steps:
        return args.lr * (step + 1) / (args.warmup_steps + 1)
    t = min(1.0, (step - args.warmup_steps) / max(1, total - 1 - args.warmup_steps))
    return args.lr * (0.5 * (1.0 + math.cos(math.pi * t)))


step = 0
for epoch in range(args.epochs):
    loader.set_epoch(epoch)  # epoch e replays view e mod V of every record
    for batch in loader:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = kdcache.kd_loss(model(batch.images), batch.targets, temperature=args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    print(f"epoch {epoch}: {len(loader)} steps, last loss {loss.item():.4f}")
torch.save(model.state_dict(), args.out)
print(f"{step} steps -> {args.out}")
