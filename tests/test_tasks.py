"""The pieces of the trainer on their own: tasks, the run state, the meter, and the CLI's defaults."""

from __future__ import annotations

import dataclasses
import json

import click
import pytest
import torch
import torch.nn.functional as F

from conftest import NUM_CLASSES, TEACHER
from kdcache.learn.config import SelfDistillConfig, TrainConfig
from kdcache.tools.config import PrecomputeConfig
from kdcache.learn.losses import sparse_kd_loss
from kdcache.models.factory import create_model
from kdcache.learn.replay import ReplayStream, StreamConfig, epoch_batches, prepare_shards
from kdcache.learn.run_state import Meter, RunState
from kdcache.data.shards import expand_urls
from kdcache.cache.store import CacheReader
from kdcache.learn.tasks import CachedKDTask, LabelsTask, LiveKDTask, StudentInput
from kdcache.models.teacher import load_teacher

RES = 32
STUDENT = "py:kdcache.models.zoo:tiny_cnn"


@pytest.fixture(scope="module")
def batch(dataset, cache):
    reader = CacheReader(str(cache))
    stream = ReplayStream(prepare_shards(expand_urls(str(dataset)), reader, True),
                          StreamConfig(batch_size=6, res=RES, cache=str(cache), need_labels=True,
                                       num_classes=NUM_CLASSES))
    b = next(iter(epoch_batches(stream, 0)))
    assert b.mixed()  # the conftest cache mixes: soft labels
    return b


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    info = create_model(STUDENT, num_classes=NUM_CLASSES, resolution=RES)
    return info.model.train(), StudentInput(info.mean, info.std, torch.device("cpu"))


def test_each_task_returns_its_loss_terms(batch, student, cache, teacher_weights):
    model, inputs = student
    z = inputs.logits(model, batch.pixels("cpu"))
    soft = batch.label_targets(NUM_CLASSES, "cpu")
    ce = F.cross_entropy(z.float(), soft)

    out = LabelsTask(inputs, NUM_CLASSES)(model, batch)
    assert out["kd"] is None and torch.equal(out["loss"], ce) and out["loss"].requires_grad

    out = CachedKDTask(inputs, NUM_CLASSES, temperature=2.0, label_weight=0.3)(model, batch)
    want = sparse_kd_loss(z, batch.logprobs, batch.classes, temperature=2.0, labels=soft, label_weight=0.3)
    torch.testing.assert_close(out["loss"], want)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["kd"], want - 0.3 * ce)
    assert out["loss"].requires_grad and not out["kd"].requires_grad and not out["ce"].requires_grad

    teacher, _ = load_teacher(TEACHER, torch.device("cpu"), num_classes=NUM_CLASSES, weights=str(teacher_weights),
                              resolution=RES)
    man = CacheReader(str(cache)).manifest["teacher"]
    live = LiveKDTask(inputs, NUM_CLASSES, teacher, 3, man["mean"], man["std"], temperature=2.0, label_weight=0.3)
    out_live = live(model, batch)
    # the live teacher on the same pixels gives the cached targets: the same loss
    torch.testing.assert_close(out_live["loss"], out["loss"], rtol=0, atol=0)


def test_run_state_round_trips_through_a_checkpoint(student):
    model, _ = student
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    st = RunState(epoch=2, step_in_epoch=3, global_step=17, images_seen=99, train_time_s=1.5, train_cpu_s=0.5,
                  wall_time_s=4.0)
    st.record_val({"val_top1": 0.5, "val_top5": 0.9, "val_images": 10})
    st.record_val({"val_top1": 0.4, "val_top5": 0.95, "val_images": 10})  # not better: best stays
    ck = st.to_checkpoint(model, opt, scaler, torch.device("cpu"), {"a": 1}, metrics_bytes=123, wall_now=2.0)
    for key in ("version", "model", "optimizer", "scaler", "epoch", "step_in_epoch", "global_step", "rng", "best",
                "last_val", "train_time_s", "train_cpu_s", "images_seen", "metrics_bytes", "wall_time_s", "config"):
        assert key in ck, key  # the checkpoint layout older runs resume from
    back = RunState.from_checkpoint(ck)
    assert back == dataclasses.replace(st, wall_time_s=6.0)
    assert back.best == {"best_val_top1": 0.5, "best_val_top5": 0.9, "best_step": 17}
    assert back.last_val["val_top1"] == 0.4


def test_meter_counts_steps_not_pauses(monkeypatch):
    import types
    from kdcache.learn import run_state

    clock = types.SimpleNamespace(now=100.0)  # a clock the test moves: no dependence on the machine's speed
    monkeypatch.setattr(run_state, "time", types.SimpleNamespace(perf_counter=lambda: clock.now,
                                                                 process_time=lambda: clock.now / 2))
    st = RunState()
    m = Meter(st, torch.device("cpu"), world=1)
    clock.now += 0.5  # the first step (waiting for data counts)
    m.step({"loss": torch.tensor(2.0), "kd": torch.tensor(1.5), "ce": None}, images=8)
    with m.paused():
        clock.now += 7.0  # evaluation: not training time
    clock.now += 1.5
    m.step({"loss": torch.tensor(4.0), "kd": torch.tensor(3.5), "ce": None}, images=8)
    assert st.train_time_s == pytest.approx(2.0) and st.train_cpu_s == pytest.approx(1.0)
    w = m.window()
    assert w["loss"] == 3.0 and w["kd"] == 2.5 and "ce" not in w
    assert w["images_per_s"] == pytest.approx(16 / st.train_time_s)
    assert m.window()["images_per_s"] == 0.0  # a new window


def test_metrics_log_the_kd_and_ce_split(dataset, cache, tmp_path):
    from conftest import with_aug
    from kdcache.learn.trainer import train

    out = tmp_path / "run"
    train(TrainConfig(**with_aug(dict(data=str(dataset), cache=str(cache), student=STUDENT, out=str(out), epochs=1,
                                      batch_size=4, res=RES, label_weight=0.5, workers=0, device="cpu",
                                      progress=False, log_every=1))))
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert steps and all({"kd", "ce", "lr", "images_per_s"} <= set(l) for l in steps)
    for l in steps:
        assert l["loss"] == pytest.approx(l["kd"] + 0.5 * l["ce"], rel=1e-5)


def _command_defaults(name: str) -> dict:
    """The value each option of a command takes when it is not given."""
    from kdcache.cli import cli

    cmd = cli.get_command(None, name)
    ctx = click.Context(cmd)
    out = {}
    for p in cmd.params:
        if not isinstance(p, click.Option):
            continue
        d = p.get_default(ctx)
        if p.is_flag and not isinstance(d, bool):
            d = False  # click leaves a plain flag's default unset: off
        if d is None or isinstance(d, bool) or type(d).__name__ != "Sentinel":
            out[p.name] = d if d is None else p.type_cast_value(ctx, d)
    return out


@pytest.mark.parametrize("command, config", [("precompute", PrecomputeConfig), ("train", TrainConfig)])
def test_cli_defaults_are_the_configs_defaults(command, config):
    """Every flag that sets a config field defaults to that field's default (one source)."""
    opts = _command_defaults(command)
    checked = 0
    for f in dataclasses.fields(config):
        if f.name not in opts or f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue
        want = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        got = opts[f.name]
        if f.name == "progress":  # the flag is --no-progress
            continue
        if f.name == "self_distill":  # a switch: off on the command line is no group (None) in the config
            assert got is False and want is None, (command, got, want)
            continue
        assert got == want, (command, f.name, got, want)
        checked += 1
    assert checked >= 8
    if config is TrainConfig:  # the --sd-* flags default to SelfDistillConfig's fields
        for f in dataclasses.fields(SelfDistillConfig):
            assert opts[f"sd_{f.name}"] == f.default, (f.name, opts[f"sd_{f.name}"], f.default)
    # the augmentation flags are AugSpec's
    from kdcache.data.views import AugSpec

    d = AugSpec()
    assert (opts["scale"], opts["ratio"], opts["flip"], opts["mixup"]) == (d.scale, d.ratio, d.flip, d.mixup)
