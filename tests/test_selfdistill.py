"""Self-distillation: the multi-exit wrapper, the SelfDistillTask's loss, and a run through the CLI
(train --self-distill with --stop-after/--resume, then evaluate). Real models, shards and caches."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import NUM_CLASSES
from kdcache.cli import cli
from kdcache.learn.config import SelfDistillConfig, TrainConfig
from kdcache.errors import KdcacheError
from kdcache.models.exits import MultiExit, backbone_state_dict, stage_names
from kdcache.models.factory import create_model, normalize
from kdcache.learn.replay import ReplayStream, StreamConfig, epoch_batches, prepare_shards
from kdcache.learn.run_state import Meter, RunState
from kdcache.learn.selfdistill import SelfDistillTask
from kdcache.data.shards import expand_urls
from kdcache.cache.store import CacheReader
from kdcache.learn.tasks import CachedKDTask, LabelsTask, StudentInput

RES = 32
STUDENT = "py:kdcache.models.zoo:student_cnn"  # three stages: two shallow exits and the model's own head


def wrapped(spec: str, seed: int = 0, **kw) -> tuple[MultiExit, StudentInput]:
    torch.manual_seed(seed)
    info = create_model(spec, num_classes=NUM_CLASSES, resolution=RES)
    return MultiExit(info.model, resolution=RES, **kw), StudentInput(info.mean, info.std, torch.device("cpu"))


# ---- the wrapper ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, stages", [
    ("timm:test_resnet", ["layer1", "layer2", "layer3", "layer4"]),
    ("torchvision:resnet18", ["layer1", "layer2", "layer3", "layer4"]),
    (STUDENT, ["features.0", "features.2", "features.4"]),
])
def test_every_exit_has_its_shape_and_learns_from_its_own_loss(spec, stages):
    model, _ = wrapped(spec)
    assert model.stage_modules == stages and model.exit_stages == list(range(1, len(stages)))
    assert model.exit_names == [f"exit{s}" for s in range(1, len(stages) + 1)]
    model.train()
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, RES, RES), torch.tensor([0, 3, 4])
    out = model(x, all_exits=True)
    zs, fs = out["logits"], out["features"]
    width = model.exits[0].fc.in_features  # the last stage's width
    assert len(zs) == len(fs) == len(stages)
    assert all(z.shape == (3, NUM_CLASSES) for z in zs) and all(f.shape == (3, width) for f in fs)
    model.eval()
    with torch.no_grad():  # the default forward is the plain model's, bit for bit (eval: no batch-stat updates)
        assert torch.equal(model(x), model.model(x))
        assert torch.equal(model(x, all_exits=True)["logits"][-1], model.model(x))
    model.train()
    last_stage = dict(model.model.named_modules())[stages[-1]]
    for i in range(len(zs)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, all_exits=True)["logits"][i], y).backward()
        for j, head in enumerate(model.exits):  # its own head learns, every other head gets nothing
            grads = [p.grad for p in head.parameters()]
            if j == i:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), (i, j)
            else:
                assert all(g is None for g in grads), (i, j)
        deeper = [p.grad for p in last_stage.parameters()]
        if i < len(zs) - 1:  # a shallow exit's loss does not reach the stages after it
            assert all(g is None for g in deeper)
        else:
            # (timm zero-initialises each block's last norm, so some entries stay 0: any, not all)
            assert all(g is not None for g in deeper) and any(g.abs().sum() > 0 for g in deeper)
        first = next(model.model.parameters())  # the stem's first convolution
        assert first.grad is not None and first.grad.abs().sum() > 0  # every exit trains the stem


def test_exits_choice_state_dict_and_errors():
    model, _ = wrapped("timm:test_resnet", exits=[3, 1])
    assert model.exit_stages == [1, 3] and model.exit_names == ["exit1", "exit3", "exit4"]
    sd = model.state_dict()
    assert any(k.startswith("exits.1.") for k in sd) and not any(k.startswith("exits.2.") for k in sd)
    # the plain model's weights come back out of the wrapper's
    plain = create_model("timm:test_resnet", num_classes=NUM_CLASSES).model
    plain.load_state_dict(backbone_state_dict(sd))
    # the same settings rebuild a wrapper that takes the state dict (model.pt -> evaluate)
    again, _ = wrapped("timm:test_resnet", seed=5, exits="1,3")
    again.load_state_dict(sd)
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(KdcacheError, match="exits go after stages 1..3"):
        wrapped("timm:test_resnet", exits=[4])
    with pytest.raises(KdcacheError, match="cannot find the stages"):
        stage_names(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)))


def test_config_checks_the_self_distillation_flags(dataset, cache):
    base = dict(data=str(dataset), student=STUDENT, out="x")

    def sd(**settings):
        return TrainConfig(**base, self_distill=settings).self_distill

    assert sd(exits="2,1").exits == [1, 2]
    assert sd().exits == "all" and TrainConfig(**base, self_distill=True).self_distill == SelfDistillConfig()
    assert TrainConfig(**base).self_distill is None and TrainConfig(**base, self_distill=False).self_distill is None
    for bad, match in ((dict(alpha=1.5), "--sd-alpha"), (dict(temperature=0), "--sd-temperature"),
                       (dict(feature_weight=-1), "--sd-feature-weight"), (dict(exits="a,b"), "--sd-exits"),
                       (dict(exits="0"), "--sd-exits"), (dict(teacher="x"), "--sd-teacher"),
                       (dict(teacher="cache"), "needs\\s+a cache"), (dict(teacher="both"), "needs\\s+a cache"),
                       (dict(alhpa=0.5), "no setting alhpa")):
        with pytest.raises(KdcacheError, match=match):
            sd(**bad)
    TrainConfig(**base, cache=str(cache), self_distill=SelfDistillConfig(teacher="both"))  # fine with a cache


def test_sd_flags_without_self_distill_are_refused(dataset, tmp_path):
    """An --sd-* flag without --self-distill would change nothing: a usage error (exit 2) naming it."""
    r = CliRunner().invoke(cli, ["train", "--data", str(dataset), "--student", STUDENT, "--out", str(tmp_path / "r"),
                                 "--sd-alpha", "0.5", "--sd-exits", "1"])
    assert r.exit_code == 2 and "--sd-alpha, --sd-exits set self-distillation, which is off" in r.output
    assert not (tmp_path / "r").exists()


def test_a_run_of_flat_sd_fields_still_reads_and_resumes():
    """config.json of runs before the self-distillation group was nested: "self_distill": true and sd_*
    fields. evaluate and resume read them as the same group."""
    from dataclasses import asdict

    from kdcache.learn.config import run_self_distill
    from kdcache.learn.trainer import resume_changes

    old = {"self_distill": True, "sd_alpha": 0.5, "sd_temperature": 3.0, "sd_feature_weight": 0.0,
           "sd_exits": [1], "sd_teacher": "deepest", "resolved": {}}
    assert run_self_distill(old) == SelfDistillConfig(alpha=0.5, exits=[1])
    assert run_self_distill({"self_distill": False, "sd_alpha": 0.3}) is None
    same = {"self_distill": asdict(SelfDistillConfig(alpha=0.5, exits=[1])), "resolved": {}}
    assert resume_changes(old, same) == {}
    with pytest.raises(KdcacheError, match="self_distill: the run has"):
        resume_changes(old, {"self_distill": asdict(SelfDistillConfig(alpha=0.4, exits=[1])), "resolved": {}})


def test_meter_averages_extra_terms():
    m = Meter(RunState(), torch.device("cpu"), world=1)
    m.step({"loss": torch.tensor(2.0), "kd": None, "ce": torch.tensor(1.0), "exit1_loss": torch.tensor(3.0)}, 4)
    m.step({"loss": torch.tensor(4.0), "kd": None, "ce": torch.tensor(1.0), "exit1_loss": torch.tensor(5.0),
            "exit2_loss": 1.5}, 4)
    w = m.window()
    assert w["exit1_loss"] == 4.0 and w["exit2_loss"] == 1.5 and w["loss"] == 3.0 and "kd" not in w
    assert "exit1_loss" not in m.window()


# ---- the loss, by hand -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(dataset, cache):
    reader = CacheReader(str(cache))
    stream = ReplayStream(prepare_shards(expand_urls(str(dataset)), reader, True),
                          StreamConfig(batch_size=6, res=RES, cache=str(cache), need_labels=True,
                                       num_classes=NUM_CLASSES))
    b = next(iter(epoch_batches(stream, 0)))
    assert b.mixed()  # soft labels for the CE terms
    return b


def dense_teacher(logprobs, classes, C, T):
    """The cached top-k at temperature T as a dense distribution: the leftover mass spread evenly over
    the other classes (docs/losses.md, tail "uniform"), written out independently of losses.py."""
    lp = logprobs.double()
    B, k = lp.shape
    tail = (1 - lp.exp().sum(1)).clamp_min(0) / (C - k)
    logp = tail.clamp_min(1e-300).log()[:, None].expand(B, C).clone()
    logp.scatter_(1, classes.long(), lp)
    return F.softmax(logp / T, dim=1)


def kl(p, z, T):
    """T²·KL(p ‖ softmax(z/T)), batch mean."""
    logq = F.log_softmax(z.double() / T, dim=1)
    return T * T * (torch.xlogy(p, p) - p * logq).sum(1).mean()


def soft_ce(z, soft):
    return -(soft.double() * F.log_softmax(z.double(), dim=1)).sum(1).mean()


@pytest.mark.parametrize("feature_weight", [0.0, 0.5])
@pytest.mark.parametrize("base_mode, teacher", [("cached", "deepest"), ("cached", "cache"), ("cached", "both"),
                                                ("labels", "deepest")])  # cache/both need the teacher's top-k
def test_loss_equals_a_hand_computation(batch, teacher, feature_weight, base_mode):
    model, inputs = wrapped(STUDENT)
    base = (CachedKDTask(inputs, NUM_CLASSES, temperature=2.0, label_weight=0.3) if base_mode == "cached"
            else LabelsTask(inputs, NUM_CLASSES))
    alpha, T = 0.3, 3.0
    task = SelfDistillTask(base, model.exit_names, alpha=alpha, temperature=T, feature_weight=feature_weight,
                           teacher=teacher)
    model.eval()  # the same outputs for the task's forward and the one below
    out = task(model, batch)
    with torch.no_grad():
        o = model(normalize(batch.pixels("cpu"), inputs.mean, inputs.std), all_exits=True)
    zs, fs = o["logits"], o["features"]
    soft = batch.label_targets(NUM_CLASSES, "cpu")
    assert soft.dim() == 2
    # the deepest exit: the base task's loss of the mode
    if base_mode == "cached":
        deep = kl(dense_teacher(batch.logprobs, batch.classes, NUM_CLASSES, 2.0), zs[-1], 2.0) + 0.3 * soft_ce(zs[-1], soft)
    else:
        deep = soft_ce(zs[-1], soft)
    total = deep
    p_deep = F.softmax(zs[-1].double() / T, dim=1)
    p_cache = dense_teacher(batch.logprobs, batch.classes, NUM_CLASSES, T)
    for i, name in enumerate(["exit1", "exit2"]):
        d = {"deepest": kl(p_deep, zs[i], T), "cache": kl(p_cache, zs[i], T),
             "both": 0.5 * (kl(p_deep, zs[i], T) + kl(p_cache, zs[i], T))}[teacher]
        term = alpha * d + (1 - alpha) * soft_ce(zs[i], soft)
        if feature_weight:
            hint = (fs[i].double() - fs[-1].double()).pow(2).mean()
            term = term + feature_weight * hint
            torch.testing.assert_close(out[f"{name}_hint"].double(), hint, rtol=1e-5, atol=1e-6)
        else:
            assert f"{name}_hint" not in out
        torch.testing.assert_close(out[f"{name}_loss"].double(), term, rtol=1e-5, atol=1e-6)
        total = total + term
    torch.testing.assert_close(out["exit3_loss"].double(), deep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].double(), total, rtol=1e-5, atol=1e-6)
    assert out["loss"].requires_grad
    # the deepest exit is the teacher: the shallow terms send nothing back into it or into the last stage
    # (its logits and feature are detached), so those get exactly the gradient of the base loss alone
    deep_params = list(model.model.head.parameters()) + list(model.model.features[4].parameters())
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    with_exits = [p.grad.clone() for p in deep_params]
    model.zero_grad(set_to_none=True)
    base(model, batch)["loss"].backward()
    for g, p in zip(with_exits, deep_params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert all(p.grad is not None for p in model.exits.parameters()) is False  # base alone: heads untouched


def test_cache_teacher_needs_a_teacher(batch):
    model, inputs = wrapped(STUDENT)
    with pytest.raises(KdcacheError, match="--sd-teacher cache"):
        SelfDistillTask(LabelsTask(inputs, NUM_CLASSES), model.exit_names, teacher="cache")


def test_live_teacher_stands_in_for_the_cache(dataset, cache, teacher_weights, tmp_path):
    """--sd-teacher both in live mode distils the shallow exits from the live teacher's top-k, which
    equal the cache's: the run ends with bitwise the weights of the cached run."""
    from conftest import TEACHER, with_aug
    from kdcache.learn.trainer import train

    common = dict(data=str(dataset), cache=str(cache), student=STUDENT, epochs=1, batch_size=4, res=RES,
                  workers=0, device="cpu", progress=False, self_distill=SelfDistillConfig(teacher="both"),
                  label_weight=0.2)
    train(TrainConfig(**with_aug(dict(common, out=str(tmp_path / "cached")))))
    train(TrainConfig(**with_aug(dict(common, out=str(tmp_path / "live"), teacher=TEACHER,
                                      teacher_weights=str(teacher_weights)))))
    a = torch.load(tmp_path / "cached" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "live" / "model.pt", weights_only=True)
    assert any(k.startswith("exits.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- through the CLI ---------------------------------------------------------------------------------


def train_cli(*args):
    res = CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cli_self_distill_resumes_bitwise_and_evaluates(dataset, cache, tmp_path):
    args = ["--data", dataset, "--cache", cache, "--student", STUDENT, "--res", RES, "--batch-size", 4,
            "--workers", 0, "--device", "cpu", "--no-progress", "--epochs", 2, "--optimizer", "sgd", "--lr", 0.05,
            "--log-every", 1, "--val-data", dataset, "--self-distill", "--sd-teacher", "both",
            "--sd-feature-weight", 0.1]
    straight = train_cli(*args, "--out", tmp_path / "straight")
    stopped = train_cli(*args, "--out", tmp_path / "cut", "--stop-after", 4)  # mid epoch 0 (6 steps per epoch)
    assert stopped["stopped_at"] == 4
    resumed = train_cli(*args, "--out", tmp_path / "cut", "--resume")
    assert resumed["steps"] == straight["steps"] == 12
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert any(k.startswith("exits.") for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log: every exit's loss at every step, every exit's validation top-1 at each evaluation
    lines = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert [l["step"] for l in steps] == list(range(1, 13))
    for l in steps:
        assert {"exit1_loss", "exit2_loss", "exit3_loss", "exit1_hint", "exit2_hint"} <= set(l)
        assert l["loss"] == pytest.approx(l["exit1_loss"] + l["exit2_loss"] + l["exit3_loss"], rel=1e-5)
    vals = [l for l in lines if "val_top1" in l]
    assert len(vals) == 2 and all({"val_top1_exit1", "val_top1_exit2", "val_top1_exit3"} <= set(l) for l in vals)
    assert vals[-1]["val_top1_exit3"] == vals[-1]["val_top1"]
    cfg = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert cfg["self_distill"] == {"alpha": 0.3, "temperature": 3.0, "feature_weight": 0.1, "exits": "all",
                                   "teacher": "both"}
    assert cfg["resolved"]["exits"]["names"] == ["exit1", "exit2", "exit3"]
    assert resumed["final_val_top1_exits"] == {k[len("val_top1_"):]: v for k, v in vals[-1].items()
                                               if k.startswith("val_top1_exit")}

    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "cut"), "--val-data", str(dataset), "--json",
                                   "--device", "cpu", "--batch-size", 5])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [e["name"] for e in rep["exits"]] == ["exit1", "exit2", "exit3"]
    assert rep["val_images"] == 21
    # evaluate rebuilds the same student: its per-exit top-1 is the trainer's last evaluation
    for e in rep["exits"]:
        assert e["top1"] == pytest.approx(vals[-1][f"val_top1_{e['name']}"], abs=1e-12), e
    ee = rep["early_exit"]
    assert math.isclose(sum(ee["share"]), 1.0) and ee["thresholds"] == [0.9, 0.9]
    cum = [e["compute_cumulative"] for e in rep["exits"]]
    assert cum[0] <= ee["compute"] <= cum[-1]
