"""CacheReader: read access to a cache, every read checked."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import zarr

from .. import encoding as enc
from ...errors import KdcacheError
from ..targets import kind_of
from .digests import DIGEST_ATTR, digest_of
from .integrity import (
    blosc_cut, damaged_error, EVERY_CHUNK_ATTR, filesystem_of, head_reader, list_all_groups, list_files,
    missing_data, nonfinite_records,
)
from .class_coding import coding_of, foreign_arrays
from .growth import group_views, growing_error, growing_from
from .index import entry_matches, open_arrays, read_index
from .layouts import decode_group, is_string_keys, read_keys
from .manifest import arrays_of, layout_arrays, layout_of, open_manifest
from .records import probe_record, RECORD_ATTR, record_problem


@dataclass
class ViewRecords:
    """One view of every record in one shard group: the arrays an epoch needs."""

    shard: str
    view: int
    keys: np.ndarray  # (N,) str
    size: np.ndarray  # (N, 2) int32 height, width
    logprobs: np.ndarray  # (N, k) float16 (float32 from a compact or sampled cache)
    classes: np.ndarray  # (N, k) int (-1 in the unused slots of sampled targets)
    box: np.ndarray  # (N, 4) int
    flip: np.ndarray  # (N,) bool
    mix_with: np.ndarray  # (N,) int32
    mix_lam: np.ndarray  # (N,) float16
    bad: frozenset
    counts: np.ndarray | None = None  # (N, k) uint8 for sampled targets (logprobs then holds log(counts / N))

    def __len__(self) -> int:
        return len(self.keys)

# Groups of a remote cache read at once by the paths that read many (train start-up, a data worker's
# epoch, verify, inspect): on object storage every request waits tens of milliseconds, and one group
# after another made train's start-up check of 100 shards take 55 s at 20 ms per request
# (docs/benchmarks.md, "Scale").
REMOTE_READS_AT_ONCE = 16


class CacheReader:
    """Read access to a cache (local path or fsspec URL). Opening validates the format.

    A complete shard group is validated once, when first read: its arrays, their shapes, and that
    every array's data files are really there (one listing of the group). Any array read that
    fails to decode raises a KdcacheError naming the cache, the group and the array. Every view read
    is checked against the digest precompute recorded (``view_digest``), so an edited value is an
    error naming the group and view (``check_digests=False`` reads it anyway; ``digest_problems``
    lists mismatches without raising).

    On a remote cache written by this kdcache, ``load_index`` (called by the shard listing, train
    start-up and data workers) reads the index of complete groups (``index.py``): the groups it
    records need no request of their own until their data is read, and an entry is checked against
    the file listing before that (docs/format.md, "The index of complete groups").
    """

    def __init__(self, path: str, storage_options: dict | None = None, check_digests: bool = True,
                 check_values: bool = True, growing_ok: bool = False):
        self.path = str(path)
        self.check_digests = check_digests  # False: read views whose content no longer matches its digest
        self.check_values = check_values  # False: also read top-k log-probs that are NaN or +inf (inspect)
        self.root, self.manifest = open_manifest(self.path, storage_options)
        if growing_from(self.manifest) is not None and not growing_ok:  # (precompute reads the groups it grows)
            raise growing_error(self.manifest, self.path)
        self.format_version = int(self.manifest["format_version"])
        self.kind = kind_of(self.manifest)  # "topk" or "sample"
        self.layout = layout_of(self.manifest)  # "plain" or "compact"
        self._fs = filesystem_of(self.path, storage_options)
        probe_record(self.root, self.manifest, self.path)  # an edited manifest is named before anything is read
        self._groups: set[str] = set()  # shard groups seen so far (groups are never removed)
        self._valid: dict[str, tuple[int, dict, dict]] = {}  # complete shard -> (N, arrays, attrs)
        # Complete groups as the shard listing read them (their metadata is read there anyway, and a
        # complete group never changes): shard_attrs, is_complete and the first read reuse them.
        self._complete_nodes: dict = {}
        self._listed_groups = 0  # groups whose files were listed (remote: the second lists them all)
        self._all_files: dict[str, dict[str, int | None]] | None = None
        self._index: dict[str, dict] = {}  # complete groups from the index (index.py): group -> entry
        self._index_read = False
        self._listing_lock = threading.Lock()  # groups may be read from several threads (train start-up)

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["teacher"]["num_classes"])

    @property
    def logprob_step(self) -> float:
        """The quantisation step of a compact top-k cache's log-probs (nats); 0.0 where they are stored
        as they are (plain layout) or there are none (sampled targets)."""
        if self.layout != "compact" or self.kind != "topk":
            return 0.0
        return float(self.manifest["encoding"].get("logprob_step", enc.LOGPROB_STEP))

    @property
    def samples(self) -> int | None:
        """N, the draws per record of a sampled cache (None for top-k)."""
        return int(self.manifest["targets"]["samples"]) if self.kind == "sample" else None

    @property
    def is_remote(self) -> bool:
        """Whether the cache is behind an fsspec URL (each request may wait on the network)."""
        return self._fs is not None

    def read_ahead(self, names, fn, at_once: int | None = None):
        """``fn(name)`` for each of ``names``, yielded in order. On a remote cache up to ``at_once``
        calls run ahead in threads, so their requests wait together rather than one group after
        another; at most that many results are held. An error is raised when its name's turn comes.
        A local cache (or one name) is read in turn, in this thread."""
        names = list(names)
        at_once = REMOTE_READS_AT_ONCE if at_once is None else at_once  # (the module's value when called)
        if not self.is_remote or len(names) < 2 or at_once < 2:
            for name in names:
                yield fn(name)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(at_once, len(names))) as pool:
            pending = deque(pool.submit(fn, n) for n in names[:at_once])
            following = iter(names[at_once:])
            try:
                while pending:
                    done = pending.popleft()
                    nxt = next(following, None)
                    if nxt is not None:
                        pending.append(pool.submit(fn, nxt))
                    yield done.result()
            finally:
                for f in pending:  # the caller stopped early (or an error): start nothing more
                    f.cancel()

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("class_names")

    def load_index(self) -> int:
        """Read the index of complete groups of a remote cache, once (a listing of ``.index/`` and a
        read per segment); from then on the shard list, ``is_complete``, ``shard_attrs`` and the first
        read of an indexed group need no request of their own for it (``_open_shard`` checks the
        entry against the file listing it takes anyway). Returns the number of indexed groups."""
        if not self._index_read and self._fs is not None:
            self._index_read = True
            self._index = read_index(*self._fs)
        return len(self._index)

    def _indexed_names(self) -> list[str] | None:
        """The shard list from the index and one listing of the root (names only), the groups
        not in the index opened one by one; None without an index."""
        if not self.load_index():
            return None
        fs, base = self._fs
        found = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=True)
                 if e.get("type") == "directory"}
        names = set()
        for n in sorted(found):
            if n.startswith("."):
                continue
            if n not in self._index:  # not indexed (incomplete, or written without the index): open it
                try:
                    node = self.root[n]
                except KeyError:
                    continue
                except Exception:  # its zarr.json does not parse: listed, and shard_attrs names it
                    node = None
                if node is not None and not isinstance(node, zarr.Group):
                    continue
                if node is not None and node.attrs.get("complete", False):
                    self._complete_nodes[n] = node
            names.add(n)
        self._groups |= names
        return sorted(names)

    def shard_names(self) -> list[str]:
        """Shard groups present in the store (complete or not), sorted."""
        indexed = self._indexed_names()
        if indexed is not None:
            return indexed
        with warnings.catch_warnings():
            # zarr warns about anything in the root that is not a node: `.claims/` is kdcache's own
            warnings.filterwarnings("ignore", message=r"Object at \..* is not recognized as a component")
            try:
                nodes = dict(self.root.groups())
                self._groups = set(nodes)
                self._complete_nodes.update({n: g for n, g in nodes.items() if g.attrs.get("complete", False)})
            except Exception:  # a group whose zarr.json does not parse: list without reading them,
                self._groups = set(self._child_nodes())  # and let shard_attrs name the damaged one
        return sorted(self._groups)

    def _child_nodes(self) -> list[str]:
        from zarr.core.sync import sync

        store, base = self.root.store_path.store, self.root.store_path.path

        async def listing():
            names = [n async for n in store.list_dir(base)]
            keep = []
            for n in names:
                if not n.startswith(".") and await store.exists(f"{base}/{n}/zarr.json".lstrip("/")):
                    keep.append(n)
            return keep

        return sync(listing())

    def has_shard(self, name: str) -> bool:
        # A name not seen yet: open that group alone (one metadata read) rather than list every group
        # (a read per group), so a reader that needs a few groups (a data worker) reads only those.
        if name in self._groups or name in self._index:
            return True
        try:
            node = self.root[name]
        except KeyError:
            return False
        except Exception:  # its zarr.json does not parse: the listing copes, and shard_attrs names it
            return name in set(self.shard_names())
        if not isinstance(node, zarr.Group):
            return False
        self._groups.add(name)
        if node.attrs.get("complete", False):
            self._complete_nodes[name] = node
        return True

    def shard_attrs(self, name: str) -> dict:
        if name in self._valid:
            return dict(self._valid[name][2])
        if name in self._index:
            return dict(self._index[name]["attrs"])
        if name not in self._complete_nodes and not self.has_shard(name):
            raise KdcacheError(f"cache {self.path} has no shard group {name!r} (run precompute on that shard)")
        if name in self._complete_nodes:  # (has_shard keeps a complete group it opened)
            return dict(self._complete_nodes[name].attrs)
        try:
            return dict(self.root[name].attrs)
        except Exception as e:
            raise damaged_error(f"the metadata of cache group {name!r} in {self.path}", e) from None

    def is_complete(self, name: str) -> bool:
        if name in self._valid or name in self._complete_nodes or name in self._index:
            return True
        if not self.has_shard(name):
            return False
        if name in self._complete_nodes:  # has_shard just opened it
            return True
        try:
            return bool(dict(self.root[name].attrs).get("complete", False))
        except ValueError:  # its zarr.json does not parse: it cannot say complete (precompute redoes it)
            return False

    def check_shard(self, name: str) -> int:
        """Validate one complete shard group's arrays (presence, shapes, dtypes, data files).
        Returns N.

        A complete group never changes, so it is validated once per reader and its array
        handles are kept for the reads that follow.
        """
        return self._open_shard(name)[0]

    def _open_shard(self, name: str) -> tuple[int, dict, dict]:
        if name in self._valid:
            return self._valid[name]
        listed = None
        if name in self._index:  # believed only while the files it records are listed at their sizes
            listed = self._group_files(name)
            if not entry_matches(self._index[name], listed[0]):
                del self._index[name]  # stale (the group was redone, damaged or deleted): read it as stored
        entry = self._index.get(name)
        attrs = self.shard_attrs(name)
        problem = record_problem(self.manifest, attrs, name, self.path)
        if problem:
            raise KdcacheError(problem)
        if not attrs.get("complete", False):
            raise KdcacheError(
                f"shard {name!r} in cache {self.path} is incomplete (precompute was interrupted); "
                "re-run the same `kdcache precompute` command to finish it"
            )
        try:
            if entry is not None:
                present = open_arrays(self.root, name, entry)
            else:
                present = arrays_of(self._complete_nodes[name] if name in self._complete_nodes else self.root[name])
        except Exception as e:
            raise damaged_error(f"the arrays' metadata of cache group {name!r} in {self.path}", e) from None
        names = layout_arrays(self.manifest, coding_of(attrs))
        foreign = foreign_arrays(attrs, present) if self.layout == "compact" else []
        if foreign:
            raise KdcacheError(
                f"shard {name!r} in cache {self.path}: its class_coding attribute says {coding_of(attrs)!r} but it holds "
                f"the arrays {foreign} of the other coding; its zarr.json was edited or the store is damaged. Restore "
                "it, or delete the group and re-run precompute")
        missing = [a for a in names if a not in present]
        if missing:
            raise KdcacheError(f"shard {name!r} in cache {self.path} lacks arrays {missing}; re-run precompute on it")
        n, V, k = int(attrs.get("num_samples", -1)), group_views(attrs, self.manifest), self.topk
        keys = present["keys"]
        if self.format_version == 1:
            keys_shape = (n,)
            if not is_string_keys(keys):
                raise KdcacheError(
                    f"shard {name!r} array 'keys' is {keys.dtype}, expected strings (cache format 1); the store is damaged"
                )
        else:  # (N, L) zero-padded UTF-8 rows, L >= 1
            width = int(keys.shape[1]) if len(keys.shape) == 2 and keys.shape[1] >= 1 else 1
            keys_shape = (n, width)
            if np.dtype(keys.dtype) != np.uint8:
                raise KdcacheError(
                    f"shard {name!r} array 'keys' is {keys.dtype}, expected uint8 (cache format {self.format_version}); "
                    "the store is damaged"
                )
        cl = present.get("class_list")
        u = int(cl.shape[1]) if cl is not None and len(cl.shape) == 2 and cl.shape[1] >= 1 else 1
        expect = {
            "keys": keys_shape, "size": (n, 2), "logprobs": (n, V, k), "classes": (n, V, k), "counts": (n, V, k),
            "box": (n, V, 4), "flip": (n, V), "mix_with": (n, V), "mix_lam": (n, V), "class_list": (n, u),
            "class_code": (n, V, k), "logprob_steps": (n, V, k - 1), "topk_logmass": (n, V),
        }
        for a in names:
            if tuple(present[a].shape) != expect[a]:
                raise KdcacheError(
                    f"shard {name!r} array {a!r} has shape {tuple(present[a].shape)}, expected {expect[a]} "
                    f"(num_samples={n}, views={V}, topk={k}); the store is damaged"
                )
        want_dtype = {"logprobs": np.float16, "counts": np.uint8, "logprob_steps": np.uint8,
                      "topk_logmass": np.float16, "class_code": enc.code_dtype(u)}
        for a, dt in want_dtype.items():
            if a in present and a in names and np.dtype(present[a].dtype) != np.dtype(dt):
                raise KdcacheError(f"shard {name!r} array {a!r} is {present[a].dtype}, expected {np.dtype(dt)}")
        try:
            files, shared = listed if listed is not None else self._group_files(name)
            lost = missing_data(present, files, n, k, attrs, names)
            if lost is not None and shared:  # the cache's listing may predate the group: list it alone
                files = list_files(self.root, self.path, name, self._fs)
                lost = missing_data(present, files, n, k, attrs, names)
        except Exception as e:
            raise damaged_error(f"the file listing of cache group {name!r} in {self.path}", e) from None
        if lost is None and not attrs.get(EVERY_CHUNK_ATTR):  # an older group: no checksums
            read_head = head_reader(self.path, name, self._fs)
            if read_head is not None:
                try:
                    cut = blosc_cut(present, files, read_head)
                except Exception as e:
                    raise damaged_error(f"the chunk files of cache group {name!r} in {self.path}", e) from None
                if cut is not None:
                    raise KdcacheError(
                        f"cannot read array {cut[0]!r} of cache group {name!r} in {self.path}: the stored data is "
                        f"damaged ({cut[1]}); re-run precompute on that shard after deleting the group, or restore it"
                    )
        if lost is not None:
            a, why = lost
            raise KdcacheError(
                f"cache group {name!r} in {self.path} has no data for array {a!r} ({why}): the cache is damaged; "
                "re-run precompute on that shard after deleting the group, or restore it"
            )
        self._valid[name] = (n, {a: present[a] for a in names}, attrs)
        if self._all_files is not None:
            self._all_files.pop(name, None)  # checked: its part of the listing is not needed again
        return self._valid[name]

    def _group_files(self, name: str) -> tuple[dict[str, int | None], bool]:
        """(every file of group ``name`` with its size, whether it comes from the listing of the whole
        cache). A remote cache lists its first group on its own and, from the second on, takes one
        listing of every group (``list_all_groups``): checking all groups of a cache then costs
        about one list request per 1000 files instead of one per group. A group missing from that
        listing (written since) is listed on its own."""
        with self._listing_lock:  # one listing of the whole cache, whichever thread asks first
            self._listed_groups += 1
            if self._fs is not None and self._listed_groups >= 2 and self._all_files is None:
                self._all_files = list_all_groups(*self._fs)
        if self._all_files is not None:
            if name in self._all_files:
                return self._all_files[name], True
        return list_files(self.root, self.path, name, self._fs), False

    def group_nbytes(self, name: str) -> int | None:
        """Bytes stored under one group (every chunk and metadata file), from the same listing the
        completeness check uses; None where the store lists names without sizes."""
        files, _ = self._group_files(name)
        if any(size is None for size in files.values()):
            return None
        return int(sum(files.values()))

    def _read(self, name: str, aname: str, fn):
        """Run one array read; a decode or I/O error becomes a KdcacheError naming the array."""
        try:
            return fn()
        except KdcacheError as e:  # decoded, but not valid (a key that is not UTF-8)
            raise KdcacheError(f"cannot read array {aname!r} of cache group {name!r} in {self.path}: {e}") from None
        except Exception as e:
            raise damaged_error(f"array {aname!r} of cache group {name!r} in {self.path}", e) from None

    def keys(self, name: str) -> np.ndarray:
        """The sample keys of a complete shard group, in tar order."""
        arr = self._open_shard(name)[1]["keys"]
        return self._read(name, "keys", lambda: read_keys(arr))

    def sizes(self, name: str) -> np.ndarray:
        """(N, 2) source image (height, width) of a complete shard group; (-1, -1) for bad images."""
        arr = self._open_shard(name)[1]["size"]
        return self._read(name, "size", lambda: np.asarray(arr[:]))

    # -- reading and decoding --

    def _stored(self, name: str, view: int | None) -> dict[str, np.ndarray]:
        """The group's arrays as stored; per-view arrays cut to view ``view`` (kept as a column of
        one) or all views (None)."""
        _, arr, _ = self._open_shard(name)
        out = {}
        for a in arr:  # the group's arrays (its layout and class coding), in their order
            if a == "keys":
                out[a] = self._read(name, a, lambda: read_keys(arr["keys"]))
            elif a in ("size", "class_list") or view is None:
                out[a] = self._read(name, a, lambda a=a: np.asarray(arr[a][:]))
            else:
                out[a] = self._read(name, a, lambda a=a: np.asarray(arr[a][:, view : view + 1]))
        return out

    def _decode(self, name: str, st: dict, view: int | None) -> dict[str, np.ndarray]:
        """Decoded arrays from stored ones, whatever the layout (``layouts.decode_group``)."""
        bad = self._open_shard(name)[2].get("bad") or {} if self.layout == "compact" else {}
        return decode_group(self.manifest, self.path, name, st, view, bad, self.logprob_step, self.samples)

    def group_views(self, name: str) -> int:
        """V of one group: the manifest's, except in a cache being grown (groups not grown yet hold fewer)."""
        return group_views(self._open_shard(name)[2], self.manifest)

    def read_view(self, name: str, view: int) -> ViewRecords:
        """View ``view`` of every record in shard ``name``: one chunk read per array."""
        _, _, attrs = self._open_shard(name)
        V = group_views(attrs, self.manifest)
        if not 0 <= view < V:
            raise KdcacheError(f"view {view} is out of range; cache {self.path} holds views 0..{V - 1}")
        d = self._decode(name, self._stored(name, view), view)
        if self.check_digests:
            self._check_digest(name, view, attrs, d, 0)
        if self.check_values:
            self.check_finite(name, d, [view])
        rec = ViewRecords(
            shard=name, view=view, keys=d["keys"], size=d["size"], logprobs=d["logprobs"][:, 0],
            classes=d["classes"][:, 0], box=d["box"][:, 0], flip=d["flip"][:, 0], mix_with=d["mix_with"][:, 0],
            mix_lam=d["mix_lam"][:, 0], bad=frozenset(attrs.get("bad", {})),
            counts=d["counts"][:, 0] if "counts" in d else None,
        )
        good = np.array([k not in rec.bad for k in rec.keys], dtype=bool)
        if good.any():
            ids = rec.classes[good]
            if rec.counts is not None:
                ids = ids[rec.counts[good] > 0]
            if len(ids) and (ids.min() < 0 or ids.max() >= self.num_classes):
                raise KdcacheError(
                    f"cache group {name!r} of {self.path}: array 'classes' holds class id {int(ids.max()) if ids.max() >= self.num_classes else int(ids.min())} "
                    f"in view {view}, outside the manifest's {self.num_classes} classes: the cache is damaged or its "
                    "manifest was edited; re-run precompute")
        return rec

    def view_digests(self, name: str) -> list[str] | None:
        """The digests precompute recorded for a group's views (None for caches made before them)."""
        d = self._open_shard(name)[2].get(DIGEST_ATTR)
        return list(d) if d is not None else None

    def digest_problems(self, name: str, data: dict | None = None) -> list[int]:
        """The views of a group whose content no longer matches its recorded digest (all read)."""
        want = self.view_digests(name)
        if want is None:
            return []
        got = self.computed_digests(name, data)
        return [v for v in range(len(got)) if got[v] != want[v]]

    def computed_digests(self, name: str, data: dict | None = None) -> list[str]:
        """The digest of every view of a group as its data (``data``: all views decoded, default read
        here) is now; ``view_digests`` are the ones precompute recorded."""
        d = data if data is not None else CacheReader._read_all(self, name)
        record = self._open_shard(name)[2].get(RECORD_ATTR)
        return [digest_of(self.kind, self.layout, d, v, record) for v in range(self.group_views(name))]

    def _check_digest(self, name: str, view: int, attrs: dict, d: dict, j: int) -> None:
        want = attrs.get(DIGEST_ATTR)
        if want is None or digest_of(self.kind, self.layout, d, j, attrs.get(RECORD_ATTR)) == want[view]:
            return
        raise KdcacheError(
            f"cache group {name!r} of {self.path}: view {view} does not match the digest precompute recorded for it: "
            "its targets or geometry were changed after precompute (edited by hand or by a tool, or damaged). "
            "Re-run precompute on that shard (delete the group first), or pass --allow-edited-cache to use the "
            "changed values knowingly")

    def read_shard(self, name: str) -> dict[str, np.ndarray]:
        """Every array of one shard group, all views, decoded (each view checked against its digest)."""
        out = self._read_all(name)
        if self.check_digests:
            bad = self.digest_problems(name, out)
            if bad:
                self._check_digest(name, bad[0], self._open_shard(name)[2], out, bad[0])
        if self.check_values:
            self.check_finite(name, out)
        return out

    def check_finite(self, name: str, d: dict | None = None, views: list[int] | None = None) -> None:
        """Refuse (KdcacheError) top-k log-probs that are NaN or +inf in a good record of group
        ``name`` (decoded data ``d`` of view columns ``views``; default: all read here): a cache
        written by a kdcache that did not check its teacher's outputs. ``read_view`` and
        ``read_shard`` call it unless ``check_values`` is off. (Sampled counts cannot show a
        non-finite teacher: ``verify`` finds it by re-running the teacher.)"""
        if self.kind != "topk":
            return
        d = d if d is not None else self._read_all(name)
        views = views if views is not None else list(range(self.group_views(name)))
        bad = frozenset(self._open_shard(name)[2].get("bad") or {})
        valid = np.array([str(k) not in bad for k in d["keys"]], dtype=bool)
        hits = nonfinite_records(d["logprobs"], valid)
        if not hits:
            return
        i, j = hits[0]
        more = f" (and {len(hits) - 1} more records)" if len(hits) > 1 else ""
        raise KdcacheError(
            f"cache group {name!r} of {self.path}: the stored log-probs of key {str(d['keys'][i])!r} view {views[j]} "
            f"are not finite (NaN or +inf){more}: no teacher output is. The cache was written by a kdcache that did "
            "not check its teacher's outputs (a damaged checkpoint, float16 overflow); fix the teacher and re-run "
            "precompute on that shard (delete the group first)")

    def _read_all(self, name: str) -> dict[str, np.ndarray]:
        """Every array of one shard group, all views, decoded, not checked against the digests."""
        return self._decode(name, self._stored(name, None), None)

    def nbytes_stored(self, name: str) -> int:
        g = self.root[name]
        return int(sum(g[a].nbytes_stored() for a in g.array_keys()))

    def nbytes_raw(self, name: str) -> int:
        """Uncompressed bytes of a shard group's arrays (format 1 string keys: their UTF-8 bytes).
        A group already read uses the array handles its check opened (no metadata read again)."""
        if name in self._valid:
            arrays = self._valid[name][1]
        else:
            g = self.root[name]
            arrays = {a: g[a] for a in g.array_keys()}
        total = 0
        for a, arr in arrays.items():
            if a == "keys" and is_string_keys(arr):
                total += int(sum(len(str(k).encode()) for k in arr[:]))
            else:
                total += int(np.prod(arr.shape)) * np.dtype(arr.dtype.to_native_dtype() if hasattr(arr.dtype, "to_native_dtype") else arr.dtype).itemsize
        return total
