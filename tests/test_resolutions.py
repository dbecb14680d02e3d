"""A teacher at one resolution, a student at another (the paper's T384 -> S224): the crop box is in
source pixels, so the student sees the teacher's view, rendered at its own size."""

from __future__ import annotations

import pytest
import torch

import kdcache
from conftest import precompute_config
from kdcache.data.render import render
from kdcache.data.shards import decode_shard, expand_urls, shard_name
from kdcache.data.views import View


@pytest.fixture(scope="module")
def cache48(dataset, teacher_weights, tmp_path_factory):
    """The conftest data with its teacher at 48 px (V=2, mixup on)."""
    from kdcache.tools.precompute import precompute

    out = tmp_path_factory.mktemp("res48") / "cache.zarr"
    precompute(precompute_config(dataset, out, teacher_weights, res=48, views=2))
    return out


@pytest.mark.parametrize("student_res", [32, 64])
def test_the_student_sees_the_stored_box_rendered_at_its_own_size(dataset, cache48, student_res):
    cache = kdcache.open_cache(str(cache48))
    assert cache.resolution == 48
    loader = kdcache.ReplayLoader(str(dataset), cache, 8, res=student_res, device="cpu")
    images = {shard_name(u): decode_shard(u).images for u in expand_urls(str(dataset))}
    mixed = 0
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for batch in loader:
            px = batch.pixels("cpu")
            assert px.shape[-2:] == (student_res, student_res)
            for i, (shard, key) in enumerate(zip(batch.shards, batch.keys)):
                rec = cache.record(key, epoch % 2, shard=shard)
                view = View(*rec.box, rec.flip, rec.mix_with, rec.mix_lam)
                partner = partner_view = None
                if view.mixed:
                    mixed += 1
                    p = cache.record(cache.keys(shard)[rec.mix_with], epoch % 2, shard=shard)
                    partner, partner_view = images[shard][rec.mix_with], View(*p.box, p.flip, p.mix_with, p.mix_lam)
                want = render(images[shard][rec.index], view, student_res, partner, partner_view)
                assert torch.equal(px[i], want), (shard, key, epoch)
    assert mixed > 0  # mixed records were checked too, partner and λ included


def test_train_at_another_resolution_than_the_cache_records_both(dataset, cache48, tmp_path):
    from click.testing import CliRunner

    from kdcache.cli import cli
    import json

    res = CliRunner().invoke(cli, ["train", "--data", str(dataset), "--cache", str(cache48), "--student",
                                   "py:kdcache.models.zoo:tiny_cnn", "--res", "32", "--out", str(tmp_path / "run"),
                                   "--epochs", "1", "--batch-size", "7", "--workers", "0", "--device", "cpu",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert (resolved["res"], resolved["teacher_res"]) == (32, 48)
