"""A training run's state on disk and in memory: where it is, what it has measured, how it resumes.

- ``RunState``     the counters a run carries from step to step (position, time, images, best
                   validation); ``to_checkpoint``/``from_checkpoint`` make and read ``checkpoint.pt``
                   together with the model, optimiser, scaler and RNG state.
- ``Meter``        training time (steps and data waits, not evaluation or checkpoints: ``paused()``)
                   and the logging window (loss terms, images/s; besides loss/kd/ce, any other float
                   term a task returns is averaged and logged under its own name).
- ``MetricsLog``   rank 0's ``metrics.jsonl`` (cut back to the checkpoint's length on resume, so no
                   step is logged twice) and TensorBoard events when tensorboard is installed.
- ``atomic_save``/``atomic_json``   write to a temporary file, then ``os.replace``: a reader never
                   sees half a file.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_VERSION = 1


def atomic_save(obj, path: str) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic(path, write)


def atomic_npy(arr, path: str) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, arr)

    _atomic(path, write)


def _atomic(path: str, write) -> None:
    """``write(tmp)`` then rename over ``path``; on failure (a full disk, a file-size limit) the
    temporary file is removed and the error names the file, the likely cause and how to go on."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        from ..errors import KdcacheError
        from ..runtime import space_problems

        causes = space_problems(path)
        raise KdcacheError(
            f"cannot write {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            + (f": {'; '.join(causes)}" if causes else "")
            + ". The last complete checkpoint is kept: free some space (or raise the limit), then re-run the same "
            "command with --resume") from None


def _no_best() -> dict:
    return {"best_val_top1": None, "best_val_top5": None, "best_step": None}


@dataclass
class RunState:
    """Where a run is and what it has measured. ``epoch``/``step_in_epoch`` name the next batch."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    images_seen: int = 0
    train_time_s: float = 0.0  # steps plus data waits, all processes of this run so far
    train_cpu_s: float = 0.0  # the main process's CPU time in those
    wall_time_s: float = 0.0  # wall time of earlier processes of this run (before a resume)
    best: dict = field(default_factory=_no_best)
    last_val: dict = field(default_factory=dict)

    def advance(self, images: int) -> None:
        self.global_step += 1
        self.step_in_epoch += 1
        self.images_seen += images

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    def record_val(self, result: dict) -> None:
        self.last_val = dict(result)
        if self.best["best_val_top1"] is None or result["val_top1"] > self.best["best_val_top1"]:
            self.best = {"best_val_top1": result["val_top1"], "best_val_top5": result["val_top5"],
                         "best_step": self.global_step}

    def to_checkpoint(self, model, optimizer, scaler, device, config: dict, metrics_bytes: int,
                      wall_now: float) -> dict:
        """Everything ``checkpoint.pt`` holds (``wall_now``: this process's wall time so far)."""
        st = asdict(self)
        st["wall_time_s"] = self.wall_time_s + wall_now
        return {
            "version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": rng_state(device),
            "metrics_bytes": metrics_bytes, "config": config, **st,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RunState":
        return cls(
            epoch=int(ckpt["epoch"]), step_in_epoch=int(ckpt["step_in_epoch"]), global_step=int(ckpt["global_step"]),
            images_seen=int(ckpt["images_seen"]), train_time_s=float(ckpt["train_time_s"]),
            train_cpu_s=float(ckpt.get("train_cpu_s", 0.0)), wall_time_s=float(ckpt.get("wall_time_s", 0.0)),
            best=dict(ckpt["best"]), last_val=dict(ckpt["last_val"]),
        )


def restore(ckpt: dict, model, optimizer, scaler, device) -> RunState:
    """Load a checkpoint's model, optimiser, scaler and RNG state; return its ``RunState``."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)
    return RunState.from_checkpoint(ckpt)


def rng_state(device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device) -> None:
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


class Meter:
    """Training time and the logging window. Time between steps counts (it is spent waiting for
    data); time inside ``paused()`` (evaluation, checkpoints) does not."""

    TERMS = ("loss", "kd", "ce")

    def __init__(self, state: RunState, device, world: int):
        self.state, self.device, self.world = state, device, world
        self._reset_window()
        self.resume()

    def resume(self) -> None:
        self.t_mark, self.c_mark = time.perf_counter(), time.process_time()

    @contextmanager
    def paused(self):
        yield
        self.resume()

    def _reset_window(self) -> None:
        self.sums = torch.zeros(len(self.TERMS), dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(len(self.TERMS), dtype=torch.float64, device=self.device)
        # Further float terms a task returns (e.g. self-distillation's per-exit losses): name -> [sum, count],
        # in the order first seen (the same on every rank: every rank runs the same task).
        self.extra: dict[str, list] = {}
        self.steps, self.images, self.seconds = 0, 0, 0.0

    def step(self, out: dict, images: int) -> None:
        """Count one optimiser step that trained on ``images`` images (all ranks) with these loss terms."""
        for j, name in enumerate(self.TERMS):
            v = out.get(name)
            if v is not None:  # stays on the device: no synchronisation per step
                self.sums[j] += v.detach().double()
                self.counts[j] += 1
        for name, v in out.items():
            if name in self.TERMS or v is None or isinstance(v, bool):
                continue
            if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point() or isinstance(v, (int, float)):
                acc = self.extra.setdefault(name, [torch.zeros((), dtype=torch.float64, device=self.device), 0])
                acc[0] += v.detach().double().reshape(()) if isinstance(v, torch.Tensor) else float(v)
                acc[1] += 1
        now, cnow = time.perf_counter(), time.process_time()
        self.state.train_time_s += now - self.t_mark
        self.state.train_cpu_s += cnow - self.c_mark
        self.seconds += now - self.t_mark
        self.t_mark, self.c_mark = now, cnow
        self.steps += 1
        self.images += images

    def window(self) -> dict:
        """Mean loss terms (over ranks) and images/s since the last window; starts a new one."""
        sums, counts = self.sums.clone(), self.counts.clone()
        if self.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        rec = {name: (sums[j] / counts[j]).item() for j, name in enumerate(self.TERMS) if counts[j] > 0}
        if self.extra:
            names = list(self.extra)
            es = torch.stack([self.extra[n][0] for n in names])
            ec = torch.tensor([float(self.extra[n][1]) for n in names], dtype=torch.float64, device=self.device)
            if self.world > 1:
                dist.all_reduce(es)
                dist.all_reduce(ec)
            rec.update({n: (es[j] / ec[j]).item() for j, n in enumerate(names) if ec[j] > 0})
        rec["images_per_s"] = self.images / max(self.seconds, 1e-9)
        self._reset_window()
        return rec


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` and TensorBoard events; a no-op on other ranks."""

    def __init__(self, out: str, enabled: bool, truncate_to: int | None):
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if truncate_to is not None and os.path.exists(self.path):
            with open(self.path, "r+b") as f:  # drop lines logged after the checkpoint we resume from
                f.truncate(truncate_to)
        self.f = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def offset(self) -> int:
        if not self.enabled:
            return 0
        self.f.flush()
        return self.f.tell()

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()
