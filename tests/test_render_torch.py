"""The torch render backend (`precompute --render torch`): Pillow's integer resize, decode like PIL
on the CPU, batched = single, exact replay of a torch cache, bitwise determinism across worker
counts and through the device path (decode in the main process), and the backend recorded and
enforced (resume, train, verify)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from click.testing import CliRunner
from PIL import Image

from conftest import (
    NUM_CLASSES, TEACHER, encode, make_image, precompute_config, sharp_teacher, with_aug, written_before_records,
)
from kdcache.errors import KdcacheError
from kdcache.models.factory import create_model
from kdcache.tools.precompute import precompute
from kdcache.learn.replay import epoch_batches
from kdcache.data.shards import expand_urls, iter_samples
from kdcache.cache.store import ARRAYS, CacheReader
from kdcache.models.teacher import Teacher, topk_tensors
from kdcache.data.render import PIL_RENDERER, DeferredCrops, Encoded, TorchRenderer, render_mismatch, renderer_for
from kdcache.data.views import ShardViews, View
from kdcache.data.render import CropBatch, crop_batch, render

RES = 32


# ---- a transcription of Pillow's libImaging/Resample.c (bilinear, 8 bits per channel) ------------


def _pil_coeffs_ref(in_size, in0, in1, out_size):
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    out = []
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = []
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) / filterscale)
            k.append(1.0 - t if t < 1.0 else 0.0)
        ww = sum(k)  # left to right, as the C loop
        out.append((xmin, [int(0.5 + (v / ww if ww != 0 else v) * (1 << 22)) for v in k]))
    return out


def _clip8(v):
    return min(max(v >> 22, 0), 255)


def pillow_resize_ref(a: np.ndarray, box, size: int) -> np.ndarray:
    """Pillow's ``resize((size, size), BILINEAR, box)`` of an HWC uint8 array, loop by loop."""
    x0, y0, x1, y1 = box
    cv, ch = _pil_coeffs_ref(a.shape[0], y0, y1, size), _pil_coeffs_ref(a.shape[1], x0, x1, size)
    first, last = cv[0][0], cv[-1][0] + len(cv[-1][1])
    tmp = np.zeros((last - first, size, 3), dtype=np.int64)
    for yy in range(last - first):  # horizontal pass over the rows the vertical pass reads
        for xx, (xmin, k) in enumerate(ch):
            for c in range(3):
                tmp[yy, xx, c] = _clip8((1 << 21) + sum(int(a[yy + first, xmin + i, c]) * w for i, w in enumerate(k)))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    for yy, (ymin, k) in enumerate(cv):
        for xx in range(size):
            for c in range(3):
                out[yy, xx, c] = _clip8((1 << 21) + sum(int(tmp[ymin - first + i, xx, c]) * w for i, w in enumerate(k)))
    return out


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def _cases(n=24, seed=0, max_side=40, sizes=(5, 8, 16)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w_, h_ = (int(v) for v in rng.integers(3, max_side, size=2))
        a = (rng.random((h_, w_, 3)) * 255).astype(np.uint8)
        w, h = int(rng.integers(1, w_ + 1)), int(rng.integers(1, h_ + 1))
        x, y = int(rng.integers(0, w_ - w + 1)), int(rng.integers(0, h_ - h + 1))
        out.append((a, View(x, y, w, h, bool(rng.random() < 0.5)), int(rng.choice(sizes))))
    return out


def test_resize_is_pillows_integer_algorithm():
    """Down- and upscaling, flips, boxes at the borders: equal to Pillow's C loops bit for bit."""
    r = TorchRenderer("cpu")
    for a, v, size in _cases():
        want = pillow_resize_ref(a, (v.x, v.y, v.x + v.w, v.y + v.h), size)
        if v.flip:
            want = want[:, ::-1]
        got = r.crops([(_chw(a), v)], size)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"{a.shape} {v} {size}")


def test_close_to_the_installed_pil():
    """Against the PIL in use (Pillow-SIMD under `make`): at most one level apart."""
    r = TorchRenderer("cpu")
    worst = 0
    for a, v, size in _cases(n=40, seed=1, max_side=120, sizes=(16, 32, 64)):
        got = r.crops([(_chw(a), v)], size)[0]
        want = PIL_RENDERER.crops([(Image.fromarray(a), v)], size)[0]
        worst = max(worst, int((got.int() - want.int()).abs().max()))
    assert worst <= 1


def test_cpu_decode_equals_pil(dataset):
    """On the CPU torchvision decodes JPEG and PNG to PIL's pixels (both libjpeg-turbo, libpng)."""
    r = TorchRenderer("cpu")
    n = 0
    for url in expand_urls(str(dataset)):
        for s in iter_samples(url):
            pil = np.array(PIL_RENDERER.decode(s.image, s.ext))
            t = r.decode(s.image, s.ext).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(t, pil, err_msg=s.key)
            n += 1
    assert n == 21
    # grayscale and palette images become RGB the way PIL converts them
    rng = np.random.default_rng(3)
    for mode, fmt in (("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")):
        buf = io.BytesIO()
        make_image(rng, 29, 23, 1).convert(mode).save(buf, format=fmt)
        data = buf.getvalue()
        ext = "jpg" if fmt == "JPEG" else "png"
        np.testing.assert_array_equal(r.decode(data, ext).permute(1, 2, 0).numpy(),
                                      np.array(PIL_RENDERER.decode(data, ext)))


def test_batched_equals_single():
    r = TorchRenderer("cpu")
    cases = [(_chw(a), v) for a, v, _ in _cases(n=30, seed=2, max_side=90)]
    batch = r.crops(cases, 16)
    assert batch.dtype == torch.uint8 and batch.shape == (30, 3, 16, 16)
    for n, item in enumerate(cases):
        assert torch.equal(batch[n], r.crops([item], 16)[0])
    # chunking (a small budget cuts the batch into many chunks) changes nothing either
    import kdcache.data.render as views

    old = dict(views.CHUNK_ELEMENTS)
    try:
        views.CHUNK_ELEMENTS["cpu"] = 1000
        assert torch.equal(r.crops(cases, 16), batch)
        views.CHUNK_ELEMENTS["cpu"] = 1 << 30  # one chunk
        assert torch.equal(r.crops(cases, 16), batch)
    finally:
        views.CHUNK_ELEMENTS.update(old)
    # crop_batch (every path) = render (one image), mixed records included
    images = [im for im, _ in cases[:4]]
    sv = ShardViews(np.array([[list(v.box)] for _, v in cases[:4]]), np.array([[v.flip] for _, v in cases[:4]]),
                    np.array([[1], [0], [-1], [-1]], dtype=np.int32), np.array([[0.75], [0.75], [1], [1]], np.float16))
    b = crop_batch([(images, sv, i, 0) for i in range(4)], 16, r)
    px = b.pixels("cpu")
    for i in range(4):
        view = sv.view(i, 0)
        partner = (images[view.mix_with], sv.view(view.mix_with, 0)) if view.mixed else (None, None)
        assert torch.equal(px[i], render(images[i], view, 16, *partner, renderer=r))
    # the device path ships Encoded images; rendered on the device they are the same crops
    enc = []
    for a, _, _ in _cases(n=4, seed=2, max_side=90):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        enc.append(Encoded(buf.getvalue(), "png", a.shape[0], a.shape[1]))
    d = crop_batch([(enc, sv, i, 0) for i in range(4)], 16, TorchRenderer("cpu", deferred=True))
    assert isinstance(d, DeferredCrops) and len(d) == 4
    assert torch.equal(d.pixels("cpu"), px)
    parts = DeferredCrops.cat([d.slice(0, 1), d.slice(1, 4)])
    assert torch.equal(parts.pixels("cpu"), px) and torch.equal(d.slice(1, 3).pixels("cpu"), px[1:3])
    assert torch.equal(CropBatch.cat([b.slice(0, 1), b.slice(1, 4)]).pixels("cpu"), px)


# ---- a torch cache ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_weights(tmp_path_factory):
    """A confident tiny teacher: its top-k moves with every pixel change."""
    path = tmp_path_factory.mktemp("sharp_t") / "sharp.pt"
    torch.save(sharp_teacher(5).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tcache(dataset, sharp_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("tcache") / "cache.zarr"
    precompute(precompute_config(dataset, out, sharp_weights, render="torch"))
    return out


def assert_same(a, b):
    ra, rb = CacheReader(str(a)), CacheReader(str(b))
    assert ra.shard_names() == rb.shard_names()
    for name in ra.shard_names():
        da, db = ra.read_shard(name), rb.read_shard(name)
        for arr in ARRAYS:
            np.testing.assert_array_equal(da[arr], db[arr], err_msg=f"{name}/{arr}")
        assert ra.shard_attrs(name)["bad"] == rb.shard_attrs(name)["bad"]


def test_manifest_records_the_backend(tcache):
    r = CacheReader(str(tcache))
    m = r.manifest["render"]
    assert m["backend"] == "torch" and m["device"] == "cpu" and m["torchvision"] and "resample" in m
    assert all(r.shard_attrs(n)["render"]["backend"] == "torch" for n in r.shard_names())
    assert isinstance(renderer_for(m), TorchRenderer) and renderer_for(m).device.type == "cpu"
    assert render_mismatch(m) is None


def test_the_cli_flag(dataset, sharp_weights, tmp_path):
    from kdcache.cli import cli

    out = tmp_path / "cli.zarr"
    args = ["precompute", "--data", str(dataset), "--teacher", TEACHER, "--teacher-weights", str(sharp_weights),
            "--num-classes", str(NUM_CLASSES), "--out", str(out), "-V", "1", "-k", "2", "--res", "16", "-b", "8",
            "--workers", "0", "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(cli, args + ["--render", "torch"])
    assert res.exit_code == 0, res.output
    assert CacheReader(str(out)).manifest["render"]["backend"] == "torch"
    res = CliRunner().invoke(cli, args + ["--render", "opencv"])
    assert res.exit_code == 2 and "opencv" in res.output


def test_replay_reproduces_the_stored_topk(dataset, tcache, sharp_weights):
    """The trainer's stream renders a torch cache's views with the torch backend; the teacher on
    those pixels gives back the stored top-k exactly (as test_replay does for PIL)."""
    from kdcache.learn.replay import ReplayStream, StreamConfig, prepare_shards

    reader = CacheReader(str(tcache))
    info = create_model(TEACHER, num_classes=NUM_CLASSES, weights=str(sharp_weights), resolution=RES)
    teacher = Teacher(info.model.eval(), info.mean, info.std, torch.device("cpu"), NUM_CLASSES)
    urls = expand_urls(str(dataset))
    shards = prepare_shards(urls, reader, need_labels=False)
    seen = 0
    for epoch in (0, 1, 2):
        stream = ReplayStream(shards, StreamConfig(batch_size=8, res=RES, cache=str(tcache), with_targets=True,
                                                   shuffle_buffer=8))
        assert isinstance(stream.renderer, TorchRenderer)
        for b in epoch_batches(stream, epoch):
            with torch.no_grad():
                vals, ids = (t.numpy() for t in topk_tensors(teacher, b.pixels("cpu"), reader.topk))
            np.testing.assert_array_equal(ids, b.classes.numpy())
            np.testing.assert_array_equal(vals, b.logprobs.numpy())
            seen += len(b)
    assert seen == 3 * 21


def test_replay_with_pil_would_not_reproduce_it_exactly(dataset, tcache, sharp_weights):
    """The check has teeth where the backends differ: PIL-rendered pixels of the same views are not
    the torch backend's (with Pillow-SIMD installed they differ by a level here and there)."""
    from kdcache.data.shards import decode_shard

    r = TorchRenderer("cpu")
    reader = CacheReader(str(tcache))
    differ = 0
    for url in expand_urls(str(dataset)):
        name = url.rsplit("/", 1)[-1][:-4]
        d = reader.read_shard(name)
        sv = ShardViews(d["box"], d["flip"], d["mix_with"], d["mix_lam"])
        pil, tv = decode_shard(url), decode_shard(url, renderer=r)
        recs = [(i, v) for i in range(len(d["keys"])) for v in range(reader.views)]
        a = crop_batch([(pil.images, sv, i, v) for i, v in recs], RES).pixels("cpu")
        b = crop_batch([(tv.images, sv, i, v) for i, v in recs], RES, r).pixels("cpu")
        assert (a - b).abs().max() <= 1 / 255 + 1e-6
        differ += int((a != b).any(dim=(1, 2, 3)).sum())
    from kdcache.data.render import render_backend

    if render_backend()["pil"] == "Pillow-SIMD":
        assert differ > 0


def test_workers_and_the_device_path_give_bitwise_equal_caches(dataset, tcache, sharp_weights, tmp_path, monkeypatch):
    precompute(precompute_config(dataset, tmp_path / "w2.zarr", sharp_weights, render="torch", workers=2))
    assert_same(tcache, tmp_path / "w2.zarr")
    # the CUDA flow on the CPU: workers only read bytes and headers, the main process decodes and crops
    import kdcache.tools.precompute as pre

    made = []

    def deferred(backend, device=None):
        made.append(TorchRenderer("cpu", deferred=True))
        return made[-1]

    monkeypatch.setattr(pre, "make_renderer", deferred)
    precompute(precompute_config(dataset, tmp_path / "dev.zarr", sharp_weights, render="torch", workers=2))
    assert made and made[0].deferred
    assert_same(tcache, tmp_path / "dev.zarr")


def test_the_device_path_in_the_trainers_stream(dataset, tcache, monkeypatch):
    """Workers ship DeferredCrops (Encoded images + views); the pixels equal the worker-rendered ones."""
    import kdcache.learn.replay as replay
    from kdcache.learn.replay import ReplayStream, StreamConfig, prepare_shards

    reader = CacheReader(str(tcache))
    shards = prepare_shards(expand_urls(str(dataset)), reader, need_labels=False)

    def batches(workers):
        st = ReplayStream(shards, StreamConfig(batch_size=5, res=RES, cache=str(tcache), workers=workers,
                                               shuffle_buffer=8))
        return list(epoch_batches(st, 1))

    want = batches(2)
    monkeypatch.setattr(replay, "renderer_for", lambda rec: TorchRenderer("cpu", deferred=True))
    got = batches(2)
    assert any(isinstance(b.crops, DeferredCrops) for b in got)
    assert [b.keys for b in got] == [b.keys for b in want]
    for a, b in zip(want, got):
        assert torch.equal(a.pixels("cpu"), b.pixels("cpu")) and a.mixed() == b.mixed()
        assert torch.equal(a.label_targets(NUM_CLASSES, "cpu"), b.label_targets(NUM_CLASSES, "cpu"))


def test_skip_bad_on_the_device_path(teacher_weights, tmp_path, monkeypatch):
    """An image whose header reads but whose pixels do not decode is found on the device and
    recorded as bad there, partners unmixed: the same cache the worker path writes."""
    from conftest import corrupt_jpeg, write_dataset

    data = tmp_path / "train"
    write_dataset(data, shards=1, per_shard=6, seed=2)
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(data / "train-000000.tar")) as w:
        for i in range(6):
            w.write({"__key__": f"k{i}", "jpg": encode(make_image(rng, 40, 36, i % 3), "jpg"), "cls": b"1"})
        w.write({"__key__": "broken", "jpg": corrupt_jpeg(), "cls": b"0"})
    precompute(precompute_config(data, tmp_path / "a.zarr", teacher_weights, render="torch", skip_bad=True))
    import kdcache.tools.precompute as pre

    monkeypatch.setattr(pre, "make_renderer", lambda b, d=None: TorchRenderer("cpu", deferred=True))
    precompute(precompute_config(data, tmp_path / "b.zarr", teacher_weights, render="torch", skip_bad=True))
    assert_same(tmp_path / "a.zarr", tmp_path / "b.zarr")
    d = CacheReader(str(tmp_path / "b.zarr")).read_shard("train-000000")
    assert list(CacheReader(str(tmp_path / "b.zarr")).shard_attrs("train-000000")["bad"]) == ["broken"]
    assert (d["mix_with"][6] == -1).all() and not (d["mix_with"] == 6).any()
    # without --skip-bad the device path stops, naming the image
    with pytest.raises(KdcacheError, match="broken"):
        precompute(precompute_config(data, tmp_path / "c.zarr", teacher_weights, render="torch"))


# ---- the backend is enforced --------------------------------------------------------------------


def test_resume_with_another_backend_is_refused(dataset, tcache, sharp_weights, tmp_path):
    c = tmp_path / "c.zarr"
    shutil.copytree(tcache, c)
    with pytest.raises(KdcacheError, match=r"render\.backend: cache has 'torch', this run has 'pil'"):
        precompute(precompute_config(dataset, c, sharp_weights))
    with pytest.raises(KdcacheError, match="--render must be one of pil, torch"):
        precompute_config(dataset, c, sharp_weights, render="opencv")


def _set_manifest_render(path, **render):
    root = zarr.open_group(str(path), mode="r+")
    man = dict(root.attrs["kdcache"])
    man["render"] = render
    root.attrs["kdcache"] = man


def test_train_and_verify_refuse_a_backend_mismatch(dataset, tcache, sharp_weights, tmp_path):
    """A cache whose groups were rendered by another backend than its manifest names cannot be
    replayed with one backend: train stops before the first step, verify reports a problem."""
    from kdcache.cli import cli
    from kdcache.learn.trainer import TrainConfig, train
    from kdcache.data.render import render_backend

    c = tmp_path / "mixed.zarr"
    shutil.copytree(tcache, c)
    _set_manifest_render(c, **render_backend())  # the manifest says PIL, the groups say torch
    cfg = TrainConfig(**with_aug(dict(data=str(dataset), cache=str(c), student="py:kdcache.models.zoo:tiny_cnn",
                                      out=str(tmp_path / "run"), epochs=1, batch_size=4, res=RES, workers=0,
                                      device="cpu", progress=False)))
    # groups that record the manifest they were written with name the edit
    with pytest.raises(KdcacheError, match='manifest field render.backend was edited .* written with "torch"'):
        train(cfg)
    # groups written before they did: the backends of manifest and groups are compared
    shutil.rmtree(c)
    shutil.copytree(tcache, c)
    written_before_records(c)
    _set_manifest_render(c, **render_backend())
    with pytest.raises(KdcacheError, match="rendered with the torch backend but the cache's manifest says pil"):
        train(cfg)
    res = CliRunner().invoke(cli, ["verify", str(c), "--data", str(dataset), "--teacher", TEACHER, "--teacher-weights",
                                   str(sharp_weights), "--device", "cpu", "--json"])
    assert res.exit_code == 2 and "mixes two" in res.output, res.output
    # one group of three re-rendered with PIL: verify checks the others and reports that one as a problem
    shutil.rmtree(c)
    shutil.copytree(tcache, c)
    written_before_records(c)  # so that the unknown backend below is the manifest's own, not an edit
    g = zarr.open_group(str(c), mode="r+")["train-000001"]
    g.attrs["render"] = render_backend()
    res = CliRunner().invoke(cli, ["verify", str(c), "--data", str(dataset), "--teacher", TEACHER, "--teacher-weights",
                                   str(sharp_weights), "--device", "cpu", "--json"])
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    assert not r["ok"] and any("'train-000001' was rendered with the pil backend" in p for p in r["problems"])
    with pytest.raises(KdcacheError, match="'train-000001' was rendered with the pil backend"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "run1")}))
    # a backend this kdcache does not know is a clear error too
    _set_manifest_render(c, backend="opencv")
    with pytest.raises(KdcacheError, match="'opencv' backend, which this kdcache does not know"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "run2")}))
    res = CliRunner().invoke(cli, ["verify", str(c), "--data", str(dataset), "--teacher", TEACHER, "--teacher-weights",
                                   str(sharp_weights), "--device", "cpu"])
    assert res.exit_code != 0 and "does not know" in res.output


def test_verify_passes_on_a_torch_cache_and_names_a_device_difference(dataset, tcache, sharp_weights, tmp_path):
    from kdcache.cli import cli

    args = ["verify", str(tcache), "--data", str(dataset), "--teacher", TEACHER, "--teacher-weights",
            str(sharp_weights), "--device", "cpu", "--samples", "1000", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["ok"] and r["render"]["matches"] and r["max_abs_delta_logprob"] == 0.0
    assert r["render"]["here"]["backend"] == "torch"
    # a cache rendered on CUDA, replayed on this CPU: the same rule as a PIL flavour (a warning and a fix)
    c = tmp_path / "cuda.zarr"
    shutil.copytree(tcache, c)
    rec = dict(CacheReader(str(c)).manifest["render"], device="cuda", decoder="nvjpeg", gpu="NVIDIA H100 80GB HBM3")
    _set_manifest_render(c, **rec)
    if not torch.cuda.is_available():
        msg = render_mismatch(rec)
        assert msg and "device cuda (here cpu)" in msg and "cuda machine" in msg
        res = CliRunner().invoke(cli, ["verify", str(c)] + args[2:])
        assert res.exit_code == 0, res.output
        r = json.loads(res.stdout)
        assert not r["render"]["matches"] and any("device cuda (here cpu)" in w for w in r["warnings"])


def test_inspect_renders_a_torch_cache(dataset, tcache, tmp_path):
    from kdcache.tools.inspection import render_record

    r = CacheReader(str(tcache))
    name = r.shard_names()[0]
    key = str(r.keys(name)[1])
    out = render_record(str(tcache), name, key, str(dataset), str(tmp_path / "rec.png"), view=1)
    assert (tmp_path / "rec.png").stat().st_size > 1000 and not any("rendered" in w for w in out["warnings"])


def test_pil_caches_still_say_pil(cache):
    """Caches written before the torch backend (no `backend` field) and PIL caches replay with PIL."""
    m = CacheReader(str(cache)).manifest["render"]
    assert renderer_for(m) is PIL_RENDERER
    legacy = {k: v for k, v in m.items() if k != "backend"}
    assert renderer_for(legacy) is PIL_RENDERER and render_mismatch(legacy) is None


def test_cuda_without_an_index_is_the_current_cuda_device(monkeypatch):
    """`--device cuda` names the current CUDA device: an image nvJPEG decoded on cuda:0 is on it (on
    the first GPU run, `cuda` vs `cuda:0` stopped every `--render torch` precompute, and the trainer's
    set_device refused `cuda`). The device is named where it is made: resolve_device and the renderer."""
    from kdcache.data.render import TorchRenderer
    from kdcache.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert TorchRenderer("cuda").device == torch.device("cuda:0")
    assert TorchRenderer("cuda:1").device == torch.device("cuda:1") != torch.device("cuda:0")
    assert TorchRenderer("cpu").device == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda:0") == resolve_device("auto")
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: this rank's GPU, as for auto
    assert resolve_device("cuda") == torch.device("cuda:1") == resolve_device("auto")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
