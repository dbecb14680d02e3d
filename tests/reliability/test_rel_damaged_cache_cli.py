"""Faults in a finished cache, read by `kdcache train`, `verify` and `inspect`: the manifest
edited (views, topk, the teacher's class count, the format version), an array rewritten with
the wrong shape, a group still marked complete with an array directory removed, a group's
num_samples edited, one group's keys copied over another's, two records' log-probs swapped.

Each command must refuse with exit code 2 (verify: 1 where it can show that the records disagree)
and one message naming the group and the array (or the manifest field), never exit 0 and never a
traceback. The commands run in this process through click's CliRunner on real files.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import zarr

from conftest import write_dataset, written_before_records
from relhelpers import NC, TINY, precompute_args, tally, train_args
from relhelpers import cli_inproc as cli

G = "train-000001"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from kdcache.models.zoo import tiny_cnn

    root = tmp_path_factory.mktemp("damagedcli")
    write_dataset(root / "train", shards=3, per_shard=5, seed=31)
    torch.manual_seed(4)
    torch.save(tiny_cnn(NC).state_dict(), root / "teacher.pt")
    code, out = cli(*precompute_args(root / "train", root / "good.zarr", root / "teacher.pt"))
    assert code == 0, out
    return root


def _edit_root(field, value):
    def damage(c):
        meta = json.loads((c / "zarr.json").read_text())
        m = meta["attributes"]["kdcache"]
        *path, last = field.split(".")
        for p in path:
            m = m[p]
        m[last] = value
        (c / "zarr.json").write_text(json.dumps(meta))
    return damage


def _edit_group(key, value):
    def damage(c):
        meta = json.loads((c / G / "zarr.json").read_text())
        meta["attributes"][key] = value
        (c / G / "zarr.json").write_text(json.dumps(meta))
    return damage


def _wrong_shape(c):
    """logprobs rewritten (with zarr, valid checksums) one record short."""
    g = zarr.open_group(str(c / G), mode="r+")
    a = g["logprobs"]
    data = a[:][:-1]
    new = g.create_array("logprobs", shape=data.shape, chunks=(data.shape[0], 1, data.shape[2]), dtype=a.dtype,
                         overwrite=True, fill_value=a.fill_value)
    new[...] = data


def _array_dir_removed(c):
    shutil.rmtree(c / G / "mix_lam")


def _rows_swapped(c):
    """Two records' log-probs swapped, written through zarr (valid chunk checksums)."""
    a = zarr.open_group(str(c / G), mode="r+")["logprobs"]
    d = a[:]
    d[[0, 1]] = d[[1, 0]]
    a[...] = d


def _keys_of_another_group(c):
    shutil.rmtree(c / G / "keys")
    shutil.copytree(c / "train-000002" / "keys", c / G / "keys")


ANY_GROUP = "train-00000"  # a manifest edit spoils every group: the first one read is named
DAMAGE = {
    # name: (damage, words the refusal must hold: for every command, or per command)
    # groups record the manifest's decode fields (store.RECORD_ATTR): an edit is named as one
    "manifest-views-2-to-3": (_edit_root("views", 3), [ANY_GROUP, "manifest field views was edited",
                                                       "says 3", "written with 2"]),
    "manifest-topk-3-to-2": (_edit_root("topk", 2), [ANY_GROUP, "manifest field topk was edited", "written with 3"]),
    "manifest-num-classes-5-to-4": (_edit_root("teacher.num_classes", 4),
                                    [ANY_GROUP, "manifest field teacher.num_classes was edited", "written with 5"]),
    "manifest-format-version-99": (_edit_root("format_version", 99), ["format version 99"]),
    "array-wrong-shape": (_wrong_shape, [G, "'logprobs'", "shape (4, 2, 3)"]),
    "array-directory-removed": (_array_dir_removed, [G, "mix_lam"]),
    "group-num-samples-edited": (_edit_group("num_samples", 6), [G, "shape", "num_samples=6"]),
    "logprobs-rows-swapped": (_rows_swapped, {"train": [G, "digest"], "verify": [G], "inspect": [G]}),
    "keys-of-another-group": (_keys_of_another_group, {"train": [G, "'train2_0000'"], "verify": [G, "train2_0000"],
                                                       "inspect": [G]}),
}


def _commands(env, c, out, data=None, extra=()):
    return {
        "train": cli(*train_args(data or env / "train", c, out, *extra)),
        "verify": cli("verify", c, "--data", data or env / "train", "--teacher", TINY, "--teacher-weights",
                      env / "teacher.pt", "-n", 1000, "--device", "cpu"),
        "inspect": cli("inspect", c),
    }


def _check_refusals(name, results, words):
    for cmd, (code, out) in results.items():
        allowed = (1, 2) if cmd == "verify" else (2,)
        assert code in allowed, f"{cmd} exit {code} on {name}:\n{out}"
        if code == 2:
            line = [ln for ln in out.splitlines() if ln.startswith("error: ")]
            assert line, f"{cmd}: {out}"
            text = line[-1]
        else:
            text = out
        want = words[cmd] if isinstance(words, dict) else words
        missing = [w for w in want if w not in text]
        assert not missing, f"{cmd} on {name} does not name {missing}:\n{out}"


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_cache_is_refused_by_train_verify_and_inspect(env, tmp_path, name):
    damage, words = DAMAGE[name]
    c = tmp_path / "cache.zarr"
    shutil.copytree(env / "good.zarr", c)
    damage(c)
    tally(faults=3)
    results = _commands(env, c, tmp_path / "run")
    assert not (tmp_path / "run" / "model.pt").exists()
    _check_refusals(name, results, words)


def test_class_ids_beyond_the_edited_class_count_are_refused_naming_the_cache(env, tmp_path):
    """Unlabelled shards (so no label check stops train first): the manifest says 4 classes, the
    stored top-k holds class 4, in a cache made before groups recorded the manifest (a current one
    names the edit on open: test_damaged_cache_is_refused_by_train_verify_and_inspect). Train must refuse naming the cache group and the array, not train
    a 4-class head on ids it does not have (on CUDA the loss kernel does not check ids)."""
    import tarfile

    data = tmp_path / "nocls"
    data.mkdir()
    for src in sorted((env / "train").glob("*.tar")):
        with tarfile.open(src) as s, tarfile.open(data / src.name, "w") as d:
            for m in s.getmembers():
                if not m.name.endswith(".cls"):
                    d.addfile(m, s.extractfile(m))
    c = tmp_path / "cache.zarr"
    code, out = cli(*precompute_args(data, c, env / "teacher.pt"))
    assert code == 0, out
    written_before_records(c)  # a cache whose groups do not record the manifest: the class ids are the guard
    _edit_root("teacher.num_classes", 4)(c)
    from kdcache.cache.store import CacheReader

    assert any((CacheReader(str(c)).read_shard(n)["classes"] >= 4).any() for n in ("train-000000", G, "train-000002"))
    tally(faults=3)
    results = _commands(env, c, tmp_path / "run", data=data, extra=("--label-weight", 0))
    assert not (tmp_path / "run" / "model.pt").exists()
    _check_refusals("class ids beyond the class count", results,
                    {"train": [ANY_GROUP, "'classes'"], "verify": ["--num-classes"],
                     "inspect": ["class id outside 0..3"]})
