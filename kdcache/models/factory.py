"""Model specs: build a teacher or student from a string, load its weights, find its normalisation.

Specs, in the spirit of timm's ``create_model``:

- ``timm:NAME``              any timm architecture (``timm:resnet50``, ``timm:vit_small_patch16_224``)
- ``torchvision:NAME``       any torchvision classification model (``torchvision:resnet18``)
- ``py:MODULE:FACTORY``      a function of yours; it gets ``num_classes=`` when the class count is known
- ``PATH.pt`` / ``PATH.ts``  a TorchScript file (``torch.jit.save``)
- ``PATH.pt2``               a ``torch.export`` program (``torch.export.save``), TorchScript's successor

Weights come from a file (``.pt``/``.pth`` state dict, or ``.safetensors``); nothing is downloaded
unless ``pretrained=True`` is asked for explicitly with a timm or torchvision spec.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import KdcacheError

# Modules of kdcache's own models that moved: a spec recorded before the move (in a cache's manifest or
# a run's config.json, e.g. ``py:kdcache.zoo:teacher_cnn``) still names the same factory.
MOVED_MODULES = {"kdcache.zoo": "kdcache.models.zoo"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelInfo:
    """A built model and what a cache or a run needs to know about it."""

    model: nn.Module
    spec: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str | None
    weights_sha256: str | None
    init_seed: int | None = None  # a deliberately random network: the seed it was built with

    def describe(self) -> dict:
        """The manifest's ``teacher`` entry. A seeded random network also records its seed and the
        digest of its parameters, so a resume or ``verify`` can rebuild it and prove it is the same."""
        out = {
            "spec": self.spec,
            "weights": os.path.basename(self.weights) if self.weights else None,
            "weights_sha256": self.weights_sha256,
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.init_seed is not None:
            out.update(random_init_seed=int(self.init_seed), state_sha256=state_sha256(self.model))
        return out


def state_sha256(model: nn.Module) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _call_factory(fn, num_classes: int | None, spec: str):
    kwargs = {}
    if num_classes is not None:
        params = inspect.signature(fn).parameters
        if "num_classes" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs["num_classes"] = num_classes
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise KdcacheError(f"model spec {spec!r}: the factory returned {type(model).__name__}, not a torch nn.Module")
    return model


def import_torchvision():
    """Import torchvision (timm imports it too), turning a torch/torchvision mismatch into advice.

    A torchvision wheel built for another torch (for example the registry's CUDA torchvision next
    to a CPU-only torch) fails at import with ``operator torchvision::nms does not exist``.
    """
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        raise KdcacheError(
            f"torchvision does not match the installed torch ({e}). Install a matching pair, e.g. "
            "`pip install --force-reinstall torch torchvision` (what `make install` does)"
        ) from None
    return torchvision


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module. Its graph was fixed in the mode it was exported in
    (export teachers in eval mode), so ``train()``/``eval()`` only set the flag here; the exported
    module itself refuses them."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, x):
        return self.graph(x)

    def train(self, mode: bool = True):
        self.training = mode
        return self


def build_model(spec: str, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """The architecture named by ``spec`` (random weights unless ``pretrained``)."""
    if spec.startswith("timm:"):
        import_torchvision()
        import timm

        name = spec[len("timm:") :]
        if not timm.is_model(name):
            import difflib

            close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
            raise KdcacheError(f"unknown timm model {name!r} in spec {spec!r}" + (f"; similar names: {close}" if close else ""))
        kw = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(name, pretrained=pretrained, **kw)
    if spec.startswith("torchvision:"):
        torchvision = import_torchvision()

        name = spec[len("torchvision:") :]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise KdcacheError(
                f"unknown torchvision classification model {name!r} in spec {spec!r}; "
                "see torchvision.models.list_models()"
            )
        kw = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    if spec.startswith("py:"):
        try:
            _, module_name, attr = spec.split(":", 2)
        except ValueError:
            raise KdcacheError(f"model spec {spec!r}: expected py:MODULE:FACTORY") from None
        module_name = MOVED_MODULES.get(module_name, module_name)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise KdcacheError(f"model spec {spec!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from None
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise KdcacheError(f"model spec {spec!r}: module {module_name!r} has no callable {attr!r}")
        return _call_factory(fn, num_classes, spec)
    if os.path.isfile(spec) and spec.endswith(".pt2"):
        try:
            model = ExportedModel(torch.export.load(spec).module())
        except Exception as e:
            raise KdcacheError(f"model spec {spec!r}: cannot load it as a torch.export program ({e})") from None
        try:
            model(torch.zeros(1, 3, 32, 32))  # batches of any size must pass the program's guards
        except Exception as e:
            if "Guard failed" in str(e) and "size()[0]" in str(e):
                raise KdcacheError(
                    f"model spec {spec!r}: the program was exported with a fixed batch size; export it with a "
                    'dynamic batch dimension: dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}'
                ) from None
        return model
    if os.path.isfile(spec):
        try:
            return torch.jit.load(spec, map_location="cpu")
        except Exception as e:
            raise KdcacheError(f"model spec {spec!r}: the file is not a TorchScript model ({e}); "
                               "save one with torch.jit.save, or use a timm:/torchvision:/py: spec") from None
    raise KdcacheError(
        f"unknown model spec {spec!r}: use timm:NAME, torchvision:NAME, py:MODULE:FACTORY, "
        "a TorchScript file, or a torch.export .pt2 file"
    )


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (unwrapping ``state_dict``/``model`` keys)."""
    if not os.path.isfile(path):
        raise KdcacheError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            detail = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
            raise KdcacheError(f"weights file {path} is not a valid .safetensors file ({detail})") from None
    obj = torch_load(path, "weights file")
    for wrapper in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise KdcacheError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def torch_load(path: str, what: str):
    """``torch.load`` of a file the user named, tensors only (``weights_only``: unpickling anything else
    can run code, so kdcache never does). A file it cannot read gives one line naming ``what`` and
    the file."""
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            raise KdcacheError(
                f"{what} {path} is a PyTorch file that holds Python objects besides tensors, which kdcache does not "
                "load (unpickling them can run code); save the model's state_dict() with torch.save, or "
                "a .safetensors file") from None
        raise KdcacheError(f"{what} {path} is not a PyTorch state dict or checkpoint: torch.load cannot read it "
                           "(expected a file written by torch.save, or a .safetensors file)") from None


def load_weights(model: nn.Module, path: str) -> None:
    state = load_state_dict(path)
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise KdcacheError(
            f"weights file {path} does not fit the model: {detail} "
            "(if only the classifier head differs, pass the class count with --num-classes)"
        ) from None
    if missing or unexpected:
        raise KdcacheError(
            f"weights file {path} does not fit the model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


def normalization(model: nn.Module) -> tuple[tuple, tuple]:
    """timm's pretrained config mean/std where the model has one, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
        return tuple(float(x) for x in cfg["mean"]), tuple(float(x) for x in cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def logits_of(output) -> torch.Tensor:
    """Class logits from a model output (a tensor, a tuple whose first item is it, or a dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise KdcacheError(f"cannot find class logits in a model output of type {type(output).__name__}")


@torch.no_grad()
def infer_num_classes(model: nn.Module, resolution: int) -> int:
    """The width of the model's output, from one forward pass on a dummy image."""
    known = getattr(model, "num_classes", None)
    if isinstance(known, int) and known > 0:
        return known
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = logits_of(model(torch.zeros(1, 3, resolution, resolution, device=device)))
    finally:
        model.train(was_training)
    return int(out.shape[-1])


def create_model(
    spec: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    mean=None,
    std=None,
    resolution: int = 224,
    init_seed: int | None = None,
    classes_from: str | None = None,
) -> ModelInfo:
    """Build ``spec``, load ``weights``, and check that its output width matches ``num_classes``.

    ``init_seed`` builds the network under that seed (the global RNG is left as it was), so a
    random initialisation can be repeated. ``classes_from`` says where ``num_classes`` came from,
    for the error message (default: the user's --num-classes)."""
    if weights is not None and not os.path.isfile(weights):
        raise KdcacheError(f"weights file {weights} does not exist")
    if init_seed is None:
        model = build_model(spec, num_classes=num_classes, pretrained=pretrained)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(init_seed))
            model = build_model(spec, num_classes=num_classes, pretrained=pretrained)
    if weights is not None:
        load_weights(model, weights)
    found = infer_num_classes(model, resolution)
    if num_classes is not None and found != num_classes:
        if classes_from is None:  # the user's --num-classes
            advice = (f"if the model is right, pass --num-classes {found}; else the model (or its weights) is not "
                      "the one you meant")
            why = "--num-classes"
        else:
            advice = ("use a model whose head has that many classes (timm and torchvision specs get it; a py: "
                      "factory must accept num_classes)")
            why = classes_from
        raise KdcacheError(f"model {spec!r} outputs {found} classes but {num_classes} were asked for ({why}); {advice}")
    dmean, dstd = normalization(model)
    mean = tuple(float(x) for x in mean) if mean is not None else dmean
    std = tuple(float(x) for x in std) if std is not None else dstd
    if len(mean) != 3 or len(std) != 3:
        raise KdcacheError(f"--mean and --std need three values each (R,G,B), got {mean} and {std}")
    return ModelInfo(model, spec, found, mean, std, weights, file_sha256(weights) if weights else None, init_seed)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] → normalised for a model."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s
