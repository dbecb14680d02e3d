"""`kdcache info`: versions of kdcache and the libraries it runs on."""

from __future__ import annotations

import click




def versions() -> dict:
    import importlib.metadata as md

    from ..version import __version__
    from ..data.render import render_backend

    out = {"kdcache": __version__}
    for dist in ("torch", "torchvision", "timm", "zarr", "numcodecs", "webdataset", "triton", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    r = render_backend()
    out["PIL"] = f"{r['pil']} {r['pil_version']}"
    import torch

    out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    from ..runtime import available_cores, default_threads, default_workers

    w = default_workers()
    out["cores"] = f"{available_cores()} (defaults: --workers {w}, --threads {default_threads(w)})"
    return out


@click.command()
def info():
    """Print the versions of kdcache, torch, zarr, webdataset, triton and the PIL flavour in use."""
    for name, version in versions().items():
        click.echo(f"{name:12s} {version}")
