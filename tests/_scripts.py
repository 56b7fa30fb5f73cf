"""Helpers for tests that look at scripts/*.py and benchmarks/*.py without running their work."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """Import a script by path (its ``__main__`` block does not run)."""
    path = ROOT / relpath
    name = "script_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


def _capture(self, args=None, namespace=None):
    raise _Captured(self)


def script_parser(relpath: str) -> argparse.ArgumentParser:
    """The parser a script builds, caught at its first ``parse_args`` call (nothing after runs).

    Works for scripts with a ``parse_args(argv)`` function and for those that parse inside
    ``main(argv)``.
    """
    module = load_script(relpath)
    entry = getattr(module, "parse_args", None) or module.main
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _capture):
        try:
            entry([])
        except _Captured as caught:
            return caught.parser
    raise AssertionError(f"{relpath} never called ArgumentParser.parse_args")


def parse_script_args(relpath: str, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` as the script does, including checks its own ``parse_args`` adds.

    Raises AssertionError with argparse's message when the arguments are refused.
    """
    module = load_script(relpath)
    entry = getattr(module, "parse_args", None)
    try:
        if entry is not None:
            with mock.patch.object(argparse.ArgumentParser, "exit", _exit):
                return entry(argv)
        parser = script_parser(relpath)
        with mock.patch.object(argparse.ArgumentParser, "exit", _exit):
            return parser.parse_args(argv)
    except _Refused as err:
        raise AssertionError(f"{relpath} refuses {argv}: {err}") from None


class _Refused(Exception):
    pass


def _exit(self, status=0, message=None):
    raise _Refused(message or f"exit {status}")
