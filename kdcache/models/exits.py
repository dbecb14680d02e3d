"""Multi-exit students for self-distillation (Zhang et al., "Be Your Own Teacher", ICCV 2019;
"Self-Distillation: Towards Efficient and Compact Neural Networks", TPAMI 2021).

``MultiExit(model, exits="all", resolution=R)`` wraps a staged CNN without touching it:

- **Stages** are found by ``stage_names(model)``: a model's own ``stage_names()`` method (the zoo's
  ``SmallCNN`` has one; a ``py:`` factory's model can define it too), a timm model's
  ``feature_info`` (the entries at stride 4 or more, so a stem is not a stage), or a torchvision
  ResNet's ``layer1..layer4``. Stages are numbered from 1, shallow to deep; S is their count.
- **Exits** sit after the stages named by ``exits`` ("all": 1..S−1, or a list of stage numbers).
  Each exit is ``ExitHead``: an attention module (a stride-2 separable convolution, bilinear upsampling back
  to the feature's size, a sigmoid, multiplied into the feature), a bottleneck of depthwise-separable
  stride-2 convolutions that brings the feature to the last stage's width and resolution, a global
  average pool and a linear classifier. The **deepest exit is the model's own head**.
- ``forward(x)`` is the wrapped model's forward, unchanged (the deepest logits, bit for bit): the
  wrapper is a drop-in student for evaluation and checkpoints. ``forward(x, all_exits=True)``
  (or ``exits_of(x)``) also returns every exit's logits, shallow to deep, and the pooled features
  the hint loss compares: each exit's bottleneck output and the deepest stage's output, pooled.

Stage outputs are taken with forward hooks, so the model runs exactly as it would alone. A hook can
also stop the forward after a stage (``cost_profile``): that is how the compute of "running up to
exit i" is counted, with ``torch.utils.flop_counter.FlopCounterMode`` on the real model.

The state dict holds ``model.*`` (the wrapped model's own keys) and ``exits.*``;
``backbone_state_dict`` takes the plain model's weights back out of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KdcacheError


class _Stop(Exception):
    """Raised by a stage hook to end a forward early (compute accounting only)."""


class _StageHook:
    """The forward hook on a stage module: records its output for the wrapper while it asks for
    it, and ends the forward there when told to. An object (not a closure) so that
    ``copy.deepcopy`` of the wrapper gives hooks that point at the copy."""

    def __init__(self, owner: "MultiExit", name: str):
        self.owner, self.name = owner, name

    def __call__(self, module, args, output):
        owner = self.owner
        if owner._captured is not None:
            owner._captured[self.name] = (output, output._version if isinstance(output, torch.Tensor) else None)
        if owner._stop_at == self.name:
            raise _Stop


def stage_names(model: nn.Module) -> list[str]:
    """The names (as in ``named_modules``) of the modules whose outputs end the model's stages."""
    own = getattr(model, "stage_names", None)
    if callable(own):
        names = list(own())
    elif isinstance(getattr(model, "feature_info", None), (list, tuple)) and model.feature_info:
        info = [f for f in model.feature_info if isinstance(f, dict) and "module" in f]
        names = [f["module"] for f in info if int(f.get("reduction", 4)) >= 4]
    elif all(isinstance(getattr(model, f"layer{i}", None), nn.Module) for i in range(1, 5)):
        names = [f"layer{i}" for i in range(1, 5)]
    else:
        raise KdcacheError(
            f"cannot find the stages of a {type(model).__name__}: self-distillation needs a staged CNN (a timm "
            "model with feature_info, a torchvision ResNet, kdcache's zoo CNNs, or a model with a stage_names() "
            "method returning the names of the modules that end its stages)")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KdcacheError(f"{type(model).__name__}: stage modules {missing} do not exist")
    if len(names) < 2:
        raise KdcacheError(f"{type(model).__name__} has {len(names)} stage; self-distillation needs at least 2 "
                           "(exits go after every stage but the last)")
    return names


def parse_exits(exits, num_stages: int) -> list[int]:
    """``"all"`` or stage numbers (a list, or a string ``"1,2"``) → sorted stage numbers in 1..S−1."""
    if exits is None or exits == "all":
        return list(range(1, num_stages))
    if isinstance(exits, str):
        try:
            exits = [int(x) for x in exits.split(",") if x.strip()]
        except ValueError:
            raise KdcacheError(f"--sd-exits must be 'all' or stage numbers like 1,2; got {exits!r}") from None
    out = sorted({int(s) for s in exits})
    bad = [s for s in out if not 1 <= s < num_stages]
    if bad or not out:
        raise KdcacheError(
            f"--sd-exits {','.join(map(str, bad)) or '(none)'}: the student has {num_stages} stages (1..{num_stages}); "
            f"exits go after stages 1..{num_stages - 1} (stage {num_stages} ends in the model's own head)")
    return out


class SepConv(nn.Sequential):
    """Depthwise 3x3 (stride s), pointwise 1x1, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Attention(nn.Module):
    """``x · sigmoid(up(down(x)))``: a stride-2 separable convolution, bilinear upsampling to x's size."""

    def __init__(self, c: int):
        super().__init__()
        self.down = SepConv(c, c, 2)

    def forward(self, x):
        a = F.interpolate(self.down(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(a)


class ExitHead(nn.Module):
    """Attention, bottleneck to the last stage's width (and resolution: ``steps`` stride-2 convs),
    global average pool, linear classifier. ``forward`` returns ``(logits, pooled feature)``."""

    def __init__(self, cin: int, cout: int, steps: int, num_classes: int):
        super().__init__()
        self.attention = Attention(cin)
        if steps <= 0:
            self.bottleneck = SepConv(cin, cout, 1)
        else:
            widths = [round(cin * (cout / cin) ** (j / steps)) for j in range(1, steps)] + [cout]
            layers, c = [], cin
            for w in widths:
                layers.append(SepConv(c, w, 2))
                c = w
            self.bottleneck = nn.Sequential(*layers)
        self.fc = nn.Linear(cout, num_classes)

    def forward(self, x):
        f = self.bottleneck(self.attention(x)).mean(dim=(2, 3))
        return self.fc(f), f


class MultiExit(nn.Module):
    """A staged CNN with classifier exits after some of its stages (module doc)."""

    def __init__(self, model: nn.Module, exits="all", resolution: int = 224, num_classes: int | None = None):
        super().__init__()
        self.model = model
        names = stage_names(model)
        self.stage_modules = names
        self.exit_stages = parse_exits(exits, len(names))
        shapes = self._probe(resolution)
        if num_classes is None:
            num_classes = int(shapes["logits"][-1])
        c_last, h_last = shapes[names[-1]][1], shapes[names[-1]][2]
        heads = []
        for s in self.exit_stages:
            _, c, h, _ = shapes[names[s - 1]]
            steps = max(0, round(math.log2(max(h, 1) / max(h_last, 1))))
            heads.append(ExitHead(c, c_last, steps, num_classes))
        self.exits = nn.ModuleList(heads)
        self.num_classes = num_classes
        self._captured: dict | None = None
        self._stop_at: str | None = None
        for n in {names[s - 1] for s in self.exit_stages} | {names[-1]}:
            dict(model.named_modules())[n].register_forward_hook(_StageHook(self, n))

    # -- stage outputs ------------------------------------------------------------------------

    def _take(self, name: str) -> torch.Tensor:
        t, version = self._captured[name]
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise KdcacheError(f"stage {name!r} of {type(self.model).__name__} does not output a (B, C, H, W) "
                               "feature map; self-distillation needs a CNN")
        if t._version != version:
            raise KdcacheError(f"stage {name!r} of {type(self.model).__name__} has its output modified in place by "
                               "the next layer; an exit cannot read it")
        return t

    @torch.no_grad()
    def _probe(self, resolution: int) -> dict:
        """Shapes of every stage output (and of the logits) on one dummy image, in eval mode."""
        shapes, handles = {}, []
        modules = dict(self.model.named_modules())
        for n in self.stage_modules:
            handles.append(modules[n].register_forward_hook(
                lambda m, a, out, n=n: shapes.__setitem__(n, tuple(out.shape) if isinstance(out, torch.Tensor) else None)))
        was = self.model.training
        self.model.eval()
        try:
            p = next(self.model.parameters(), None)
            from .factory import logits_of

            z = logits_of(self.model(torch.zeros(1, 3, resolution, resolution, device=p.device if p is not None else None)))
        finally:
            self.model.train(was)
            for h in handles:
                h.remove()
        for n in self.stage_modules:
            if shapes.get(n) is None or len(shapes[n]) != 4:
                raise KdcacheError(f"stage {n!r} of {type(self.model).__name__} does not output a (B, C, H, W) feature "
                                   "map; self-distillation needs a CNN")
        shapes["logits"] = tuple(z.shape)
        return shapes

    # -- forward ------------------------------------------------------------------------------

    @property
    def exit_names(self) -> list[str]:
        """``exit<stage>`` for every exit, shallow to deep; the last is the model's own head."""
        return [f"exit{s}" for s in self.exit_stages] + [f"exit{len(self.stage_modules)}"]

    def forward(self, x, all_exits: bool = False):
        if not all_exits:
            return self.model(x)
        return self.exits_of(x)

    def exits_of(self, x) -> dict:
        """``{"logits": [z_1, ..., z_deepest], "features": [f_1, ..., f_deepest]}``, shallow to deep;
        ``f_i`` the pooled bottleneck output of exit i, ``f_deepest`` the pooled last-stage output."""
        from .factory import logits_of

        self._captured = {}
        try:
            z = logits_of(self.model(x))
            logits, feats = [], []
            for s, head in zip(self.exit_stages, self.exits):
                zi, fi = head(self._take(self.stage_modules[s - 1]))
                logits.append(zi)
                feats.append(fi)
            feats.append(self._take(self.stage_modules[-1]).mean(dim=(2, 3)))
        finally:
            self._captured = None
        return {"logits": logits + [z], "features": feats}

    # -- compute ------------------------------------------------------------------------------

    @torch.no_grad()
    def cost_profile(self, resolution: int) -> dict:
        """FLOPs of one image at ``resolution`` (FlopCounterMode on this model, eval mode):
        ``backbone``: the model up to the end of each exit's stage (the last entry: the whole model,
        head included); ``heads``: each shallow exit head; ``full``: the model's plain forward."""
        from torch.utils.flop_counter import FlopCounterMode

        was = self.training
        self.eval()
        p = next(self.parameters())
        x = torch.zeros(1, 3, resolution, resolution, device=p.device, dtype=p.dtype)
        backbone, heads = [], []
        try:
            for s, head in zip(self.exit_stages, self.exits):
                name = self.stage_modules[s - 1]
                self._captured, self._stop_at = {}, name
                with FlopCounterMode(display=False) as fc:
                    try:
                        self.model(x)
                    except _Stop:
                        pass
                backbone.append(int(fc.get_total_flops()))
                feat = self._take(name)
                self._captured, self._stop_at = None, None
                with FlopCounterMode(display=False) as fc:
                    head(feat)
                heads.append(int(fc.get_total_flops()))
            with FlopCounterMode(display=False) as fc:
                self.model(x)
            full = int(fc.get_total_flops())
        finally:
            self._captured, self._stop_at = None, None
            self.train(was)
        return {"backbone": backbone + [full], "heads": heads, "full": full}


def exit_costs(profile: dict) -> dict:
    """From ``cost_profile``: per exit (shallow to deep) the FLOPs of reaching it in early-exit
    inference (``cumulative``: the backbone up to its stage plus every exit head on the way,
    its own included) and of running it alone (``alone``: the backbone up to its stage and its own head)."""
    heads = profile["heads"] + [0]
    cumulative, alone = [], []
    for i, b in enumerate(profile["backbone"]):
        cumulative.append(b + sum(heads[: i + 1]))
        alone.append(b + heads[i])
    return {"cumulative": cumulative, "alone": alone, "full": profile["full"]}


def plain_cost_profile(model: nn.Module, resolution: int) -> dict:
    """``cost_profile`` of a single-exit model: its one exit is the whole model."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    p = next(model.parameters(), None)
    x = torch.zeros(1, 3, resolution, resolution, device=p.device if p is not None else None)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was)
    full = int(fc.get_total_flops())
    return {"backbone": [full], "heads": [], "full": full}


def is_multi_exit(model) -> bool:
    return isinstance(model, MultiExit)


def backbone_state_dict(state: dict) -> dict:
    """The wrapped model's own weights from a ``MultiExit`` state dict (``model.*``), e.g. to use
    a self-distilled model.pt as ``--student-weights`` of a plain run or to deploy the deepest exit."""
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
