"""docs/format.md as a spec an outside reader can follow: the view sampler (version 1) and the view
digests are implemented here from the page's text alone — numpy, hashlib and math, not kdcache's
views or store code — and must reproduce the page's test vectors, a real compact cache's views
and every recorded view digest of real caches. The page's tables are also checked against
kdcache itself, so the page cannot drift from the code."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr

from conftest import NUM_CLASSES, corrupt_jpeg, encode, make_image, plain_keys, precompute_config, sharp_teacher

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


# ---- the page's tables ---------------------------------------------------------------------------


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def table(text: str, header_start: str) -> list[list[str]]:
    """The rows of the markdown table whose header row begins with ``header_start``, as cells."""
    lines = text.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[at + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in ln.strip().strip("|").split("|")])
    return rows


def nums(cell: str, cast=float) -> list:
    return [cast(x) for x in cell.split(",")]


def crop_vectors() -> list[dict]:
    out = []
    for seed, key, view, wh, scale, ratio, flip_on, box, flip in table(section("The view sampler"), "| seed | key"):
        w, h = (int(x) for x in wh.split("×"))
        out.append(dict(seed=int(seed), key=key, view=int(view), W=w, H=h, scale=tuple(nums(scale)),
                        ratio=tuple(nums(ratio)), flip_on=flip_on == "yes", box=tuple(nums(box, int)),
                        flip=flip == "yes"))
    return out


def mixup_vectors() -> list[dict]:
    return [dict(seed=int(seed), group=group, view=int(view), n=int(n), mix_with=nums(mw, int), mix_lam=nums(lam))
            for seed, group, view, n, mw, lam in table(section("The view sampler"), "| seed | group")]


def check_vector() -> tuple[int, list[int]]:
    """The page's PCG64 check vector: seed64("view", 0, "a", 0) and its first outputs."""
    text = " ".join(section("The view sampler").split())
    m = re.search(r'`seed64\("view", 0, "a", 0\)` = (\d+), and its first three outputs are (\d+), (\d+), (\d+)', text)
    assert m, "the check vector is not on the page"
    return int(m.group(1)), [int(m.group(i)) for i in (2, 3, 4)]


# ---- the sampler, from the page's text alone -------------------------------------------------------


def seed64(*parts) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8") + b"\x00")
    return int.from_bytes(h.digest(), "little")


class Stream:
    """The draws of one seeded PCG64: double, u32 (halves of an output, low first), below, upto."""

    def __init__(self, seed: int):
        self.bits = np.random.PCG64(seed)
        self.pending = None

    def output(self) -> int:
        return int(self.bits.random_raw())

    def double(self) -> float:
        return (self.output() >> 11) * 2.0 ** -53

    def u32(self) -> int:
        if self.pending is not None:
            half, self.pending = self.pending, None
            return half
        x = self.output()
        self.pending = x >> 32
        return x & 0xFFFFFFFF

    def below(self, n: int) -> int:
        if n == 1:
            return 0
        m = self.u32() * n
        while m % 2**32 < (2**32 - n) % n:
            m = self.u32() * n
        return m >> 32

    def upto(self, i: int) -> int:
        mask = 2 ** i.bit_length() - 1
        while True:
            v = self.u32() & mask
            if v <= i:
                return v


def spec_view(seed, key, v, W, H, scale, ratio, flip_on, name="inception_crop"):
    """(box, flip) of one view, as the page specifies it."""
    if name == "center_crop":
        side = max(1, min(round(0.875 * min(W, H)), W, H))
        return ((W - side) // 2, (H - side) // 2, side, side), False
    st = Stream(seed64("view", seed, key, v))
    (s0, s1), (r0, r1) = scale, ratio
    box = None
    for _ in range(10):
        a = (W * H) * (s0 + (s1 - s0) * st.double())
        t = math.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * st.double())
        w, h = round(math.sqrt(a * t)), round(math.sqrt(a / t))  # Python's round: ties to even
        if 1 <= w <= W and 1 <= h <= H:
            y = st.below(H - h + 1)
            x = st.below(W - w + 1)
            box = (x, y, w, h)
            break
    if box is None:
        rho = W / H
        if rho < r0:
            w, h = W, round(W / r0)
        elif rho > r1:
            w, h = round(H * r1), H
        else:
            w, h = W, H
        w, h = max(1, min(w, W)), max(1, min(h, H))
        box = ((W - w) // 2, (H - h) // 2, w, h)
    return box, (st.double() < 0.5) if flip_on else False


def spec_pairs(seed, group, v, n):
    """(mix_with, mix_lam) of one view of a group of n records, as the page specifies them."""
    mix_with, mix_lam = [-1] * n, [1.0] * n
    if n < 2:
        return mix_with, mix_lam
    st = Stream(seed64("mixup", seed, group, v))
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = st.upto(i)
        p[i], p[j] = p[j], p[i]
    for q in range(n // 2):
        u = st.double()
        lam = float(np.float16(max(u, 1.0 - u)))
        a, b = p[2 * q], p[2 * q + 1]
        mix_with[a], mix_with[b] = b, a
        mix_lam[a] = mix_lam[b] = lam
    return mix_with, mix_lam


def spec_group_views(manifest: dict, group: str, keys: list[str], size: np.ndarray, bad) -> dict:
    """Every view's box, flip, mix_with and mix_lam of one group ((N, V, ...) arrays)."""
    aug, seed, V, n = manifest["augmentation"], int(manifest["seed"]), int(manifest["views"]), len(keys)
    assert aug["version"] == 1
    box = np.zeros((n, V, 4), np.int64)
    flip = np.zeros((n, V), bool)
    mix_with = np.full((n, V), -1, np.int32)
    mix_lam = np.ones((n, V), np.float16)
    has_image = [k not in bad and size[i][0] >= 0 for i, k in enumerate(keys)]
    for v in range(V):
        for i, key in enumerate(keys):
            if has_image[i]:
                h, w = (int(t) for t in size[i])
                box[i, v], flip[i, v] = spec_view(seed, key, v, w, h, aug["scale"], aug["ratio"], aug["flip"],
                                                  aug.get("name", "inception_crop"))
        if aug["mixup"]:
            mw, lam = spec_pairs(seed, group, v, n)
            for i in range(n):
                if has_image[i] and mw[i] >= 0 and has_image[mw[i]]:
                    mix_with[i, v], mix_lam[i, v] = mw[i], lam[i]
    return {"box": box, "flip": flip, "mix_with": mix_with, "mix_lam": mix_lam}


# ---- the page's tables against the code, and the page's spec against the page ----------------------


def test_the_pages_test_vectors_are_kdcaches_views():
    from kdcache.data.views import AugSpec, mixup_pairs, sample_view, stable_seed

    crops, pairs = crop_vectors(), mixup_vectors()
    assert len(crops) >= 10 and len(pairs) >= 3
    for c in crops:
        got = sample_view(c["seed"], c["key"], c["view"], c["W"], c["H"],
                          AugSpec(scale=c["scale"], ratio=c["ratio"], flip=c["flip_on"]))
        assert (got.box, got.flip) == (c["box"], c["flip"]), c
    for m in pairs:
        mw, lam = mixup_pairs(m["seed"], m["group"], m["view"], m["n"])
        assert mw.tolist() == m["mix_with"] and lam.astype(float).tolist() == m["mix_lam"], m
    s, outputs = check_vector()
    assert stable_seed("view", 0, "a", 0) == s
    assert np.random.PCG64(s).random_raw(3).tolist() == outputs


def test_the_sampler_written_from_the_page_gives_its_test_vectors():
    s, outputs = check_vector()
    assert seed64("view", 0, "a", 0) == s
    st = Stream(s)
    assert [st.output() for _ in range(3)] == outputs
    for c in crop_vectors():
        got = spec_view(c["seed"], c["key"], c["view"], c["W"], c["H"], c["scale"], c["ratio"], c["flip_on"])
        assert got == (c["box"], c["flip"]), c
    for m in mixup_vectors():
        assert spec_pairs(m["seed"], m["group"], m["view"], m["n"]) == (m["mix_with"], m["mix_lam"]), m


def test_the_sampler_written_from_the_page_matches_kdcache_on_random_inputs():
    """Beyond the table: many sizes (tiny, extreme aspect ratios, large), ranges, seeds and keys,
    and group sizes up to 3000 for the pairs (rejections in below() and upto() included)."""
    from kdcache.data.views import AugSpec, mixup_pairs, sample_view

    rng = np.random.default_rng(20)
    for t in range(3000):
        W, H = int(rng.integers(1, 4000)), int(rng.integers(1, 4000))
        if t % 5 == 0:
            W = int(rng.integers(1, 12))
        scale = (float(rng.uniform(0.01, 0.6)), 1.0) if t % 3 else (0.9, 1.0)
        ratio = (0.75, 4 / 3) if t % 4 else (0.2, 5.0)
        seed, key, v = int(rng.integers(0, 2**62)), f"k{t}/é", int(rng.integers(0, 100))
        want = sample_view(seed, key, v, W, H, AugSpec(scale=scale, ratio=ratio, flip=bool(t % 7)))
        assert spec_view(seed, key, v, W, H, scale, ratio, bool(t % 7)) == (want.box, want.flip), (t, W, H)
    for t in range(60):
        n = int(rng.integers(0, 3000)) if t % 6 == 0 else int(rng.integers(0, 40))
        seed, v = int(rng.integers(0, 2**62)), int(rng.integers(0, 50))
        mw, lam = mixup_pairs(seed, f"train-{t:06d}", v, n)
        assert spec_pairs(seed, f"train-{t:06d}", v, n) == (mw.tolist(), lam.astype(float).tolist()), (t, n)


# ---- real caches -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec_caches(tmp_path_factory):
    """Shards with an undecodable image (kept with --skip-bad: its partner stays unmixed), mixup on,
    V = 3, odd and even shard sizes; a plain, a compact and a compact sampled cache of them, and the
    two compact ones again with every group's class ids coded "direct" (the writer's choice forced)."""
    from kdcache.cache.store import layouts
    from kdcache.tools.precompute import precompute

    root = tmp_path_factory.mktemp("spec")
    (root / "data").mkdir()
    rng = np.random.default_rng(9)
    for s, n in enumerate((7, 6)):
        with wds.TarWriter(str(root / "data" / f"train-{s:06d}.tar")) as w:
            for i in range(n):
                cls = int(rng.integers(NUM_CLASSES))
                image = (corrupt_jpeg(rng) if (s, i) == (0, 3)
                         else encode(make_image(rng, int(rng.integers(20, 70)), int(rng.integers(20, 70)), cls), "jpg"))
                w.write({"__key__": f"train{s}_{i:04d}", "jpg": image, "cls": str(cls).encode()})
    weights = root / "sharp.pt"
    torch.save(sharp_teacher(2, scale=20).state_dict(), weights)
    out = {}
    for name, kw in {"plain": {}, "compact": dict(compact=True),
                     "sample_compact": dict(targets="sample", samples=8, compact=True)}.items():
        for coding in ("chosen", "direct") if kw else ("chosen",):
            key = name if coding == "chosen" else f"{name}_direct"
            out[key] = root / f"{key}.zarr"
            with pytest.MonkeyPatch.context() as mp:
                if coding == "direct":
                    mp.setattr(layouts, "cheaper_coding", lambda codings: "direct")
                precompute(precompute_config(root / "data", out[key], weights, skip_bad=True, **kw))
    return out


def _root_manifest(path: Path) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs)["kdcache"]


def test_the_sampler_written_from_the_page_rebuilds_a_compact_caches_views(spec_caches):
    """Every view of every group of a compact cache (which stores none): the page's sampler, fed
    the manifest and the group's keys, sizes and bad records read with plain zarr, gives the views
    kdcache's reader returns (and precompute's teacher saw)."""
    from kdcache.cache.store import CacheReader

    man = _root_manifest(spec_caches["compact"])
    reader = CacheReader(str(spec_caches["compact"]))
    bad_seen = 0
    for name in man["shards"]:
        g = zarr.open_group(str(spec_caches["compact"] / name), mode="r")
        keys, bad = plain_keys(g["keys"]), dict(g.attrs)["bad"]
        bad_seen += len(bad)
        mine = spec_group_views(man, name, keys, g["size"][:], bad)
        theirs = reader.read_shard(name)
        for a in ("box", "flip", "mix_with", "mix_lam"):
            assert np.array_equal(mine[a], np.asarray(theirs[a]).astype(mine[a].dtype)), (name, a)
        assert (mine["mix_with"] >= 0).any()  # pairs are really exercised
    assert bad_seen == 1
    # and the plain cache of the same data stores exactly these views
    plain = _root_manifest(spec_caches["plain"])
    for name in plain["shards"]:
        g = zarr.open_group(str(spec_caches["plain"] / name), mode="r")
        mine = spec_group_views(plain, name, plain_keys(g["keys"]), g["size"][:], dict(g.attrs)["bad"])
        for a in ("box", "flip", "mix_with", "mix_lam"):
            assert np.array_equal(mine[a], g[a][:].astype(mine[a].dtype)), (name, a)


# ---- view digests, from the page -------------------------------------------------------------------


def lehmer_decode(lst: np.ndarray, code: np.ndarray) -> np.ndarray:
    """The page's decoding of one view's class codes (Compact layout)."""
    avail = np.ones(lst.shape, bool)
    cls = np.full(code.shape, -1)
    rows = np.arange(len(lst))
    for j in range(code.shape[1]):
        hit = avail & (np.cumsum(avail, 1) - 1 == code[:, j:j + 1])
        at, found = hit.argmax(1), hit.any(1)
        cls[found, j] = lst[rows[found], at[found]]
        avail[rows[found], at[found]] = False
    return cls


def page_digest(record: str | None, keys: list[str], arrays: list[tuple[np.ndarray, str]]) -> str:
    h = hashlib.sha256()
    if record is not None:
        h.update(record.encode("utf-8") + b"\n")
    h.update("\n".join(keys).encode("utf-8"))
    for a, dtype in arrays:
        a = np.ascontiguousarray(np.asarray(a).astype(dtype))
        h.update(f"|{a.shape}|".encode("ascii"))
        h.update(a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("which", ["plain", "compact", "sample_compact", "compact_direct", "sample_compact_direct"])
def test_view_digests_recomputed_from_this_page(spec_caches, which):
    """Each recorded view digest, recomputed from the page's description: arrays read with plain
    zarr, a compact group's classes decoded as the page shows and its views rebuilt by the page's
    sampler. So an outside reader can check a cache's integrity without kdcache."""
    path = spec_caches[which]
    man = _root_manifest(path)
    V, kind = int(man["views"]), man["targets"]["kind"]
    compact = man["encoding"]["layout"] == "compact"
    checked = 0
    for name in man["shards"]:
        g = zarr.open_group(str(path / name), mode="r")
        attrs = dict(g.attrs)
        keys = plain_keys(g["keys"])
        record = attrs["decode_record"]
        if which.endswith("_direct"):  # the page's "direct" decoding is what these digests check
            assert attrs["class_coding"] == "direct"
        geo = (spec_group_views(man, name, keys, g["size"][:], attrs["bad"]) if compact
               else {a: g[a][:] for a in ("box", "flip", "mix_with", "mix_lam")})
        for v in range(V):
            if compact and attrs.get("class_coding", "image_list") == "image_list":
                classes = lehmer_decode(g["class_list"][:].astype(np.int64), g["class_code"][:, v].astype(np.int64))
            else:  # plain, or a compact group coded "direct": the ids as stored
                classes = g["classes"][:, v]
            if kind == "sample":
                counts = g["counts"][:, v]
                targets = [(counts, "u1"), (np.where(counts > 0, classes, -1), "<i8")]
            elif compact:
                targets = [(g["logprob_steps"][:, v], "u1"), (g["topk_logmass"][:, v], "<f2"), (classes, "<i8")]
            else:
                targets = [(g["logprobs"][:, v], "<f2"), (classes, "<i8")]
            arrays = ([(g["size"][:], "<i4")] + targets
                      + [(geo["box"][:, v], "<i8"), (geo["flip"][:, v], "u1"), (geo["mix_with"][:, v], "<i4"),
                         (geo["mix_lam"][:, v], "<f2")])
            assert page_digest(record, keys, arrays) == attrs["view_digests"][v], (name, v)
            checked += 1
    assert checked == V * len(man["shards"])
