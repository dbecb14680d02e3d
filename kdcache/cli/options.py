"""Flag types shared by several commands."""

from __future__ import annotations

import click


class FloatTuple(click.ParamType):
    """``MIN,MAX`` (or ``A,B,C``): a fixed number of comma-separated floats."""

    def __init__(self, n: int, what: str):
        self.n, self.name = n, what

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            parts = tuple(float(x) for x in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not {self.n} comma-separated numbers", param, ctx)
        if len(parts) != self.n:
            self.fail(f"{value!r} has {len(parts)} values; expected {self.n} ({self.name})", param, ctx)
        return parts


RANGE = FloatTuple(2, "MIN,MAX")
RGB = FloatTuple(3, "R,G,B")


def config_default(config_cls, name: str):
    """The default of a config dataclass field, so a flag and the Python API default alike."""
    import dataclasses

    f = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def per_teacher_option(flag: str, help_text: str, **kw):
    """A per-teacher flag: repeatable, matched to the --teacher flags by position (``per_teacher``)."""
    return click.option(flag, default=None, multiple=True, **kw,
                        help=f"{help_text} With several --teacher, give it once per teacher, in the same order.")


def per_teacher(values: tuple):
    """A repeated per-teacher option as the config takes it: None when not given, the value itself
    when given once, else the list (``tools.config.per_member`` matches it to the teachers)."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def workers_option(help_text: str):
    """-j/--workers with the default every command uses (``runtime.default_workers``); ``--help`` shows
    the rule and what it comes to on this machine."""
    from ..runtime import default_workers

    value = default_workers()
    return click.option("--workers", "-j", default=value, show_default=f"the cores but one, at most 4; {value} here",
                        help=help_text)


def threads_option():
    """--threads: the main process's torch threads (``runtime.set_threads`` picks the default)."""
    return click.option("--threads", type=int, default=None,
                        help="torch threads of the main process [default: the cores less one per --workers, at least "
                             "1]: more threads than cores slows everything down.")


def worker_timeout_option(config_cls):
    """--worker-timeout with the default of ``config_cls``'s ``worker_timeout`` field."""
    return click.option("--worker-timeout", type=float, default=config_default(config_cls, "worker_timeout"),
                        show_default=True,
                        help="Seconds to wait for a batch from the data workers; then stop with the likely cause (a "
                             "worker that cannot ship a batch, e.g. with /dev/shm full, would otherwise stall the job).")


def augmentation_options(what: str = ""):
    """--scale, --ratio, --flip/--no-flip, --mixup/--no-mixup, with ``views.AugSpec``'s defaults.
    ``what`` prefixes each help text (e.g. "Without a cache: "). ``augmentation(kw)`` turns the
    parsed flags into an AugSpec."""
    from ..data.views import AugSpec

    d = AugSpec()

    def deco(f):
        for opt in reversed([
            click.option("--scale", type=RANGE, default=",".join(map(repr, d.scale)), show_default=True,
                         help=f"{what}crop area fraction range MIN,MAX."),
            click.option("--ratio", type=RANGE, default=",".join(map(repr, d.ratio)), show_default=True,
                         help=f"{what}crop aspect-ratio range MIN,MAX."),
            click.option("--flip/--no-flip", default=d.flip, show_default=True, help=f"{what}random horizontal flips."),
            click.option("--mixup/--no-mixup", default=d.mixup, show_default=True,
                         help=f"{what}mix pairs inside each shard (function matching)."),
        ]):
            f = opt(f)
        return f

    return deco


def augmentation(kw: dict):
    """Pop the augmentation flags from a command's keyword arguments; return the AugSpec."""
    from ..data.views import AugSpec

    return AugSpec(scale=tuple(kw.pop("scale")), ratio=tuple(kw.pop("ratio")), flip=kw.pop("flip"),
                   mixup=kw.pop("mixup"))


# --sd-* flag -> (SelfDistillConfig field, type, help); the defaults come from SelfDistillConfig.
SD_FLAGS = (
    ("alpha", float, "weight of a shallow exit's distillation term; 1 - alpha weights its CE on labels."),
    ("temperature", float, "temperature of the shallow exits' distillation."),
    ("feature_weight", float, "weight of the L2 hint between each exit's feature and the deepest one (0 = off)."),
    ("exits", str, "which stages get an exit: 'all' (every stage but the last) or stage numbers from 1, e.g. 1,2."),
    ("teacher", None, "what the shallow exits distil from: the deepest exit, the cached (or live) teacher's top-k, "
                      "or both averaged."),
)


def self_distill_options():
    """--self-distill and the --sd-* flags of its settings (``learn.config.SelfDistillConfig``);
    ``self_distill(kw)`` turns them into the config's group."""
    from ..learn.config import SD_TEACHERS, SelfDistillConfig

    def deco(f):
        options = [click.option(
            "--self-distill", is_flag=True,
            help="Self-distillation: classifier exits after the student's stages (attention, bottleneck, linear), "
                 "trained from the deepest exit (docs/training.md). The deepest exit is the student's own head and "
                 "gets the mode's loss; model.pt holds the whole multi-exit network.")]
        for name, kind, text in SD_FLAGS:
            default = config_default(SelfDistillConfig, name)
            options.append(click.option(
                f"--sd-{name.replace('_', '-')}", type=click.Choice(SD_TEACHERS) if name == "teacher" else kind,
                default=default, show_default=True, help=f"With --self-distill: {text}"))
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def self_distill(kw: dict):
    """Pop --self-distill and the --sd-* flags from a command's keyword arguments; return the
    SelfDistillConfig, or None without --self-distill (an --sd-* flag without it is an error: it
    would change nothing)."""
    from click.core import ParameterSource

    from ..learn.config import SelfDistillConfig

    ctx = click.get_current_context()
    values = {name: kw.pop(f"sd_{name}") for name, _, _ in SD_FLAGS}
    given = {name: v for name, v in values.items()
             if ctx.get_parameter_source(f"sd_{name}") not in (ParameterSource.DEFAULT, None)}
    if not kw.pop("self_distill"):
        if given:
            flags = ", ".join(f"--sd-{name.replace('_', '-')}" for name in given)
            raise click.UsageError(f"{flags} set{'s' if len(given) == 1 else ''} self-distillation, which is off: "
                                   "add --self-distill, or drop the flag")
        return None
    return SelfDistillConfig(**values)


def storage_options_option(f):
    return click.option(
        "--storage-options", default=None, metavar="JSON",
        help='fsspec options for a remote cache URL, as JSON (e.g. \'{"anon": true}\').',
    )(f)


def parse_storage_options(text: str | None) -> dict | None:
    from ..errors import KdcacheError

    if not text:
        return None
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise KdcacheError(f"--storage-options is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise KdcacheError("--storage-options must be a JSON object")
    return opts
