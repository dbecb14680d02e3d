"""The `kdcache` command: a thin click layer over the Python API.

Each sub-command lives in its own module here and only parses flags and calls the library.
User errors (``KdcacheError``) print one clear line and exit with code 2; no traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time

import click

from ..version import __version__
from ..errors import KdcacheError


# Storage that ran out: no space, a quota, a file-size limit (RLIMIT_FSIZE / `ulimit -f`; Python
# ignores SIGXFSZ, so such a write fails with EFBIG instead of killing the process).
_FULL = {
    errno.ENOSPC: ("no space left on device", "free some space"),
    getattr(errno, "EDQUOT", -1): ("disk quota exceeded", "free some space or raise the quota"),
    errno.EFBIG: ("file too large (a file-size limit, e.g. `ulimit -f`, or the filesystem's largest file)",
                  "raise the limit"),
}


def storage_full(e: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT / EFBIG OSError in an exception or its causes, if there is one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def storage_full_message(e: OSError) -> str:
    what, advice = _FULL[e.errno]
    where = f" while writing {e.filename}" if e.filename else ""
    return (f"{what}{where} ([Errno {e.errno}] {e.strerror}); {advice}, then re-run the same command: it resumes "
            "(precompute keeps every finished shard group and redoes the unfinished one; nothing half written is "
            "kept as finished)")


# The sub-commands: name -> (module in kdcache.cli, one line for `kdcache --help`). Each module is
# imported only when its command runs or shows its help, so `kdcache --help` does not load torch.
COMMANDS = {
    "pack": ("pack", "ImageFolder tree -> WebDataset train/val shards + classes.json."),
    "precompute": ("precompute", "Run the teacher once on seeded views of every image; store its top-k."),
    "inspect": ("inspect", "Look inside a cache: summary, one record, a rendered view."),
    "verify": ("verify", "Re-run the teacher on sampled views and prove the cache replays exactly."),
    "train": ("train", "Train a student on the exact views a cache was made on."),
    "evaluate": ("evaluate", "A run's student on validation shards: every exit, their ensemble, early exit."),
    "demo": ("demo", "The whole flow on bundled digits, no download."),
    "info": ("info", "Versions of kdcache and its libraries, and the PIL flavour in use."),
}

# What to tell a user who pressed Ctrl-C, per command.
_INTERRUPTED = {
    "precompute": "finished shard groups are kept; re-run the same command to resume (unfinished groups are redone)",
    "train": "re-run the same command with --resume to continue from the last checkpoint (written every "
             "--checkpoint-every steps and at each epoch end)",
    "demo": "re-run the same command: finished stages are reused",
    "pack": "the output is incomplete (no half-written shard is left as a .tar); run pack again into an empty folder",
}


# After a Ctrl-C, how long the command may take to stop on its own before the process ends at once.
INTERRUPT_GRACE_S = 3.0


def _interrupted_line(name: str | None) -> str:
    return f"\ninterrupted ({name or 'kdcache'}): {_INTERRUPTED.get(name or '', 'nothing was changed')}"


class Interrupt:
    """The SIGINT handler of a command line run.

    The first Ctrl-C raises KeyboardInterrupt in the main thread as Python's own handler does, so
    ``finally`` blocks run (claims released, workers shut down) and the command says how to go on.
    Python cannot raise it everywhere: inside a finaliser or a weakref callback it prints
    "Exception ignored" and carries on, and the job would then run to its end as if nothing had been
    pressed. So the first Ctrl-C also starts a timer: a process still alive ``INTERRUPT_GRACE_S``
    later, or one that gets a second Ctrl-C, says the same line and ends at once with code 130.
    Ending at any instant is safe for kdcache's jobs: precompute redoes unfinished groups, train
    resumes from its last checkpoint. Forked data workers keep Python's default behaviour."""

    def __init__(self, name: str | None = None):
        self.name = name
        self.pid = os.getpid()
        self.pressed = False
        self._said = threading.Lock()

    def __call__(self, signum, frame):
        if os.getpid() != self.pid:
            raise KeyboardInterrupt
        if self.pressed:
            self.stop_now()
        self.pressed = True
        threading.Thread(target=self._stop_later, name="kdcache-interrupt", daemon=True).start()
        sys.unraisablehook = _unraisable_but_interrupt(sys.unraisablehook)
        raise KeyboardInterrupt

    def _stop_later(self):
        time.sleep(INTERRUPT_GRACE_S)
        self.stop_now()

    def say(self) -> None:
        """Print the interrupted line, once per process."""
        if self._said.acquire(blocking=False):
            click.echo(_interrupted_line(self.name), err=True)

    def stop_now(self):
        self.say()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not keep the process alive
                pass
        os._exit(130)


def _unraisable_but_interrupt(hook):
    """``hook`` for everything but this KeyboardInterrupt where Python cannot raise it (it would print
    "Exception ignored … KeyboardInterrupt" with a traceback; the timer ends the run instead)."""

    def quiet_interrupt(unraisable) -> None:
        if unraisable.exc_type is not KeyboardInterrupt:
            hook(unraisable)

    return quiet_interrupt


def _quiet_unraisable(unraisable) -> None:
    """After a Ctrl-C, objects torn down at exit (an event loop that was running, a half-used
    generator) may raise in their finalisers; that is noise once the command said it was interrupted."""


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured output): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class KdcacheGroup(click.Group):
    """The ``kdcache`` group: sub-commands loaded on first use; ``KdcacheError`` becomes one
    message and its exit code; a full disk, a quota or a file-size limit one clean message (exit
    code 2); Ctrl-C exit code 130 with how to go on."""

    def list_commands(self, ctx):
        return list(COMMANDS) + [n for n in self.commands if n not in COMMANDS]

    def get_command(self, ctx, name):
        interrupt = signal.getsignal(signal.SIGINT)
        if isinstance(interrupt, Interrupt):
            interrupt.name = name  # what the interrupted line names, also when the timer ends the run
        if name not in COMMANDS:
            return self.commands.get(name)  # one added with cli.add_command (plugins, tests)
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{COMMANDS[name][0]}"), name)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        rows += [(n, c.get_short_help_str()) for n, c in self.commands.items() if n not in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        interrupt, previous = None, None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is \
                signal.default_int_handler:
            interrupt = Interrupt()
            previous = signal.signal(signal.SIGINT, interrupt)
        try:
            result = super().invoke(ctx)
            if interrupt is not None and interrupt.pressed:  # Python swallowed it; the command ran on
                raise KeyboardInterrupt
            return result
        except KdcacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (KeyboardInterrupt, click.Abort):
            name = ctx.invoked_subcommand or ""
            if interrupt is not None:
                interrupt.name = name or interrupt.name
                interrupt.say()
            else:
                click.echo(_interrupted_line(name), err=True)
            sys.unraisablehook = _quiet_unraisable
            sys.exit(130)
        except BrokenPipeError:
            # The reader of stdout went away (`kdcache inspect ... | head`): stop quietly, with 0, as
            # Unix tools do. Output still buffered goes to /dev/null, so the exit does not fail on it.
            _stdout_to_devnull()
            sys.exit(0)
        except Exception as e:
            full = storage_full(e)
            if full is None:
                raise
            click.echo(f"error: {storage_full_message(full)}", err=True)
            sys.exit(KdcacheError.exit_code)
        finally:
            if previous is not None and not (interrupt is not None and interrupt.pressed):
                signal.signal(signal.SIGINT, previous)


@click.group(cls=KdcacheGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdcache")
def cli():
    """Consistent knowledge distillation from a cache of teacher outputs.

    \b
    Typical flow:
      kdcache pack IMAGEFOLDER data/ --val-fraction 0.05     ImageFolder -> WebDataset shards
      kdcache precompute --data data/train --teacher timm:resnet50 \\
          --teacher-weights r50.safetensors --out cache.zarr   teacher top-k on V seeded views
      kdcache inspect cache.zarr                             look inside the cache
      kdcache train --data data/train --cache cache.zarr --student timm:resnet18 --out runs/r18
      kdcache verify cache.zarr --data data/train --teacher ...   prove the replay is exact

    Run `kdcache demo` for the whole flow on bundled data, and `kdcache COMMAND --help` for details.
    """


def main():
    cli(prog_name="kdcache")
