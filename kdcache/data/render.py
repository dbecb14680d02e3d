"""Render backends: what turns encoded images and views into the uint8 crops every stage uses.

A renderer turns encoded image bytes into decoded images (``load``/``decode``) and (image, View)
pairs into uint8 crops (``crops``). ``PilRenderer`` is the original backend: PIL decodes and
resizes, in the DataLoader workers. ``TorchRenderer`` decodes with torchvision (nvJPEG on CUDA)
and resizes with torch ops, in the workers on the CPU or in the main process on the GPU (then the
workers only read tar bytes and ship ``Encoded`` images). A cache records its backend
(``describe`` → the manifest's ``render``) and is replayed with it (``renderer_for``).

The backend is part of a cache's identity: ``render_backend`` describes this machine's (the
manifest's ``render``), ``renderer_for`` builds the one a cache was made with, and
``render_mismatch`` / ``backend_conflict`` say what differs and how to fix it.
``render.crop_batch`` is the interface every stage calls; it takes one of these renderers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import KdcacheError
from .views import View

# The resample filter used by render(); recorded in the manifest.
RESAMPLE = Image.Resampling.BILINEAR
RESAMPLE_NAME = "bilinear"

RENDER_BACKENDS = ("pil", "torch")


def render_backend(backend: str = "pil", device=None) -> dict:
    """What renders views, as the manifest records it (``render``).

    ``pil``: the PIL flavour (Pillow or Pillow-SIMD), its version and the resample filter; Pillow and
    Pillow-SIMD resample slightly differently. ``torch``: torchvision's decoders (nvJPEG on CUDA) and
    kdcache's integer bilinear resampler, on ``device``'s type (see ``TorchRenderer``).
    """
    if backend == "torch":
        return TorchRenderer(device or "cpu").describe()
    if backend != "pil":
        raise KdcacheError(f"unknown render backend {backend!r}; kdcache renders with {', '.join(RENDER_BACKENDS)}")
    import importlib.metadata as md

    import PIL

    flavour = "Pillow"
    try:
        if md.version("Pillow-SIMD") == PIL.__version__:
            flavour = "Pillow-SIMD"
    except md.PackageNotFoundError:
        pass
    return {"backend": "pil", "pil": flavour, "pil_version": PIL.__version__, "resample": RESAMPLE_NAME}


def backend_of(recorded: dict | None) -> str:
    """The backend a manifest's (or group's) ``render`` entry names; entries written before the torch
    backend existed have no ``backend`` field and are PIL's."""
    return str((recorded or {}).get("backend", "pil"))


def render_mismatch(recorded: dict | None, renderer=None) -> str | None:
    """What differs, and how to fix it, when this machine does not render as a cache recorded (None
    when it does). ``renderer`` is the one that replays the cache here (default: ``renderer_for``).

    PIL: Pillow and Pillow-SIMD resample differently by up to a pixel level, which moves a teacher's
    log-probs by about 0.01. torch: the resampler is exact integer arithmetic everywhere, but the
    JPEG decoder is not: nvJPEG (CUDA) and libjpeg-turbo (CPU) differ by a few levels, and other
    torchvision releases or GPUs may decode differently. A different *backend* is not a mismatch
    this reports: replay always uses the cache's backend (``renderer_for``)."""
    there = recorded or {}
    if backend_of(there) == "torch":
        here = (renderer or renderer_for(there)).describe()
        diffs = [f for f in ("device", "torchvision") if here.get(f) != there.get(f)]
        if there.get("device") == "cuda" and here.get("device") == "cuda" and here.get("gpu") != there.get("gpu"):
            diffs.append("gpu")
        if not diffs:
            return None
        what = ", ".join(f"{f} {there.get(f)} (here {here.get(f)})" for f in diffs)
        if "device" in diffs:
            fix = (f"replay it on a {there.get('device')} machine (the torch backend renders on the device type that "
                   "made the cache whenever this machine has one)")
        else:
            fix = f"use torchvision {there.get('torchvision')} on a {there.get('gpu') or there.get('device')} to decode exactly"
        return (f"the cache was rendered by the torch backend with {what}: JPEG decoders differ by a few levels, "
                f"which moves log-probs by about 0.01-0.1. {fix}")
    here = render_backend()
    if all(here.get(f) == there.get(f) for f in ("pil", "pil_version", "resample")):
        return None
    if there.get("pil") == "Pillow-SIMD" and here.get("pil") != "Pillow-SIMD":
        fix = (f"a later pip install probably replaced Pillow-SIMD with Pillow; restore it with `pip install "
               f"--no-deps --force-reinstall pillow-simd=={there.get('pil_version')}` (or `bash "
               "tools/install_pillow_simd.sh PYTHON` from a kdcache checkout)")
    else:
        fix = f"install {there.get('pil')} {there.get('pil_version')} to render this cache's pixels exactly"
    return (f"the cache was rendered with {there.get('pil')} {there.get('pil_version')} ({there.get('resample')}) "
            f"and this machine renders with {here.get('pil')} {here.get('pil_version')} ({here.get('resample')}): "
            f"pixels differ by up to a level, which moves log-probs by about 0.01. {fix}")


def render_text(recorded: dict | None) -> str:
    """One line for a ``render`` entry: ``Pillow-SIMD 12.1.1.post0 (bilinear)`` or ``torch on cuda (nvjpeg,
    torchvision 0.26.0, NVIDIA H100 80GB HBM3)``."""
    r = recorded or {}
    if backend_of(r) == "torch":
        extra = ", ".join(str(x) for x in (r.get("decoder"), f"torchvision {r.get('torchvision')}", r.get("gpu")) if x)
        return f"torch on {r.get('device')} ({extra})"
    return f"{r.get('pil')} {r.get('pil_version')} ({r.get('resample')})"


def backend_conflict(manifest_render: dict | None, group_render: dict | None, group: str, cache: str) -> str | None:
    """A group rendered by another backend than its cache's manifest names: such a cache cannot be
    replayed exactly with one backend (precompute refuses to resume with another ``--render``)."""
    a, b = backend_of(manifest_render), backend_of(group_render) if group_render else backend_of(manifest_render)
    if a not in RENDER_BACKENDS:
        renderer_for(manifest_render)  # says which backend this kdcache does not know
    if a == b:
        return None
    return (f"cache {cache}: shard group {group!r} was rendered with the {b} backend but the cache's manifest says "
            f"{a}; a cache is replayed with the one backend that made it, so this cache mixes two. Precompute the "
            f"group again with --render {a} (delete its directory and re-run), or make a new cache")


@dataclass
class Encoded:
    """An image not decoded yet: its bytes, and its size read from the header. What a worker holds
    when the renderer decodes on the device (``TorchRenderer`` on CUDA)."""

    data: bytes
    ext: str
    height: int
    width: int
    key: str = ""
    url: str = ""


def image_hw(image) -> tuple[int, int]:
    """(height, width) of a decoded image of any backend (PIL image, CHW tensor) or an ``Encoded`` one."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, Encoded):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


class DecodeError(Exception):
    """An image a renderer cannot decode; ``str`` is the cause (callers name shard and key)."""


class PilRenderer:
    """The PIL backend: decode with PIL (RGB, EXIF orientation not applied), resize each crop with
    one ``Image.resize(..., BILINEAR, box=...)``, flip; in the DataLoader workers."""

    backend = "pil"
    deferred = False
    device = None

    def describe(self) -> dict:
        return render_backend()

    def decode(self, data: bytes, ext: str):
        import io

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except Exception as e:  # PIL raises many types for corrupt data
            raise DecodeError(f"{type(e).__name__}: {e}") from None

    load = decode  # the worker's side: PIL decodes there

    def blank(self, height: int, width: int):
        return Image.new("RGB", (max(width, 1), max(height, 1)))

    def crops(self, items, size: int):
        """uint8 (n, 3, size, size) crops of ``(image, View)`` pairs."""
        import torch

        out = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
        for n, (image, view) in enumerate(items):
            out[n] = crop_tensor(image, view, size)
        return out

    def __repr__(self) -> str:
        return "PilRenderer()"


PIL_RENDERER = PilRenderer()

# PIL's fixed-point resampling (libImaging/Resample.c): coefficients in 22 fractional bits, 8-bit
# pixels, int32 accumulators rounded and clipped after each pass.
PRECISION_BITS = 22
# Elements (3 x rows x R x taps) one chunk of the horizontal pass may hold; bounds the temporaries
# (small on the CPU, where they should stay in cache; large on the GPU, where each chunk costs launches).
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}


def pil_coeffs(in_size, lo, hi, out_size: int, flip=None):
    """PIL's bilinear resampling coefficients for many 1-D resizes at once, exactly as Pillow's
    ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` compute them (float64, then rounded to int).

    ``in_size``, ``lo``, ``hi`` are (n,) arrays: the source length and the box [lo, hi) per record;
    every record maps to ``out_size`` outputs. Returns ``first`` (n, out) int64: the first source
    index of each output's taps; ``count`` (n, out): how many taps are real; ``weights``
    (n, out, K) int32 (zero beyond ``count``). ``flip`` (n,) bool reverses the outputs of those
    records (a horizontal flip of the result, for free)."""
    in_size = np.asarray(in_size, dtype=np.int64)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    scale = ((hi - lo) / out_size)[:, None]  # (n, 1)
    filterscale = np.maximum(scale, 1.0)
    support = filterscale * 1.0  # the bilinear filter's support is 1
    ksize = int(np.ceil(support).max()) * 2 + 1 if len(in_size) else 3
    center = lo[:, None] + (np.arange(out_size)[None, :] + 0.5) * scale
    ss = 1.0 / filterscale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size[:, None])
    count = last - first
    taps = np.arange(ksize)
    x = ((taps[None, None, :] + first[:, :, None]) - center[:, :, None] + 0.5) * ss[:, :, None]
    x = np.abs(x)
    w = np.where(x < 1.0, 1.0 - x, 0.0)
    w = np.where(taps[None, None, :] < count[:, :, None], w, 0.0)
    ww = np.zeros(first.shape)
    for t in range(ksize):  # in tap order, as the C loop adds them
        ww = ww + w[:, :, t]
    w = np.where(ww[:, :, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, :, None], w)
    weights = np.trunc(0.5 + w * float(1 << PRECISION_BITS)).astype(np.int32)  # all w >= 0
    if flip is not None:
        f = np.asarray(flip, dtype=bool)
        first[f], count[f], weights[f] = first[f, ::-1], count[f, ::-1], weights[f, ::-1]
    return first, count, weights


def _round_clip(acc):
    """PIL's ``clip8``: (acc + 2^21) >> 22, clipped to 0..255 (in place)."""
    acc.add_(1 << (PRECISION_BITS - 1))
    acc.bitwise_right_shift_(PRECISION_BITS)
    return acc.clamp_(0, 255)


class TorchRenderer:
    """The torch backend: decode with torchvision (nvJPEG for JPEGs on CUDA, libjpeg-turbo/libpng/
    libwebp on the CPU), then crop + resize + flip with torch ops on ``device``.

    The resize is Pillow's bilinear algorithm (triangle filter widened by the downscale factor, i.e.
    antialiased; source pixels beyond the box inside the filter's support are used, as
    ``Image.resize(box=...)`` does) in Pillow's own fixed-point integer arithmetic, so it is exact:
    the same on every device, thread count and batch composition, and equal to plain Pillow's
    ``resize`` bit for bit (Pillow-SIMD rounds differently). On the CPU a decoded image equals PIL's
    (both libjpeg-turbo); nvJPEG decodes JPEGs differently by a few levels. A cache made on CUDA is
    therefore replayed on CUDA (``renderer_for``).

    ``deferred`` (default: on CUDA) decodes in the main process: ``load`` (the workers' side) only
    reads the image header and returns an ``Encoded``; ``decode_many`` decodes on the device.
    """

    backend = "torch"

    def __init__(self, device="cpu", deferred: bool | None = None):
        import torch

        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise KdcacheError(f"the torch render backend runs on cpu or cuda, not {self.device.type}")
        if self.device.type == "cuda" and self.device.index is None:  # `cuda`: this process's current GPU,
            self.device = torch.device("cuda", torch.cuda.current_device())  # named, as its images' devices are
        self.deferred = self.device.type == "cuda" if deferred is None else bool(deferred)

    def __repr__(self) -> str:
        return f"TorchRenderer({str(self.device)!r}, deferred={self.deferred})"

    def describe(self) -> dict:
        import torch
        import torchvision

        d = {"backend": "torch", "device": self.device.type, "torch": str(torch.__version__),
             "torchvision": str(torchvision.__version__), "resample": f"{RESAMPLE_NAME} (Pillow's integer arithmetic)",
             "decoder": "nvjpeg" if self.device.type == "cuda" else "torchvision cpu"}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
            d["cuda"] = str(torch.version.cuda)
        return d

    # -- decoding --

    @staticmethod
    def _cpu_decode(data: bytes):
        import warnings

        import torch
        from torchvision.io import ImageReadMode, decode_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders (in favour of TorchCodec)
            try:
                im = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except Exception as e:
                raise DecodeError(f"{type(e).__name__}: {e}".strip()) from None
        if im.dtype == torch.uint16:  # a 16-bit PNG: keep the high byte, as PIL's RGB does
            im = (im.to(torch.int32) >> 8).to(torch.uint8)
        return im

    def decode(self, data: bytes, ext: str):
        """One image as a uint8 (3, H, W) tensor on the device."""
        return self.decode_many([Encoded(data, ext, -1, -1)])[0]

    def load(self, data: bytes, ext: str):
        """The workers' side: a decoded CPU tensor, or (``deferred``) an ``Encoded`` with the header's size."""
        if not self.deferred:
            return self._cpu_decode(data)
        import io

        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                width, height = im.size
        except Exception as e:
            raise DecodeError(f"{type(e).__name__}: {e}") from None
        return Encoded(data, ext, height, width)

    def decode_many(self, encoded: list, errors: list | None = None) -> list:
        """Decode ``Encoded`` images on the device, JPEGs on CUDA in one nvJPEG batch (each image
        takes the same decoder path alone or in a batch: nvJPEG picks it per image). Others (and a
        JPEG nvJPEG refuses, e.g. CMYK) are decoded on the CPU and moved. An image that does not
        decode raises ``DecodeError``, or, with ``errors`` given, gets None there and its cause
        appended to ``errors`` as (index, cause). A decoded size that differs from the header's is
        an error too."""
        import torch

        out: list = [None] * len(encoded)
        jpegs = [n for n, e in enumerate(encoded) if self.device.type == "cuda" and e.ext.lower() in ("jpg", "jpeg")]
        if jpegs:
            out_j = self._nvjpeg([encoded[n].data for n in jpegs])
            for n, im in zip(jpegs, out_j):
                out[n] = im
        for n, e in enumerate(encoded):
            try:
                if out[n] is None:
                    out[n] = self._cpu_decode(e.data).to(self.device)
                h, w = image_hw(out[n])
                if e.height >= 0 and (h, w) != (e.height, e.width):
                    raise DecodeError(f"decoded to {w}x{h}, but its header says {e.width}x{e.height}")
            except DecodeError as err:
                if errors is None:
                    raise
                out[n] = None
                errors.append((n, str(err)))
        return out

    def _nvjpeg(self, datas: list) -> list:
        """nvJPEG decodes (None where it refuses an image: the CPU decodes that one)."""
        import warnings

        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:  # one bad image fails the batch: find it one by one
                out = []
                for t in tensors:
                    try:
                        out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        out.append(None)
                return out

    def blank(self, height: int, width: int):
        import torch

        return torch.zeros((3, max(height, 1), max(width, 1)), dtype=torch.uint8, device=self.device)

    # -- cropping --

    def crops(self, items, size: int):
        """uint8 (n, 3, size, size) crops of ``(image, View)`` pairs, on the device: Pillow's
        two-pass fixed-point bilinear resize of each box (horizontal pass over the rows the vertical
        filter needs, rounded to 8 bits, then the vertical pass), the flip folded into the
        horizontal pass. Records are processed in chunks; every operation is integer arithmetic, so
        a record's crop does not depend on the others."""
        import torch

        n = len(items)
        out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=self.device)
        if n == 0:
            return out
        hw = np.array([image_hw(im) for im, _ in items], dtype=np.int64).reshape(n, 2)
        box = np.array([v.box for _, v in items], dtype=np.int64).reshape(n, 4)
        flip = np.array([v.flip for _, v in items], dtype=bool)
        xf, _, xw = pil_coeffs(hw[:, 1], box[:, 0], box[:, 0] + box[:, 2], size, flip)
        yf, yc, yw = pil_coeffs(hw[:, 0], box[:, 1], box[:, 1] + box[:, 3], size)
        y0 = yf[:, 0]
        y1 = yf[:, -1] + yc[:, -1]
        rows = y1 - y0
        kx = xw.shape[2]
        start = 0
        budget = CHUNK_ELEMENTS[self.device.type]
        while start < n:  # chunks bounded by the horizontal pass's temporaries
            stop, elems = start, 0
            while stop < n and (stop == start or elems + 3 * rows[stop] * size * kx <= budget):
                elems += 3 * rows[stop] * size * kx
                stop += 1
            sl = slice(start, stop)
            out[sl] = self._resample([im for im, _ in items[sl]], hw[sl], y0[sl], rows[sl], xf[sl], xw[sl],
                                     yf[sl] - y0[sl, None], yw[sl], size)
            start = stop
        return out

    def _resample(self, images, hw, y0, rows, xf, xw, yf, yw, size):
        import torch

        dev = self.device
        m, kx, ky = len(images), xw.shape[2], yw.shape[2]
        # Horizontal pass. Each record's band of rows [y0, y0 + rows) as (W, 3, rows): the taps of an
        # output column are whole contiguous slices, gathered by one index_select per record.
        xidx = np.minimum(xf[:, :, None] + np.arange(kx)[None, None, :], hw[:, 1, None, None] - 1).reshape(m, -1)
        x0 = xidx.min(axis=1)
        x1 = xidx.max(axis=1) + 1
        xidx = torch.from_numpy(xidx - x0[:, None]).to(dev)  # relative to the columns the taps read
        pieces = []
        for r, im in enumerate(images):
            if im.device != dev:
                raise KdcacheError(f"an image decoded on {im.device} cannot be cropped on {dev}")
            band = im[:, int(y0[r]): int(y0[r] + rows[r]), int(x0[r]): int(x1[r])].permute(2, 0, 1).contiguous()
            pieces.append(band.index_select(0, xidx[r]))  # (R*Kx, 3, rows)
        g = torch.cat(pieces, dim=2).view(size, kx, 3, -1)  # (R, Kx, 3, Σrows) uint8
        owner = torch.from_numpy(np.repeat(np.arange(m), rows)).to(dev)
        xw_rows = torch.from_numpy(xw).to(dev).index_select(0, owner)  # (Σrows, R, Kx) int32
        h = None
        for t in range(kx):  # tap by tap: exact int32 products and sums, in PIL's order
            term = g[:, t].to(torch.int32).mul_(xw_rows[:, :, t].t().contiguous().unsqueeze(1))
            h = term if h is None else h.add_(term)
        h = _round_clip(h)  # (R out columns, 3, Σrows)
        del g, xw_rows, term
        # Vertical pass: rows of (Σrows, 3, R) gathered for each output row's taps.
        h = h.permute(2, 1, 0).contiguous()  # (Σrows, 3, R)
        offs = np.concatenate([[0], np.cumsum(rows)[:-1]])
        yidx = np.minimum(yf[:, :, None] + np.arange(ky)[None, None, :], rows[:, None, None] - 1) + offs[:, None, None]
        yidx = torch.from_numpy(yidx.transpose(2, 0, 1).reshape(-1)).to(dev)  # tap-major: each tap contiguous
        v = h.index_select(0, yidx).view(ky, m, size, 3, size)
        yw_t = torch.from_numpy(np.ascontiguousarray(yw.transpose(2, 0, 1))).to(dev)  # (Ky, m, R)
        acc = None
        for t in range(ky):
            term = v[t].mul(yw_t[t, :, :, None, None])
            acc = term if acc is None else acc.add_(term)
        res = _round_clip(acc)  # (m, R out rows, 3, R out columns)
        return res.to(torch.uint8).permute(0, 2, 1, 3)


def make_renderer(backend: str = "pil", device=None):
    """The renderer of ``backend`` (``pil`` or ``torch``) for a process computing on ``device``."""
    if backend == "pil":
        return PIL_RENDERER
    if backend == "torch":
        import torch

        dev = torch.device(device if device is not None else "cpu")
        return TorchRenderer("cuda" if dev.type == "cuda" else "cpu") if dev.index is None else TorchRenderer(dev)
    raise KdcacheError(f"unknown render backend {backend!r}; kdcache renders with {', '.join(RENDER_BACKENDS)}")


def renderer_for(recorded: dict | None):
    """The renderer that replays a cache whose manifest recorded ``recorded`` (its ``render``):
    always the cache's backend; for the torch backend the cache's device type when this machine
    has it (CUDA: this process's current device), else the CPU (``render_mismatch`` then says what
    differs). A backend this kdcache does not know is an error."""
    backend = backend_of(recorded)
    if backend == "pil":
        return PIL_RENDERER
    if backend == "torch":
        import torch

        cuda = (recorded or {}).get("device") == "cuda" and torch.cuda.is_available()
        return TorchRenderer("cuda" if cuda else "cpu")
    raise KdcacheError(
        f"the cache was rendered with the {backend!r} backend, which this kdcache does not know (it renders with "
        f"{', '.join(RENDER_BACKENDS)}); replay it with the kdcache release that made it")


@dataclass
class DeferredCrops:
    """Records whose crops are made on the device: the ``Encoded`` images (own and partners) and
    views a worker ships when its renderer decodes on the GPU. ``pixels(device)`` decodes (one nvJPEG
    batch), crops and mixes there, exactly as ``crop_batch`` would with decoded images. Same
    interface as ``CropBatch`` (``len``, ``lam``, ``pixels``, ``slice``, ``cat``, ``pin_memory``)."""

    renderer: TorchRenderer
    size: int
    own_items: list  # (Encoded, View) per record
    other_items: list  # (Encoded, View) per mixed record
    other_rows: list  # the record index of each entry of other_items
    lam: torch.Tensor  # (b,) float32
    _done: CropBatch | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.own_items)

    def render(self) -> CropBatch:
        """The ``CropBatch`` on the renderer's device (decoded and cropped once, then kept)."""
        if self._done is None:
            unique: dict[int, Encoded] = {}
            for e, _ in self.own_items + self.other_items:
                unique.setdefault(id(e), e)
            order = list(unique)
            try:
                decoded = dict(zip(order, self.renderer.decode_many([unique[k] for k in order])))
            except DecodeError:
                bad = []
                self.renderer.decode_many([unique[k] for k in order], bad)
                e = unique[order[bad[0][0]]]
                raise KdcacheError(f"cannot decode image {e.key!r} in shard {e.url} on {self.renderer.device} "
                                   f"({bad[0][1]}), but the cache holds teacher outputs for it") from None
            own = [(decoded[id(e)], v) for e, v in self.own_items]
            other = [(decoded[id(e)], v) for e, v in self.other_items]
            self._done = _assemble(self.renderer, self.size, own, other, self.other_rows, self.lam)
        return self._done

    def pixels(self, device):
        return self.render().pixels(device)

    @property
    def own(self):
        return self.render().own

    @property
    def other(self):
        return self.render().other

    def slice(self, lo: int, hi: int) -> "DeferredCrops":
        keep = [(r - lo, item) for r, item in zip(self.other_rows, self.other_items) if lo <= r < hi]
        return DeferredCrops(self.renderer, self.size, self.own_items[lo:hi], [it for _, it in keep],
                             [r for r, _ in keep], self.lam[lo:hi])

    def pin_memory(self) -> "DeferredCrops":
        return self

    @staticmethod
    def cat(parts: list["DeferredCrops"]) -> "DeferredCrops":
        import torch

        own, other, rows, base = [], [], [], 0
        for p in parts:
            own += p.own_items
            other += p.other_items
            rows += [r + base for r in p.other_rows]
            base += len(p)
        return DeferredCrops(parts[0].renderer, parts[0].size, own, other, rows, torch.cat([p.lam for p in parts]))


# ---- crops: one image, a batch --------------------------------------------------------------


def crop_pixels(image: Image.Image, view: View, size: int) -> np.ndarray:
    """The crop of ``view`` resized to ``size``x``size`` (and flipped), as uint8 HWC RGB."""
    x, y, w, h = view.box
    out = image.resize((size, size), RESAMPLE, box=(x, y, x + w, y + h))
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(out, dtype=np.uint8)  # a writable copy, ready for torch.from_numpy


def crop_tensor(image: Image.Image, view: View, size: int) -> torch.Tensor:
    """``crop_pixels`` as a uint8 CHW tensor (what workers ship: 4x smaller than float)."""
    import torch

    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(crop_pixels(image, view, size)).permute(2, 0, 1)


def mix_pixels(own: torch.Tensor, other: torch.Tensor | None, lam) -> torch.Tensor:
    """uint8 crops → float32 pixels in [0, 1]: ``own/255·λ + other/255·(1 − λ)``.

    The one place where pixels are scaled and mixed, for a single image (CHW, float λ) or a batch
    (BCHW, λ of shape (B,)). Separate multiply and add kernels keep the result bit-identical
    between the two forms. ``other=None`` (or λ = 1 everywhere) leaves ``own`` unmixed.
    """
    import torch

    x = own.float().div_(255.0)
    if other is None:
        return x
    lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
    if lam.dim() == 1:
        lam = lam.view(-1, 1, 1, 1)
    y = other.float().div_(255.0)
    return x.mul_(lam).add_(y.mul_(1.0 - lam))


def render(
    image,
    view: View,
    size: int,
    partner=None,
    partner_view: View | None = None,
    renderer=None,
) -> torch.Tensor:
    """The pixels a model sees for ``view``: float32 CHW in [0, 1], not yet normalised. One image at a
    time, for code outside the stages (the public ``kdcache.render``, ``inspect --render``'s checks);
    the stages render batches through ``crop_batch``, which gives the same pixels.

    For a mixed view, pass the partner record's decoded image and *its* view of the same view
    index; the result is ``λ·own + (1 − λ)·partner`` with λ = ``view.mix_lam``. ``renderer``: the
    backend (default PIL; the images must be that backend's decoded images).
    """
    renderer = renderer or PIL_RENDERER
    own = renderer.crops([(image, view)], size)[0]
    if not view.mixed:
        return mix_pixels(own, None, None)
    if partner is None or partner_view is None:
        raise ValueError("a mixed view needs its partner's image and view to render")
    return mix_pixels(own, renderer.crops([(partner, partner_view)], size)[0], view.mix_lam)


@dataclass
class CropBatch:
    """Rendered records as uint8 crops, the form workers ship (4x smaller than float pixels).

    ``other`` holds the partners' crops (zeros where a record is unmixed) and is ``None`` when no
    record of the batch is mixed; ``lam`` is each record's own weight (1.0 where unmixed).
    """

    own: torch.Tensor  # (b, 3, R, R) uint8
    other: torch.Tensor | None  # (b, 3, R, R) uint8
    lam: torch.Tensor  # (b,) float32

    def __len__(self) -> int:
        return len(self.own)

    def pixels(self, device) -> torch.Tensor:
        """Float32 pixels in [0, 1] on ``device``: ``mix_pixels`` there (the device does the mixing)."""
        own = self.own.to(device, non_blocking=True)
        if self.other is None:
            return mix_pixels(own, None, None)
        return mix_pixels(own, self.other.to(device, non_blocking=True), self.lam.to(device, non_blocking=True))

    def slice(self, lo: int, hi: int) -> "CropBatch":
        return CropBatch(self.own[lo:hi], None if self.other is None else self.other[lo:hi], self.lam[lo:hi])

    def pin_memory(self) -> "CropBatch":
        return CropBatch(self.own.pin_memory(), None if self.other is None else self.other.pin_memory(),
                         self.lam.pin_memory())

    @staticmethod
    def cat(parts: list["CropBatch"]) -> "CropBatch":
        import torch

        others = [p.other for p in parts]
        if all(o is None for o in others):
            other = None
        else:  # unmixed parts contribute zero partner crops
            other = torch.cat([o if o is not None else torch.zeros_like(p.own) for o, p in zip(others, parts)])
        return CropBatch(torch.cat([p.own for p in parts]), other, torch.cat([p.lam for p in parts]))


def crop_batch(records, size: int, renderer=None):
    """Render records into one ``CropBatch`` at ``size``: each record is ``(images, views, i, j)``,
    the decoded images of its shard (indexed by record), the shard's ``ShardViews``, the record's
    index and the view column. The partner of a mixed record is looked up in the same shard, with
    its view of the same column. Every path that makes pixels (precompute, the trainer, verify,
    inspect's render) comes through here or ``render``, so they all make the same pixels.

    ``renderer`` is the backend (default: PIL, ``PIL_RENDERER``). Images the renderer has not decoded
    yet (``Encoded``: a renderer that decodes on the GPU, in a DataLoader worker) give a
    ``DeferredCrops``, which decodes and crops on the device when its pixels are asked for."""
    import torch

    renderer = renderer or PIL_RENDERER
    b = len(records)
    own_items, other_items, other_rows = [], [], []
    lam = torch.ones(b, dtype=torch.float32)
    for n, (images, views, i, j) in enumerate(records):
        view = views.view(i, j)
        own_items.append((images[i], view))
        if view.mixed:
            partner = images[view.mix_with]
            if partner is None:
                raise ValueError("a mixed view needs its partner's image and view to render")
            other_items.append((partner, views.view(view.mix_with, j)))
            other_rows.append(n)
            lam[n] = float(view.mix_lam)
    if any(isinstance(im, Encoded) for im, _ in own_items + other_items):
        return DeferredCrops(renderer, size, own_items, other_items, other_rows, lam)
    return _assemble(renderer, size, own_items, other_items, other_rows, lam)


def _assemble(renderer, size, own_items, other_items, other_rows, lam) -> CropBatch:
    import torch

    own = renderer.crops(own_items, size)
    other = None
    if other_items:
        other = torch.zeros_like(own)
        other[torch.as_tensor(other_rows, device=own.device)] = renderer.crops(other_items, size)
    return CropBatch(own, other, lam)

