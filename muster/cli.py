"""The ``muster`` command: a dispatcher whose subcommands come from entry points.

Packages contribute commands through the ``muster.commands`` entry-point group
(``register(subparsers) -> None``, each subcommand doing ``set_defaults(func=handler)``
with ``handler(args) -> int``). This module imports neither ``server`` nor ``agent``:
the SDK must not depend on the control plane just because they share one command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import TypeAlias, cast

from muster._version import __version__
from muster.errors import MusterError
from muster.sanitize import neutralize

ENTRY_POINT_GROUP = "muster.commands"

Handler = Callable[[argparse.Namespace], int]
# argparse has no public name for what add_subparsers() returns.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def command_group(subparsers: Subparsers, name: str, *, help: str) -> Subparsers:
    """The subparsers of command group ``name`` (``muster NAME ...``), made if new.

    Lets two packages add to one group (say ``audit query`` and ``audit verify``),
    which plain ``add_parser`` refuses as a conflict. ``muster NAME`` alone prints
    the group's help and exits 2.
    """
    existing = subparsers.choices.get(name)
    if existing is not None:
        for action in existing._actions:
            if isinstance(action, argparse._SubParsersAction):
                return cast(Subparsers, action)
        raise ValueError(f"muster command {name!r} already exists and is not a group")
    parser = subparsers.add_parser(name, help=help, description=help)
    group = parser.add_subparsers(title="commands", metavar="COMMAND")
    parser.set_defaults(func=_print_help(parser))
    return group


def build_parser(commands: Iterable[EntryPoint] | None = None) -> argparse.ArgumentParser:
    """The full parser, with every loadable ``muster.commands`` entry point registered."""
    parser = argparse.ArgumentParser(
        prog="muster",
        description="Muster: a control plane for fleets of agent daemons.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(func=_print_help(parser))
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    found = entry_points(group=ENTRY_POINT_GROUP) if commands is None else commands
    seen: set[str] = set()
    for ep in sorted(found, key=lambda e: e.name):
        if ep.name not in seen:
            seen.add(ep.name)
            _register(ep, subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``muster`` command; returns the process exit code."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly
        return code
    except BrokenPipeError:
        # The reader left early (`muster task list | head`): what it wanted, it got.
        # Point stdout at nothing so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    handler: Handler = args.func
    try:
        return handler(args)
    except MusterError as err:
        # Server messages may quote what agents or models wrote: shown, never obeyed.
        message = neutralize(" ".join(str(err).split()), single_line=True) or type(err).__name__
        print(f"muster: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _register(ep: EntryPoint, subparsers: Subparsers) -> None:
    # A broken or absent plugin must not take down the other commands.
    try:
        register = ep.load()
    except ModuleNotFoundError as err:
        if err.name and (ep.module == err.name or ep.module.startswith(err.name + ".")):
            return  # its package is not installed here: nothing to offer, nothing to report
        _warn(ep, err)
        return
    except Exception as err:
        _warn(ep, err)
        return
    try:
        register(subparsers)
    except Exception as err:
        _warn(ep, err)


def _warn(ep: EntryPoint, err: BaseException) -> None:
    print(
        f"muster: warning: cannot load commands {ep.name!r} ({ep.value}): "
        f"{type(err).__name__}: {err}",
        file=sys.stderr,
    )


def _print_help(parser: argparse.ArgumentParser) -> Handler:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show
