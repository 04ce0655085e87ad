"""The ``runlora`` command: ``runlora bench``, ``runlora plan``, ``runlora finetune``, ...

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Bad options print one clear line and exit with code 2. Each ``run`` first says what it needs
beyond torch (``require``: missing -> exit 2 naming the extra to install, before any work;
``optional``: missing -> one warning line, and only that output is skipped).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Iterable

__all__ = ["main", "CliError", "require", "optional"]

#: subcommand name -> module (under runlora.cli) that implements it.
SUBCOMMANDS = {
    "bench": "bench",
    "layer-bench": "layer_bench",
    "plan": "plan",
    "finetune": "finetune",
}


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (``find_spec``)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; __spec__ None
        return False


def require(modules: Iterable[str], extra: str) -> None:
    """Raise CliError, naming ``pip install 'runlora[<extra>]'``, if one of the top-level
    ``modules`` is not installed."""
    missing = [m for m in modules if not _installed(m)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise CliError(
            f"{' and '.join(missing)} {verb} not installed: pip install 'runlora[{extra}]'"
        )


def optional(module: str, extra: str, *, command: str, skipped: str) -> bool:
    """True if ``module`` is installed; else print one warning line saying what is
    ``skipped`` and what to install, and return False."""
    if _installed(module):
        return True
    print(
        f"runlora {command}: warning: {module} is not installed, so {skipped}: "
        f"pip install 'runlora[{extra}]'",
        file=sys.stderr,
    )
    return False


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="runlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, mod_name in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"runlora.cli.{mod_name}")
        except ModuleNotFoundError as err:
            if err.name == f"runlora.cli.{mod_name}":
                continue
            raise
        mod.add_parser(sub, name)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except CliError as err:
        print(f"runlora {args.command}: error: {err}", file=sys.stderr)
        return 2
