"""Teacher ensembles in one cache: several --teacher, each at its own resolution, on the same views;
the cache keeps the top-k of their mean probability (models/ensemble.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kdcache
from conftest import NUM_CLASSES, TEACHER, sharp_teacher
from kdcache.cache.store import CacheReader
from kdcache.cli import cli
from kdcache.data.render import render
from kdcache.data.shards import decode_shard, expand_urls, shard_name
from kdcache.data.views import View
from kdcache.models.factory import IMAGENET_MEAN, IMAGENET_STD, normalize

RES = (32, 48)  # member 1 at 32 px, member 2 at 48 px


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two different confident teachers' weights files."""
    root = tmp_path_factory.mktemp("members")
    paths = []
    for seed in (0, 1):
        path = root / f"member{seed}.pt"
        torch.save(sharp_teacher(seed, 4.0).state_dict(), path)
        paths.append(path)
    return paths


def precompute_args(dataset, out, weights, res=RES, specs=(TEACHER, TEACHER)) -> list[str]:
    args = ["precompute", "--data", str(dataset), "--out", str(out), "--num-classes", str(NUM_CLASSES),
            "--views", "2", "--topk", "3", "--seed", "7", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--mixup", "--no-progress"]
    for spec, w in zip(specs, weights):
        args += ["--teacher", spec, "--teacher-weights", str(w)]
    for r in res:
        args += ["--teacher-res", str(r)]
    return args


@pytest.fixture(scope="module")
def ens_cache(dataset, members, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "cache.zarr"
    res = CliRunner().invoke(cli, precompute_args(dataset, out, members))
    assert res.exit_code == 0, res.output
    return out


def model_of(path):
    from kdcache.models.zoo import tiny_cnn

    m = tiny_cnn(NUM_CLASSES)
    m.load_state_dict(torch.load(path, weights_only=True))
    return m.eval()


def test_stored_logprobs_are_the_topk_of_the_members_mean_softmax(dataset, members, ens_cache):
    """By hand: each member on the stored view rendered at its own size, softmax, mean, log, top-k."""
    models = [model_of(p) for p in members]
    reader = CacheReader(str(ens_cache))
    checked = mixed = 0
    for url in expand_urls(str(dataset)):
        name = shard_name(url)
        images = decode_shard(url).images
        sd = reader.read_shard(name)
        for i in range(len(sd["keys"])):
            for v in range(2):
                view = View(*sd["box"][i, v], bool(sd["flip"][i, v]), int(sd["mix_with"][i, v]),
                            float(sd["mix_lam"][i, v]))
                partner = partner_view = None
                if view.mixed:
                    mixed += 1
                    j = view.mix_with
                    partner = images[j]
                    partner_view = View(*sd["box"][j, v], bool(sd["flip"][j, v]), int(sd["mix_with"][j, v]),
                                        float(sd["mix_lam"][j, v]))
                probs = []
                with torch.no_grad():
                    for model, r in zip(models, RES):
                        px = render(images[i], view, r, partner, partner_view)
                        assert px.shape[-2:] == (r, r)
                        z = model(normalize(px[None], IMAGENET_MEAN, IMAGENET_STD))[0].double()
                        probs.append(torch.softmax(z, -1))
                mean = (probs[0] + probs[1]) / 2
                want_lp, want_ids = torch.topk(mean.log(), 3)
                assert sd["classes"][i, v].tolist() == want_ids.tolist(), (name, i, v)
                np.testing.assert_allclose(sd["logprobs"][i, v].astype(np.float64), want_lp.numpy(),
                                           rtol=2 ** -10, atol=1e-4)
                # an ensemble, not one of its members: member 1 alone gives other log-probs
                alone = torch.topk(probs[0].log(), 3).values.numpy()
                assert np.abs(alone - sd["logprobs"][i, v].astype(np.float64)).max() > 1e-3 or \
                    torch.topk(probs[0], 3).indices.tolist() != want_ids.tolist()
                checked += 1
    assert checked == 21 * 2 and mixed > 0


def test_the_manifest_lists_every_member(ens_cache, members, cache):
    from kdcache.models.factory import file_sha256

    man = CacheReader(str(ens_cache)).manifest
    t = man["teacher"]
    assert t["ensemble"] == "probability_mean" and t["num_classes"] == NUM_CLASSES
    assert [m["spec"] for m in t["members"]] == [TEACHER, TEACHER]
    assert [m["weights_sha256"] for m in t["members"]] == [file_sha256(str(p)) for p in members]
    assert [m["resolution"] for m in t["members"]] == list(RES) and man["resolution"] == RES[0]
    handle = kdcache.open_cache(str(ens_cache))
    assert handle.members == t["members"] and "ensemble of 2" in repr(handle)
    assert [m["resolution"] for m in kdcache.open_cache(str(cache)).members] == [32]
    # a single teacher's manifest keeps today's form
    single = CacheReader(str(cache)).manifest["teacher"]
    assert "members" not in single and set(single) == {"spec", "weights", "weights_sha256", "num_classes", "mean",
                                                       "std"}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("change, named", [
    ("weights", "teacher.members[2].weights_sha256"),
    ("res", "teacher.members[2].resolution"),
    ("spec", "teacher.members[2].spec"),
    ("count", "teacher: the cache's ensemble has 2 member(s)"),
])
def test_resume_with_a_changed_member_is_refused(dataset, members, ens_cache, tmp_path, change, named):
    import shutil

    out = tmp_path / "cache.zarr"
    shutil.copytree(ens_cache, out)
    same = CliRunner().invoke(cli, precompute_args(dataset, out, members))
    assert same.exit_code == 0 and "already complete" in same.stderr, same.output
    args = precompute_args(dataset, out, members)
    if change == "weights":
        args = precompute_args(dataset, out, members[::-1])
    elif change == "res":
        args = precompute_args(dataset, out, members, res=(32, 40))
    elif change == "spec":
        other = tmp_path / "scripted.pt"
        torch.jit.save(torch.jit.script(model_of(members[1])), str(other))
        args = precompute_args(dataset, out, members, specs=(TEACHER, str(other)))
    else:
        args = precompute_args(dataset, out, members[:1], res=RES[:1])
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "made with other settings" in errors[0], res.stderr
    assert named in res.stderr, res.stderr


def test_verify_passes_and_fails_when_a_members_weights_are_swapped(dataset, members, ens_cache):
    from kdcache.tools.verify import format_verify, verify

    kw = dict(samples=12, device="cpu", progress=False)
    ok = verify(str(ens_cache), str(dataset), [TEACHER, TEACHER], teacher_weights=[str(p) for p in members], **kw)
    assert ok["ok"], format_verify(ok)
    assert ok["compared"] == 12 and ok["max_abs_delta_logprob"] == 0.0
    assert [m["weights_match"] for m in ok["teacher"]["members"]] == [True, True]
    assert "teacher 2 (" in format_verify(ok)
    swapped = verify(str(ens_cache), str(dataset), [TEACHER, TEACHER],
                     teacher_weights=[str(members[0]), str(members[0])], **kw)
    assert not swapped["ok"] and swapped["failures"]
    assert [m["weights_match"] for m in swapped["teacher"]["members"]] == [True, False]
    assert any("teacher 2 weights sha256" in p for p in swapped["problems"])
    # with the mismatch allowed, the re-run outputs still disagree
    allowed = verify(str(ens_cache), str(dataset), [TEACHER, TEACHER],
                     teacher_weights=[str(members[0]), str(members[0])], allow_teacher_mismatch=True, **kw)
    assert not allowed["ok"] and allowed["failures"] and not allowed["problems"]


@pytest.mark.parametrize("kind", ["sample", "compact"])
def test_sampled_and_compact_ensemble_caches_verify(dataset, members, tmp_path, kind):
    """Drawn targets come from the averaged distribution, and the compact layout stores it too:
    verify rebuilds both from the members."""
    from kdcache.tools.verify import format_verify, verify

    out = tmp_path / "cache.zarr"
    extra = ["--targets", "sample", "--samples", "6"] if kind == "sample" else ["--compact"]
    res = CliRunner().invoke(cli, precompute_args(dataset, out, members) + extra)
    assert res.exit_code == 0, res.output
    r = verify(str(out), str(dataset), [TEACHER, TEACHER], teacher_weights=[str(p) for p in members], samples=10,
               device="cpu", progress=False)
    assert r["ok"] and r["compared"] == 10, format_verify(r)
    if kind == "sample":
        assert r["draws_exact"] == 1.0
    other = tmp_path / "other.pt"  # a confident stranger as member 2: its draws land elsewhere
    torch.save(sharp_teacher(5, 40.0).state_dict(), other)
    wrong = verify(str(out), str(dataset), [TEACHER, TEACHER], teacher_weights=[str(members[0]), str(other)],
                   samples=10, device="cpu", progress=False, allow_teacher_mismatch=True)
    assert not wrong["ok"] and wrong["failures"]


def test_a_live_ensemble_without_a_cache_runs_each_member_at_its_resolution(dataset, members):
    """No cache: the members' resolutions are given; the targets are the mean of their softmax on the
    loader's views, each rendered at the member's size."""
    models = [model_of(p) for p in members]
    live = kdcache.LiveEnsemble.load([TEACHER, TEACHER], weights=[str(p) for p in members], res=[48, 40], topk=4,
                                     num_classes=NUM_CLASSES, device="cpu")
    assert live.resolutions == [48, 40] and live.ensemble.resolutions == [48, 40]
    loader = kdcache.ReplayLoader(str(dataset), None, 8, res=32, views=2, device="cpu", teacher_res=live.resolutions)
    batch = next(iter(loader))
    t = live.targets(batch)
    with torch.no_grad():
        probs = [torch.softmax(m(normalize(batch.pixels_at(r, "cpu"), IMAGENET_MEAN, IMAGENET_STD)).double(), -1)
                 for m, r in zip(models, (48, 40))]
    want = torch.topk(((probs[0] + probs[1]) / 2).log(), 4)
    assert torch.equal(t.classes, want.indices)
    torch.testing.assert_close(t.logprobs.double(), want.values, rtol=2 ** -10, atol=1e-4)
    assert batch.pixels_at(40, "cpu").shape[-1] == 40 and batch.pixels_at(32, "cpu").shape[-1] == 32
    with pytest.raises(kdcache.KdcacheError, match="not at 64 px"):
        batch.pixels_at(64, "cpu")


def test_verify_cli_needs_one_teacher_per_member(dataset, members, ens_cache):
    res = CliRunner().invoke(cli, ["verify", str(ens_cache), "--data", str(dataset), "--teacher", TEACHER,
                                   "--teacher-weights", str(members[0]), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2
    assert error_lines(res.stderr) and "has 2 member(s)" in res.stderr
    res = CliRunner().invoke(cli, ["verify", str(ens_cache), "--data", str(dataset), "--teacher", TEACHER,
                                   "--teacher", TEACHER, "--teacher-weights", str(members[0]), "--teacher-weights",
                                   str(members[1]), "--device", "cpu", "--no-progress", "-n", "8"])
    assert res.exit_code == 0, res.output
    assert "OK: the cache replays exactly" in res.stdout


def test_a_live_ensemble_gives_the_cached_targets(dataset, members, ens_cache):
    """The library: the same batch's targets from a LiveEnsemble and from the cache."""
    assert "LiveEnsemble" in kdcache.__all__
    cache = kdcache.open_cache(str(ens_cache))
    live = kdcache.LiveEnsemble.load([TEACHER, TEACHER], weights=[str(p) for p in members], cache=cache,
                                     device="cpu")
    assert live.resolutions == list(RES) and live.topk == 3
    loader = kdcache.ReplayLoader(str(dataset), cache, 8, res=32, device="cpu", teacher_res=live.resolutions)
    n = 0
    for batch in loader:
        got, want = live.targets(batch), batch.targets
        assert torch.equal(got.classes, want.classes)
        torch.testing.assert_close(got.logprobs.float(), want.logprobs.float(), rtol=2 ** -10, atol=1e-4)
        n += len(batch)
    assert n == 21


def test_live_training_with_the_ensemble_uses_the_cached_targets(dataset, members, ens_cache, tmp_path, monkeypatch):
    """`train --mode live` with the cache's members: every step's targets are the cached ones."""
    from kdcache.learn.tasks import LiveKDTask

    seen = []
    real = LiveKDTask.teacher_targets

    def spy(self, batch):
        t = real(self, batch)
        seen.append((list(batch.shards), list(batch.keys), batch.view, t.classes.clone(), t.logprobs.clone()))
        return t

    monkeypatch.setattr(LiveKDTask, "teacher_targets", spy)
    args = ["train", "--data", str(dataset), "--cache", str(ens_cache), "--mode", "live", "--student",
            "py:kdcache.models.zoo:tiny_cnn", "--res", "32", "--out", str(tmp_path / "run"), "--epochs", "2",
            "--batch-size", "7", "--workers", "0", "--device", "cpu", "--no-progress"]
    for p in members:
        args += ["--teacher", TEACHER, "--teacher-weights", str(p)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["teacher_res"] == list(RES)
    cache = kdcache.open_cache(str(ens_cache))
    assert {view for *_, view, _, _ in seen} == {0, 1}
    for shards, keys, view, classes, logprobs in seen:
        for row, (shard, key) in enumerate(zip(shards, keys)):
            rec = cache.record(key, view, shard=shard)
            assert classes[row].tolist() == np.asarray(rec.classes).tolist()
            np.testing.assert_allclose(logprobs[row].float().numpy(), np.asarray(rec.logprobs, dtype=np.float32),
                                       rtol=2 ** -10, atol=1e-4)


def test_inspect_shows_the_members(members, ens_cache):
    from kdcache.models.factory import file_sha256

    text = CliRunner().invoke(cli, ["inspect", str(ens_cache)])
    assert text.exit_code == 0, text.output
    for needle in ("ensemble of 2", "member 1", "member 2", "resolution 48", "teacher resolutions 32, 48",
                   file_sha256(str(members[0]))[:16], file_sha256(str(members[1]))[:16]):
        assert needle in text.stdout, needle
    js = CliRunner().invoke(cli, ["inspect", str(ens_cache), "--json"])
    assert js.exit_code == 0, js.output
    s = json.loads(js.stdout)
    assert [m["resolution"] for m in s["members"]] == list(RES)
    assert [m["weights_sha256"] for m in s["members"]] == [file_sha256(str(p)) for p in members]
    assert s["teacher"]["ensemble"] == "probability_mean"


def test_inspect_lists_a_single_teacher_as_one_member(cache):
    s = json.loads(CliRunner().invoke(cli, ["inspect", str(cache), "--json"]).stdout)
    assert len(s["members"]) == 1 and s["members"][0]["spec"] == TEACHER and s["members"][0]["resolution"] == 32


@pytest.mark.parametrize("extra, message", [
    (["--teacher-weights", "W1"], "--teacher-weights is given 1 time for 2 teachers"),
    (["--teacher-weights", "W1", "--teacher-weights", "W2", "--teacher-weights", "W1"],
     "--teacher-weights is given 3 times for 2 teachers"),
    (["--teacher-weights", "W1", "--teacher-weights", "W2", "--teacher-res", "32"],
     "--teacher-res is given 1 time for 2 teachers"),
    (["--teacher-weights", "W1", "--teacher-weights", "W2", "--mean", "0.5,0.5,0.5"],
     "--mean is given 1 time for 2 teachers"),
])
def test_per_teacher_option_counts_must_match_the_teachers(dataset, members, tmp_path, extra, message):
    extra = [str(members[0]) if a == "W1" else str(members[1]) if a == "W2" else a for a in extra]
    out = tmp_path / "cache.zarr"
    res = CliRunner().invoke(cli, ["precompute", "--data", str(dataset), "--out", str(out), "--teacher", TEACHER,
                                   "--teacher", TEACHER, "--device", "cpu", "--workers", "0", "--no-progress", *extra])
    assert res.exit_code == 2, res.output
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert not out.exists()  # refused before anything was made


def test_members_must_agree_on_the_class_count(dataset, members, tmp_path):
    """TorchScript members carry their own heads: a 5-class and a 7-class one cannot be averaged."""
    from kdcache.errors import KdcacheError
    from kdcache.models.zoo import tiny_cnn
    from kdcache.tools.config import PrecomputeConfig
    from kdcache.tools.precompute import precompute

    five, seven = tmp_path / "five.pt", tmp_path / "seven.pt"
    torch.jit.save(torch.jit.script(model_of(members[0])), str(five))
    torch.jit.save(torch.jit.script(tiny_cnn(NUM_CLASSES + 2).eval()), str(seven))
    cfg = PrecomputeConfig(data=str(dataset), teacher=[str(five), str(seven)], out=str(tmp_path / "c.zarr"), res=32,
                           device="cpu", workers=0, progress=False)
    with pytest.raises(KdcacheError, match="teacher 2 .* outputs 7 classes, teacher 1 .* 5"):
        precompute(cfg)


def test_an_ensemble_cache_grows_to_the_one_go_cache(dataset, members, ens_cache, tmp_path):
    """Growing an ensemble cache from 2 to 3 views renders only the new view, at every member's
    resolution, and gives the cache an ensemble run at 3 views makes in one go."""
    import shutil

    from conftest import stored

    grown, onego = tmp_path / "grown.zarr", tmp_path / "onego.zarr"
    shutil.copytree(ens_cache, grown)

    def at_three(out):
        args = precompute_args(dataset, out, members)
        args[args.index("--views") + 1] = "3"
        return CliRunner().invoke(cli, args)

    res = at_three(grown)
    assert res.exit_code == 0, res.output
    assert "growing" in res.output and "only the new views" in res.output
    assert at_three(onego).exit_code == 0
    a, b = stored(grown), stored(onego)
    assert a.keys() == b.keys() and a["manifest"]["views"] == 3
    assert [m["resolution"] for m in a["manifest"]["teacher"]["members"]] == list(RES)
    for name in a:
        assert a[name] == b[name], name
