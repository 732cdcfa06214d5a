"""The ``featlab`` command: parse arguments, call the library, print.

Each sub-command lives in a small module of this package (``backbones``, ``caches``,
``analyses``, ``heads``, ``demo``) as a ``cmd_*`` function plus its ``add_commands`` parser
block. Heavy modules are imported inside each command so that ``featlab --help`` is instant.
Errors that featlab raises on purpose (``FeatlabError``) become one line on stderr and exit
code 2; one raised in a DataLoader worker loses the worker's traceback.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from featlab import __version__
from featlab.cli import analyses, backbones, caches, demo, heads
from featlab.errors import FeatlabError, FeatlabWarning

log = logging.getLogger("featlab")

# commands that, run again after a kill, continue from what they had written
RESUMABLE = ("extract", "train-head", "sweep", "demo")
#: Seconds between progress-bar updates when stderr is not a terminal (a log file): tqdm's
#: default 0.1 s would write ten updates a second into it. ``TQDM_MININTERVAL`` overrides.
LOG_BAR_SECONDS = 30


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like featlab's own, negative numbers in scientific
    notation read as values (``--lr -1e-3`` is a bad value, not a missing one), no abbreviated
    flags (``demo --seed 1`` is not ``--seeds 1``), and an unknown flag reported by its command
    with the closest ones it has."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(parsed)
            flags = [o for a in parser._actions for o in a.option_strings]
            close = [m for x in extras if x.startswith("-")
                     for m in difflib.get_close_matches(x.split("=")[0], flags, n=1)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            if (getattr(parsed, "command", None) in RESUMABLE
                    and any(x.split("=")[0] == "--resume" for x in extras)):
                hint = (" (none is needed: the same command without it resumes where a stopped "
                        "run left off)")
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The (sub-)command's own parser: ``featlab analyze cka``'s for ``analyze cka``."""
        parser: argparse.ArgumentParser = self
        for dest in ("command", "analysis"):
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            name = getattr(parsed, dest, None)
            if not subs or name not in subs[0].choices:
                break
            parser = subs[0].choices[name]
        return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featlab",
        description="Study the skip points of CNN backbones for semantic segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"featlab {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars, warnings only")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (backbones, caches, analyses, heads, demo):
        group.add_commands(sub, common)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Add "(default X)" to every option's help that does not state its default already."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _show_defaults(command)
        elif (action.option_strings and action.default is not None
              and action.default is not False and action.default != argparse.SUPPRESS
              and "default" not in (action.help or "")):
            action.help = f"{action.help} (default %(default)s)" if action.help else (
                "default %(default)s")


class _LineFormatter(logging.Formatter):
    """Log records as the CLI's other lines read: ``featlab extract: wrote ...``, and
    ``featlab extract: warning: ...`` as :func:`_show_warning` prints warnings."""

    def __init__(self, command: str):
        super().__init__()
        self.prefix = f"featlab {command}:"

    def format(self, record: logging.LogRecord) -> str:
        kind = " warning:" if record.levelno >= logging.WARNING else ""
        return f"{self.prefix}{kind} {record.getMessage()}"


def _setup_logging(quiet: bool, verbose: bool, command: str) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter(command))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    if quiet:
        os.environ["FEATLAB_PROGRESS"] = "0"


def run() -> None:
    """The ``featlab`` console script and ``python -m featlab``: :func:`main` in a process of its
    own, which keeps freed memory for reuse (:mod:`featlab.allocator`) unless
    ``FEATLAB_KEEP_MEMORY=0``."""
    try:
        code = main(own_process=True)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`featlab points resnet50 | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        code = 128 + signal.SIGPIPE  # what a shell reports for a process killed by SIGPIPE
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Run one ``featlab`` command in this process; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "analysis", None))))
    _setup_logging(args.quiet, args.verbose, command)
    args.keeps_freed_memory = False
    if own_process and not sys.stderr.isatty():  # a batch job's log: a bar line per 30 s
        # (tqdm reads it when imported, which torchvision does: set before _import_whole)
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_BAR_SECONDS))
    if own_process and os.environ.get("FEATLAB_KEEP_MEMORY", "1") != "0":
        from featlab.allocator import keep_freed_memory

        args.keeps_freed_memory = keep_freed_memory()
    try:
        _import_whole(getattr(args, "loads", ("torch", "torchvision")))
        if own_process and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        from featlab.runinfo import command_line

        command_line(list(sys.argv[1:] if argv is None else argv))  # recorded in its results
        with warnings.catch_warnings():  # one line per warning, like errors; restored after
            warnings.showwarning = functools.partial(_show_warning, command)
            return args.func(args)
    except FeatlabError as err:
        print(f"featlab {command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        again = "; the same command resumes where it stopped" if command in RESUMABLE else ""
        terminated = isinstance(err, _Terminated)
        print(f"featlab {command}: {'terminated' if terminated else 'interrupted'}{again}",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:  # under torchrun: leave the process group before the interpreter tears it down
        from featlab.distributed import destroy

        destroy()
        runinfo = sys.modules.get("featlab.runinfo")
        if runinfo is not None:  # the next command in this process records its own line
            runinfo.command_line(None)


class _Terminated(KeyboardInterrupt):
    """SIGTERM -- a scheduler cancelling or pre-empting the job (SLURM sends it first), or
    torchrun passing it on -- stops the command as Ctrl-C does: the work in flight is left
    resumable, locks and buffers are released, and the exit code is 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one while cleaning up: stop now
    raise _Terminated


def _import_whole(modules: Sequence[str]) -> None:
    """Import ``modules`` (torch and torchvision, or what a command needs of them: the cache
    commands ``inspect``, ``verify`` and ``merge`` need neither) with Ctrl-C held back until
    they are loaded, then act on it: interrupted midway, their imports leave half-registered
    operators that crash the process (a segfault, or a RuntimeError about an operator
    implemented twice) instead of stopping it."""
    held = threading.current_thread() is threading.main_thread()  # signals go to it only
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True)) if held else None
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        if held:
            signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _one_line(err: BaseException) -> str:
    """The message on one line. An error raised in a DataLoader worker comes back with the
    worker's traceback in its message; only the original message is kept, with where it came
    from."""
    text = str(err)
    if "\nOriginal Traceback" in text:  # torch's ExceptionWrapper.reraise
        where = text.split("\n", 1)[0].split(" in ", 1)[-1].rstrip(".")  # DataLoader worker ...
        last = text.rstrip().splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__name__}: "
        text = f"{last.removeprefix(prefix)} (in {where})"
    return " ".join(text.split())


def _show_warning(command: str, message, category, filename, lineno, file=None, line=None
                  ) -> None:
    """A warning as the CLI prints it: one line naming the command, not Python's source line."""
    kind = "" if issubclass(category, FeatlabWarning) else f" ({category.__name__})"
    print(f"featlab {command}: warning: {_one_line(message)}{kind}", file=file or sys.stderr)
