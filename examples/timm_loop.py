"""A kdcache cache inside a timm-style recipe: timm's optimiser factory, its cosine scheduler stepped
per update, an EMA of the weights (ModelEmaV3), and AMP with bfloat16 on CUDA.

kdcache supplies only the data path and the loss: the exact views the teacher saw (ReplayLoader)
and the sparse KD loss on the stored targets (kd_loss, the fused Triton kernel on CUDA). The rest
is timm's, as in its train.py.

    python examples/timm_loop.py --data kdcache-demo/data/train --cache kdcache-demo/cache.zarr \\
        --val-data kdcache-demo/data/val --model resnet18 --epochs 16 --batch-size 64
"""

import argparse
import contextlib

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

import kdcache

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--data", required=True)
p.add_argument("--cache", required=True)
p.add_argument("--val-data", default=None, help="labelled shards: the EMA model's top-1 at the end")
p.add_argument("--model", default="resnet18", help="a timm model name")
p.add_argument("--epochs", type=int, default=16)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--warmup-epochs", type=int, default=1)
p.add_argument("--ema-decay", type=float, default=0.998)
p.add_argument("--label-weight", type=float, default=0.0, help="add this much CE on the shards' labels")
p.add_argument("--workers", type=int, default=2)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--out", default="timm_loop.pt")
args = p.parse_args()

cache = kdcache.open_cache(args.cache)
model = timm.create_model(args.model, num_classes=cache.num_classes).to(args.device)
cfg = model.pretrained_cfg
loader = kdcache.ReplayLoader(args.data, cache, args.batch_size, workers=args.workers, device=args.device,
                              mean=cfg.get("mean", (0.485, 0.456, 0.406)), std=cfg.get("std", (0.229, 0.224, 0.225)),
                              labels=args.label_weight > 0, channels_last=args.device == "cuda")
if args.device == "cuda":
    model = model.to(memory_format=torch.channels_last)
optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=0.05)
steps = len(loader)
scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps, warmup_t=args.warmup_epochs * steps,
                              warmup_lr_init=args.lr * 0.01, lr_min=0.0, t_in_epochs=False)
ema = ModelEmaV3(model, decay=args.ema_decay)
amp = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else contextlib.nullcontext)

update = 0
for epoch in range(args.epochs):
    loader.set_epoch(epoch)
    model.train()
    for batch in loader:
        with amp():
            logits = model(batch.images)
        loss = kdcache.kd_loss(logits, batch.targets, temperature=1.0, labels=batch.labels,
                               label_weight=args.label_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update += 1
        scheduler.step_update(num_updates=update)
        ema.update(model, step=update)
    print(f"epoch {epoch}: loss {loss.item():.4f}, lr {optimizer.param_groups[0]['lr']:.2e}")

if args.val_data:  # the EMA weights on the centre crop of every labelled image, as `kdcache evaluate` does
    val = kdcache.ReplayLoader(args.val_data, None, 256, res=cache.resolution, device=args.device, views=1,
                               aug=kdcache.AugSpec(name="center_crop", flip=False), labels=True, seed=0,
                               mean=loader.binding.mean, std=loader.binding.std)
    val.set_epoch(0)
    ema.module.eval()
    right = seen = 0
    with torch.no_grad():
        for batch in val:
            right += int(ema.module(batch.images).argmax(1).eq(batch.labels).sum())
            seen += len(batch)
    print(f"EMA top-1 on {seen} validation images: {100 * right / max(seen, 1):.1f}%")
torch.save(ema.module.state_dict(), args.out)
print(f"{update} updates -> {args.out} (EMA weights)")
