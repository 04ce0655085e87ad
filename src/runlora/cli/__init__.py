"""The ``runlora`` command: ``runlora bench``, ``runlora plan``, ``runlora finetune``, ...

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Bad options print one clear line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "CliError"]

#: subcommand name -> module (under runlora.cli) that implements it.
SUBCOMMANDS = {
    "bench": "bench",
    "layer-bench": "layer_bench",
    "plan": "plan",
    "finetune": "finetune",
}


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


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
