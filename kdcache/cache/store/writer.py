"""CacheWriter: the cache's root created atomically, shard groups written by one claimed writer each."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
import warnings

import numpy as np
import zarr

from .. import encoding as enc
from ...errors import KdcacheError
from ...version import __version__
from ..claims import CLAIMS_DIR, describe_holder, read_claim, ShardClaim, ShardClaimedError, take_claim
from ..targets import kind_of
from .digests import DIGEST_ATTR, digest_of
from .integrity import (
    box_fill, damaged_error, EVERY_CHUNK_ATTR, filesystem_of, FILL_VALUES, list_files, missing_data,
    missing_data_quick,
)
from .index import group_entry, INDEX_DIR, read_index, entry_matches, segment_bytes, SEGMENT_GROUPS
from .layouts import (
    CLASS_LIST_CODEC, CODES_CODEC, CRC_CODEC, encode_group, encode_keys, FLOAT_CODEC, INT_CODEC, LOGMASS_CODEC,
)
from .class_coding import adopted_encoding, coding_of
from .growth import (
    finished_manifest, group_views, grown_manifest, growing_from, older_groups, older_groups_error, shrink_error,
)
from .manifest import (
    arrays_of, box_dtype, class_dtype, FORMAT_VERSION, is_local, KEYS_ATTRS, layout_arrays, layout_of,
    manifest_differences, MATCHED_FIELDS, open_manifest, open_root,
)
from .records import decode_record_text, probe_record, RECORD_ATTR, VIEWS_ATTR


# ---- root creation -----------------------------------------------------------------------------

# zarr-python's LocalStore writes a key to "<stem>.<uuid4 hex>.partial" and renames it into place
# (zarr/storage/_local.py, _atomic_write): a kill in between leaves one of these.
_ZARR_PARTIAL = re.compile(r"zarr\.[0-9a-f]{32}\.partial")
_OWN_TMP = re.compile(r"\.kdcache-root\.[0-9a-f]{32}\.(tmp|damaged)")


def _root_json_state(path: str) -> str:
    """'missing', 'damaged' (empty or not JSON: its writer died mid-write) or 'ok' (parses)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return "missing"
    try:
        json.loads(raw)
    except ValueError:
        return "damaged"
    return "ok" if raw.strip() else "damaged"


def _group_json(attributes: dict) -> bytes:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata

    meta = GroupMetadata(attributes=attributes, zarr_format=3)
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def set_attrs(node, new: dict) -> None:
    """Add ``new`` to a zarr node's attributes in one write of its zarr.json. (zarr's ``attrs.update``
    writes the document once per key, and a reader between two of those writes sees a group half
    described: a decode record without the view count it needs, found by a race of four writers.)"""
    node.attrs.put({**node.attrs.asdict(), **new})


class CacheWriter:
    """Creates a cache or opens one for more shards. Refuses a cache made with other settings.

    A shard group is written by one writer only (``claim``) and marked ``complete`` after all its
    arrays are written and found on disk; an incomplete group found later is rewritten, a
    complete one never is.

    How a writer uses claims (precompute)::

        writer = CacheWriter(out, manifest)
        try:
            for name in my_shards:
                claim = writer.claim(name)      # before any work on the shard
                if claim is None:               # complete, or another live writer has it
                    continue
                ...                             # teacher batches; every <= CLAIM_REFRESH_S seconds:
                writer.refresh_claims()         #   (or claim.refresh()); ClaimLostError: stop that shard
                writer.write_shard(name, ..., claim=claim)   # checks, writes, verifies, completes, releases
        finally:
            writer.release_claims()             # claims of shards not written (an error, Ctrl-C)

    A process killed while holding claims leaves their files; the next run takes them over (same
    host: the pid is gone; other host: after CLAIM_LEASE_S without a refresh).
    """

    def __init__(self, path: str, manifest: dict, storage_options: dict | None = None):
        self.path = str(path)
        self.storage_options = storage_options
        if manifest.get("format_version") != FORMAT_VERSION:
            raise KdcacheError(
                f"CacheWriter writes cache format {FORMAT_VERSION} only, the manifest says "
                f"{manifest.get('format_version')!r}; build it with make_manifest()"
            )
        self.manifest = manifest
        self.local = is_local(self.path)
        local_dir = self.path[len("file://") :] if self.path.startswith("file://") else self.path
        self._dir = local_dir if self.local else None
        self._fs = filesystem_of(self.path, storage_options)
        self._claims: dict[str, ShardClaim] = {}
        self.kind, self.layout = kind_of(manifest), layout_of(manifest)
        self.growing: int | None = None  # V_old while the cache's views are being grown (growth.py)
        self.root = self._create_or_open()
        self.record = decode_record_text(self.manifest)  # every group records it (RECORD_ATTR)
        # The index of complete groups (index.py), remote caches only: this writer's segment, and the
        # groups the index and one listing of the cache found complete when first asked (resume).
        self._index_token, self._index_seq, self._index_groups = uuid.uuid4().hex, 0, {}
        self._indexed_done: set[str] | None = None
        self._listed: set[str] | None = None  # the groups that listing found (None: no index, no listing)

    # -- creating or opening the root --

    def _create_or_open(self):
        path = self.path
        if self.local:
            self._create_local()
        else:
            exists = self._remote_exists()
            if not exists:
                try:
                    # The manifest goes into the group's first write, so a process that opens the
                    # store a moment later (another --shard-index group) never sees it without one.
                    kw = {"storage_options": self.storage_options} if self.storage_options else {}
                    zarr.open_group(path, mode="w-", zarr_format=3, attributes={"kdcache": self.manifest}, **kw)
                    return open_root(path, "r+", self.storage_options)
                except FileExistsError:
                    self._repair_remote_root()
        try:
            root, old = open_manifest(path, self.storage_options)
        except KdcacheError as e:
            raise KdcacheError(f"refusing to write into {path}: {e}. Choose an empty or new --out path.") from None
        if old.get("format_version") != FORMAT_VERSION:
            made_by = old.get("kdcache_version")
            raise KdcacheError(
                f"refusing to write into {path}: the cache was made by an older kdcache "
                f"({made_by or 'unknown release'}, cache format {old.get('format_version')}) and this kdcache "
                f"({__version__}) writes format {FORMAT_VERSION} only, so it cannot add shards to it. Finish it "
                f"with the kdcache release that started it{f' ({made_by})' if made_by else ''}, or precompute "
                "into a new --out path. The cache stays readable for train, inspect and verify."
            )
        self.manifest = adopted_encoding(old, self.manifest)
        diffs = manifest_differences(old, self.manifest, tuple(f for f in MATCHED_FIELDS if f != "views"))
        if diffs and int(self.manifest["views"]) < int(old["views"]):  # named with the others: it never resumes either
            diffs.insert(0, f"views: cache has {int(old['views'])}, this run has {int(self.manifest['views'])} "
                            "(a cache never shrinks; a larger --views grows it)")
        if diffs:
            with warnings.catch_warnings():  # `.claims/` is kdcache's own, not a zarr node
                warnings.filterwarnings("ignore", message=r"Object at \..* is not recognized as a component")
                try:
                    started = any(True for _ in root.group_keys())
                except Exception:  # noqa: BLE001 - a damaged group is still a started cache
                    started = True
            advice = ("Use a new --out path, or re-run with the cache's settings to resume it." if started else
                      f"It holds no shard group yet (an earlier run stopped before its first): delete {path} and "
                      "re-run, or use a new --out path.")
            raise KdcacheError(
                f"the cache at {path} was made with other settings; refusing to mix them:\n  "
                + "\n  ".join(diffs) + "\n" + advice
            )
        root = open_root(path, "r+", self.storage_options)
        probe_record(root, old, path)  # an edited manifest: never add groups written with the edit
        return self._grow_if_asked(root, old)

    def _grow_if_asked(self, root, old: dict):
        """The opened root, its manifest made a growing one when this run asks for more views than
        the cache holds (refused for fewer, and for a cache with groups written before groups
        recorded their own V). One atomic write of the root's metadata."""
        have, want = int(old["views"]), int(self.manifest["views"])
        if want < have:
            raise shrink_error(self.path, have, want)
        stored = old
        if want > have:
            with warnings.catch_warnings():  # `.claims/` is kdcache's own, not a zarr node
                warnings.filterwarnings("ignore", message=r"Object at \..* is not recognized as a component")
                try:
                    attrs = {n: dict(g.attrs) for n, g in root.groups()}
                except Exception as e:  # a group whose zarr.json does not parse: nothing is changed
                    raise damaged_error(f"the groups of cache {self.path}, read to grow its views", e) from None
            older = older_groups(attrs)
            if older:
                raise older_groups_error(self.path, older)
            stored = grown_manifest(old, self.manifest)
            set_attrs(root, {"kdcache": stored})
        self.growing = growing_from(stored)
        return root

    def stored_views(self, name: str) -> int:
        """V of group ``name`` if it is complete (fewer than this run's V when it is to grow), else 0."""
        try:
            attrs = dict(self.root[name].attrs)
        except (KeyError, ValueError):
            return 0
        return group_views(attrs, self.manifest) if attrs.get("complete", False) else 0

    def finish_growth(self) -> bool:
        """End a growth once every listed group holds this run's V: the manifest's ``growing`` is
        removed in one atomic write of the root's metadata. True when this call ended it."""
        if self.growing is None or not all(self.is_complete(str(n)) for n in self.manifest["shards"]):
            return False
        root = open_root(self.path, "r+", self.storage_options)
        stored = dict(root.attrs["kdcache"])
        if int(stored["views"]) != int(self.manifest["views"]) or growing_from(stored) is None:
            return False  # another run grows it further, or has ended it
        set_attrs(root, {"kdcache": finished_manifest(stored)})
        self.growing = None
        return True

    def _create_local(self) -> None:
        """Create the root group of a local cache atomically, unless it exists.

        Creation counts as not done yet when the directory holds nothing but what a creator that
        died leaves: zarr's temporary ``zarr.<hex>.partial`` files, kdcache's own temporary files,
        or a root zarr.json that is empty or not JSON (with no shard group beside it). Anything
        else is left for open_manifest to accept or refuse; nothing of the user's is removed.
        The new zarr.json is written to a temporary file, synced, and hard-linked into place:
        the link fails if another process created it first, and nobody ever sees it half written.
        """
        d = self._dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise KdcacheError(f"output path {self.path} is a file, not a kdcache store; choose another --out")
        for _ in range(100):
            try:
                entries = os.listdir(d)
            except FileNotFoundError:
                os.makedirs(d, exist_ok=True)
                continue
            leftovers = [e for e in entries if _ZARR_PARTIAL.fullmatch(e) or _OWN_TMP.fullmatch(e)]
            rest = [e for e in entries if e not in leftovers]
            root_json = os.path.join(d, "zarr.json")
            if rest == ["zarr.json"] and _root_json_state(root_json) == "damaged":
                # Written in place by a writer that died: set it aside under a unique name (one
                # process's rename wins), and drop it unless it turned valid meanwhile.
                aside = os.path.join(d, f".kdcache-root.{uuid.uuid4().hex}.damaged")
                try:
                    os.rename(root_json, aside)
                except FileNotFoundError:
                    continue
                if _root_json_state(aside) == "ok":  # another process created it just now
                    try:
                        os.link(aside, root_json)
                    except FileExistsError:
                        pass
                os.unlink(aside)
                continue
            if rest:
                return  # an existing store, or something else: open_manifest decides
            tmp = os.path.join(d, f".kdcache-root.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(_group_json({"kdcache": self.manifest}))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, root_json)
                created = True
            except FileExistsError:
                created = False  # another process created it first: open and compare
            except FileNotFoundError:
                continue  # a creator that won cleaned up our temporary file as a leftover: look again
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            if created:
                _fsync_dir(d)
                for e in leftovers:  # what earlier, killed creators left
                    try:
                        os.unlink(os.path.join(d, e))
                    except (FileNotFoundError, IsADirectoryError, PermissionError):
                        pass
            return
        raise KdcacheError(f"could not create the cache at {self.path}: its directory keeps changing; re-run")

    def _repair_remote_root(self) -> None:
        """A remote path that exists: when all it holds is an empty or unparseable zarr.json (a
        writer died writing it), write it again; anything else is left for open_manifest."""
        if self._fs is None:
            return
        fs, base = self._fs
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
            if names != ["zarr.json"]:
                return
            raw = fs.cat_file(f"{base.rstrip('/')}/zarr.json")
        except Exception:
            return
        try:
            json.loads(raw)
            if raw.strip():
                return
        except ValueError:
            pass
        fs.pipe_file(f"{base.rstrip('/')}/zarr.json", _group_json({"kdcache": self.manifest}))

    def _remote_exists(self) -> bool:
        try:
            open_manifest(self.path, self.storage_options)
            return True
        except KdcacheError:
            return False

    # -- groups: state, claims --

    def _group_state(self, name: str) -> tuple[bool, tuple[str, str] | None]:
        """(marked complete, (array, what is missing) or None). Not marked: (False, None)."""
        if self._indexed_complete(name):
            return True, None
        try:
            attrs = dict(self.root[name].attrs)
        except KeyError:
            return False, None
        except ValueError:  # its zarr.json is empty or cut (written in place by a writer that died):
            return False, None  # it cannot say complete, so it is redone
        except OSError as e:
            raise damaged_error(f"the metadata of cache group {name!r} in {self.path}", e) from None
        if not attrs.get("complete", False) or group_views(attrs, self.manifest) < int(self.manifest["views"]):
            return False, None  # (a complete group with fewer views is to be grown: rewritten whole)
        try:
            files = list_files(self.root, self.path, name, self._fs)
        except Exception as e:
            return True, ("?", f"its files cannot be listed: {type(e).__name__}: {e}")
        return True, missing_data_quick(files, int(attrs.get("num_samples", -1)), int(self.manifest["topk"]), attrs,
                                        layout_arrays(self.manifest, coding_of(attrs)))

    def _indexed_complete(self, name: str) -> bool:
        """Whether the index (remote caches) records ``name`` complete with every recorded file still
        there at its size: on the first call, one listing of ``.index/``, one read per segment and
        one recursive listing of the cache, then no request per group (what a resumed precompute
        asks of every group). A group without such an entry is asked the way it always was."""
        if self.local or self._fs is None:
            return False
        if self._indexed_done is None:
            from .integrity import list_all_groups

            found = read_index(*self._fs)
            listing = list_all_groups(*self._fs) if found else {}
            V = int(self.manifest["views"])
            self._indexed_done = {n for n, e in found.items() if entry_matches(e, listing.get(n, {}))
                                  and group_views(e["attrs"], self.manifest) >= V}
            self._listed = set(listing) if found else None
        return name in self._indexed_done

    def _record_complete(self, name: str, attrs: dict, arrays: dict, files: dict) -> None:
        """Put this writer's index segment again with group ``name`` in it (called only after the
        group's ``complete: true`` is stored). One put; a new segment every SEGMENT_GROUPS groups.
        A failed put loses nothing: readers read that group without the index."""
        if self.local or self._fs is None:
            return
        if len(self._index_groups) >= SEGMENT_GROUPS:
            self._index_seq, self._index_groups = self._index_seq + 1, {}
        self._index_groups[name] = group_entry(attrs, arrays, files)
        fs, base = self._fs
        seg = f"{base.rstrip('/')}/{INDEX_DIR}/{self._index_token}-{self._index_seq}.json"
        try:
            fs.pipe_file(seg, segment_bytes(self._index_groups))
        except Exception as e:  # noqa: BLE001 - any store's error (not all are OSError): the group stays complete
            warnings.warn(f"kdcache: could not write the index segment {seg} ({e}); readers read group {name!r} "
                          "without it")

    def is_complete(self, name: str) -> bool:
        """Marked complete *and* every array's data files are there: one read of the group's
        attributes and one listing of its files (the arrays' metadata is not read; CacheReader
        checks every chunk key exactly when it first reads the group). On a remote cache with an
        index, a group absent from the listing taken with it is not complete without a request of
        its own (claim and write_shard still look at the group itself before writing it)."""
        if not self._indexed_complete(name) and self._listed is not None and name not in self._listed:
            return False
        done, lost = self._group_state(name)
        return done and lost is None

    def _damaged_complete(self, name: str, lost: tuple[str, str]) -> KdcacheError:
        a, why = lost
        return KdcacheError(
            f"cache group {name!r} in {self.path} is marked complete but has no data for array {a!r} ({why}): "
            "the cache is damaged. kdcache never overwrites a complete group: delete the group's directory "
            f"({name}/) and re-run to redo it, or restore it"
        )

    def claim(self, name: str) -> ShardClaim | None:
        """Claim shard group ``name`` for writing, atomically across processes and machines
        sharing the filesystem. Returns None when the group is complete or a live writer holds
        it. A claim whose holder is dead (same host: its pid is gone; other host: not refreshed
        for CLAIM_LEASE_S) is taken over. Raises KdcacheError for a group marked complete whose
        data is missing (damaged: it is never overwritten).

        On a remote (fsspec) cache there is no atomic create: the claim returned is not
        exclusive (``exclusive`` False) and one writer per group is up to the caller.
        """
        done, lost = self._group_state(name)
        if done:
            if lost is not None:
                raise self._damaged_complete(name, lost)
            return None
        if not self.local:
            return ShardClaim(name=name, token=uuid.uuid4().hex, path=None, host=socket.gethostname(),
                              pid=os.getpid(), started=time.time())
        claim, _ = take_claim(os.path.join(self._dir, CLAIMS_DIR), name)
        if claim is None:
            return None
        done, lost = self._group_state(name)  # finished by another writer between our look and our claim
        if done:
            claim.release()
            if lost is not None:
                raise self._damaged_complete(name, lost)
            return None
        self._claims[name] = claim
        return claim

    def holder(self, name: str) -> dict | None:
        """Who holds the claim on a group (the claim file's JSON), or None."""
        if not self.local:
            return None
        got = read_claim(os.path.join(self._dir, CLAIMS_DIR, name))
        return got[0] if got else None

    def clear_stale_claims(self) -> list[str]:
        """Remove claims that outlived their holder on groups that are complete (a writer killed
        between completing a group and releasing its claim). Returns those groups."""
        if not self.local:
            return []
        from ..claims import clear_stale

        return clear_stale(os.path.join(self._dir, CLAIMS_DIR), lambda name: self._group_state(name)[0])

    def refresh_claims(self) -> None:
        """Refresh every claim this writer holds (call at least every CLAIM_REFRESH_S seconds)."""
        for name, c in list(self._claims.items()):
            if c.released:
                del self._claims[name]
            else:
                c.refresh()

    def release_claims(self) -> None:
        """Release every claim this writer still holds (at exit, after an error)."""
        for c in self._claims.values():
            c.release()
        self._claims.clear()

    # -- writing --

    def write_shard(
        self,
        name: str,
        *,
        source: str,
        keys,
        size: np.ndarray,
        classes: np.ndarray,
        box: np.ndarray,
        flip: np.ndarray,
        mix_with: np.ndarray,
        mix_lam: np.ndarray,
        logprobs: np.ndarray | None = None,
        counts: np.ndarray | None = None,
        bad: dict[str, str] | None = None,
        render: dict | None = None,
        claim: ShardClaim | None = None,
    ) -> None:
        """Write one whole shard group, check that every array's data is on disk, then mark it
        complete and release the claim. Replaces an incomplete group; raises KdcacheError for a
        complete one (never overwritten).

        Targets: top-k ``logprobs`` (float32 or float16, descending) and ``classes``, or for a sampled
        cache ``classes`` and ``counts`` (-1 / 0 in unused slots). The geometry is always given; a
        compact cache does not store it, and refuses geometry the seeded sampler would not draw.

        ``claim`` is the group's claim from ``claim(name)``; it is checked before the group is
        touched and again before it is marked complete, and released at the end (also when the
        write fails). Without one, the group is claimed here for the duration of the write, and
        ShardClaimedError says that another live writer holds it.
        """
        keys = list(keys)
        n = len(keys)
        V, k = int(self.manifest["views"]), int(self.manifest["topk"])
        given = {"logprobs": logprobs, "counts": counts}
        need = "logprobs" if self.kind == "topk" else "counts"
        if given[need] is None:
            raise ValueError(f"write_shard({name!r}): a {self.kind} cache needs {need}")
        shapes = {
            "size": (size, (n, 2)), need: (given[need], (n, V, k)), "classes": (classes, (n, V, k)),
            "box": (box, (n, V, 4)), "flip": (flip, (n, V)), "mix_with": (mix_with, (n, V)),
            "mix_lam": (mix_lam, (n, V)),
        }
        for a, (arr, shape) in shapes.items():
            if tuple(np.shape(arr)) != shape:
                raise ValueError(f"write_shard({name!r}): {a} has shape {np.shape(arr)}, expected {shape}")
        key_rows = encode_keys(keys)  # refuses a key that cannot round-trip, before touching the store
        stored, decoded, layout_attrs = encode_group(self.manifest, self.path, name, keys, np.asarray(size),
                                                     np.asarray(classes), given[need], box, flip, mix_with, mix_lam,
                                                     bad or {})
        digests = [digest_of(self.kind, self.layout, decoded, v, self.record) for v in range(V)]
        names = layout_arrays(self.manifest, coding_of(layout_attrs))
        claim = self._claim_for_write(name, claim)
        try:
            claim.check()
            done, _ = self._group_state(name)
            if done:
                raise KdcacheError(
                    f"shard group {name!r} in cache {self.path} is already complete; kdcache never overwrites "
                    "a complete group"
                )
            if self.growing is not None:  # only a growth rewrites a complete group
                self._check_kept_views(name, digests)
            try:
                self._write_arrays(name, {**self._first_attrs(source, n), **layout_attrs}, names,
                                   {"keys": key_rows, **stored})
            except OSError as e:  # a full disk, a quota: the CLI names the place it happened
                if e.filename is None:
                    e.filename = f"{self.path.rstrip('/')}/{name}"
                raise
            g = self.root[name]
            # Only with every array's data on disk, and the claim still ours, does the group count as done.
            arrays = arrays_of(g)
            files = list_files(self.root, self.path, name, self._fs)
            extra = sorted(set(arrays) - set(names))
            lost = missing_data(arrays, files, n, k, {EVERY_CHUNK_ATTR: True}, names)
            if lost is not None or extra:
                what = (f"array {lost[0]!r} is missing after it was written ({lost[1]})" if lost
                        else f"it holds other arrays {extra}")
                raise KdcacheError(
                    f"cache group {name!r} in {self.path}: {what}; the group is left incomplete. Is another process "
                    "writing into this cache without claims? Re-run to redo the group"
                )
            claim.check()
            done_attrs = {"bad": dict(bad or {}), "render": render or self.manifest.get("render"),
                          DIGEST_ATTR: digests, "complete": True}
            set_attrs(g, done_attrs)
            self._record_complete(name, {**self._first_attrs(source, n), **layout_attrs, **done_attrs}, arrays, files)
        finally:
            claim.release()
            self._claims.pop(name, None)

    def _check_kept_views(self, name: str, digests: list[str]) -> None:
        """A complete group about to be grown (fewer views than this run's) must get its stored views
        back unchanged: their recorded digests must equal the new data's, else nothing is written."""
        try:
            attrs = dict(self.root[name].attrs)
        except (KeyError, ValueError):
            return
        kept = list(attrs.get(DIGEST_ATTR) or []) if attrs.get("complete", False) else []
        changed = [v for v, d in enumerate(kept) if d != digests[v]]
        if changed:
            raise KdcacheError(
                f"growing cache group {name!r} in {self.path} would change its stored views {changed[:5]}: the "
                "shard's images or keys, or the teacher's outputs, are not those the group was written with. Nothing "
                "was written; the group keeps its views. Check the data and the teacher, or precompute into a new --out")

    def _claim_for_write(self, name: str, claim: ShardClaim | None) -> ShardClaim:
        """The claim ``write_shard`` writes group ``name`` under: the one given (checked to be this
        group's, of this cache), or one taken here; ShardClaimedError when another writer has it."""
        if claim is None:
            claim = self.claim(name)
            if claim is None:
                done, _ = self._group_state(name)
                if done:  # a ShardClaimedError too: another writer finished it, nothing to do
                    raise ShardClaimedError(
                        f"shard group {name!r} in cache {self.path} is already complete; kdcache never "
                        "overwrites a complete group"
                    )
                raise ShardClaimedError(
                    f"shard group {name!r} in cache {self.path} is claimed by another writer "
                    f"({describe_holder(self.holder(name))}); it is left to that writer"
                )
        elif claim.name != name:
            raise KdcacheError(f"write_shard({name!r}): the claim is for group {claim.name!r}, not {name!r}")
        elif claim.exclusive != self.local or (
            claim.exclusive
            and os.path.abspath(claim.path) != os.path.abspath(os.path.join(self._dir, CLAIMS_DIR, name))
        ):
            raise KdcacheError(f"write_shard({name!r}): the claim is not one of this cache ({self.path})")
        return claim

    def _uncomplete(self, name: str) -> None:
        """Mark a complete group (one being grown to more views) incomplete before anything of it is
        removed: replacing a group deletes its files one by one, and a kill in the middle must leave
        a group that says incomplete (redone by the next run), never a complete one missing arrays."""
        try:
            g = self.root[name]
            if g.attrs.get("complete", False):
                set_attrs(g, {"complete": False})
        except (KeyError, ValueError):  # no group, or a zarr.json that does not parse: not complete
            pass

    def _first_attrs(self, source: str, n: int) -> dict:
        """A group's attributes as it is created (``complete`` false)."""
        return {"source": source, "num_samples": n, "complete": False, EVERY_CHUNK_ATTR: True,
                RECORD_ATTR: self.record, VIEWS_ATTR: int(self.manifest["views"])}

    def _write_arrays(self, name, first_attrs: dict, names: tuple[str, ...], data: dict) -> None:
        """Create group ``name`` (``complete`` false) with ``first_attrs`` and write its arrays ``names``."""
        if self.growing is not None:  # only a growth replaces a complete group
            self._uncomplete(name)
        g = self.root.create_group(name, overwrite=True)
        set_attrs(g, first_attrs)
        n = int(first_attrs["num_samples"])
        rows = max(n, 1)
        size = data["size"]
        max_side = int(size.max()) if n else 0
        num_classes = int(self.manifest["teacher"]["num_classes"])

        def put(aname, arr, dtype, codec, attributes=None):
            shape = arr.shape
            per_view = len(shape) >= 2 and aname not in ("keys", "size", "class_list")
            chunks = (rows, 1) + shape[2:] if per_view else (rows,) + shape[1:]
            shards = (rows,) + shape[1:] if per_view else None
            if aname == "box":
                fill = box_fill(dtype)
            elif aname == "class_code":  # above every code and the missing code (encoding.code_dtype)
                fill = int(np.iinfo(dtype).max)
            else:
                fill = FILL_VALUES[aname]
            out = g.create_array(aname, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                                 compressors=(codec, CRC_CODEC), attributes=attributes, fill_value=fill,
                                 config={"write_empty_chunks": True})
            if n:
                out[...] = arr.astype(dtype, copy=False)

        specs = {
            "keys": (np.uint8, INT_CODEC), "size": (np.int32, INT_CODEC), "logprobs": (np.float16, FLOAT_CODEC),
            "classes": (class_dtype(num_classes), INT_CODEC), "counts": (np.uint8, INT_CODEC),
            "box": (box_dtype(max_side), INT_CODEC), "flip": (np.bool_, INT_CODEC), "mix_with": (np.int32, INT_CODEC),
            "mix_lam": (np.float16, FLOAT_CODEC), "class_list": (class_dtype(num_classes), CLASS_LIST_CODEC),
            "class_code": (None, CODES_CODEC), "logprob_steps": (np.uint8, CODES_CODEC), "topk_logmass": (np.float16, LOGMASS_CODEC),
        }
        for aname in names:
            dtype, codec = specs[aname]
            arr = np.asarray(data[aname])
            if aname == "class_code":
                dtype = enc.code_dtype(data["class_list"].shape[1])
            put(aname, arr, dtype, codec, attributes=dict(KEYS_ATTRS) if aname == "keys" else None)
