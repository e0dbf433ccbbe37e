"""The command line of every entry point (train, sft, eval, export, report): one parser.

    parser = Parser("zppo_fast.sft", __doc__, config=True)
    args = parser.parse_args(argv)              # args.config, args.overrides
    cfg = parser.load_config(args.config, args.overrides)

A mistake on the command line -- an unknown option, a value of the wrong type or out of range, a
config key that does not exist -- ends the process with ONE line on stderr and exit code 2, no
traceback, naming the closest valid options for a misspelling. `--help` exits 0. The config-driven
commands (train, sft) take `--config FILE` and `--section.key VALUE` overrides, and their `--help`
lists every key with its type, default and the comment that explains it, read from
zppo_fast/config.py's source so the documentation is written once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Literal, NoReturn

from zppo_fast.config import Config, ConfigError, coerce, load_config

_NUMBER = re.compile(r"^-\.?\d")  # "-1", "-.5": a negative value, not an option


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its documentation} of a dataclass: the comment lines right above the field and
    the comment beside it, in source order (zppo_fast/config.py's convention)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        docs[node.target.id] = " ".join(above + beside)
    return docs


def describe_type(kind: object) -> str:
    """A field type as the help shows it: "int >= 1", "float in (0, 1]", "zppo | grpo | ...", "str | none"."""
    origin = typing.get_origin(kind)
    if origin is Annotated:
        base, *checks = typing.get_args(kind)
        text = describe_type(base)
        for check in checks:
            text = check.describe(text)
        return text
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(kind)))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("none" if a is type(None) else describe_type(a) for a in typing.get_args(kind))
    if origin is list:
        return f"list of {describe_type(typing.get_args(kind)[0])}"
    return getattr(kind, "__name__", str(kind))


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return "none" if value is None else json.dumps(value)


def config_reference(width: int = 100) -> str:
    """Every `section.key` of Config with its type, default and documentation, by section."""
    out = ["config keys (a TOML [section] table in --config FILE, or --section.key VALUE; the latter win):"]
    for section in dataclasses.fields(Config):
        cls = type(section.default_factory())
        out.append(f"\n[{section.name}]")
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # its own docstring, not dataclass's
            out += textwrap.wrap(" ".join(cls.__doc__.split()), width, initial_indent="  ", subsequent_indent="  ")
        hints, docs = typing.get_type_hints(cls, include_extras=True), field_comments(cls)
        for f in dataclasses.fields(cls):
            out += textwrap.wrap(f"{section.name}.{f.name}: {describe_type(hints[f.name])} = {_default(f)}", width,
                                 initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False)
            if docs.get(f.name):
                out += textwrap.wrap(docs[f.name], width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


def config_keys() -> list[str]:
    """Every `--section.key` option the config-driven commands take."""
    return [f"--{s.name}.{f.name}" for s in dataclasses.fields(Config)
            for f in dataclasses.fields(type(s.default_factory()))]


def checked(kind: object) -> Callable[[str], object]:
    """An argparse `type=` that converts and checks like a config field of type `kind`
    (e.g. `checked(OpenFraction)` for a top-p); argparse names the option in its error."""

    def convert(text: str) -> object:
        try:
            return coerce(text, kind, "value")
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).replace("config key 'value' ", "")) from None

    return convert


class Parser(argparse.ArgumentParser):
    """argparse with the project's conventions: errors are one line on stderr with exit code 2,
    an unknown option names the closest valid ones, options are never abbreviated. With
    `config=True`: `--config FILE`, `--section.key VALUE` overrides, and the keys in `--help`."""

    def __init__(self, module: str, doc: str | None, config: bool = False, **kwargs):
        summary, _, details = (doc or "").strip().partition("\n\n")
        super().__init__(prog=f"python -m {module}", description=summary + ("\n\n" + details if details else ""),
                         epilog=config_reference() if config else None, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.config = config
        if config:
            self.add_argument("--config", metavar="FILE", help="a TOML file of [section] tables (configs/*.toml)")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def format_usage(self) -> str:
        self._add_overrides_to_usage()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_overrides_to_usage()
        return super().format_help()

    def _add_overrides_to_usage(self) -> None:
        """argparse's usage line (every argument is added by now) plus the overrides it cannot know."""
        if self.config and self.usage is None:
            formatter = self._get_formatter()
            formatter.add_usage(None, self._actions, self._mutually_exclusive_groups, prefix="")
            self.usage = formatter.format_help().strip() + " [--section.key VALUE ...]"

    def parse_args(self, args: Sequence[str] | None = None, namespace=None) -> argparse.Namespace:
        """Parse `args` (default sys.argv[1:]); `.overrides` holds the `--section.key VALUE` tokens."""
        args = list(sys.argv[1:] if args is None else args)
        overrides = []
        if self.config:  # every --a.b token and its value (the next token, unless given as --a.b=VALUE)
            rest, i = [], 0
            while i < len(args):
                name = args[i].partition("=")[0]
                if name.startswith("--") and "." in name and name not in self._option_string_actions:
                    take = 1 if "=" in args[i] else 2
                    overrides += args[i:i + take]
                    i += take
                else:
                    rest.append(args[i])
                    i += 1
            args = rest
        self._reject_unknown(args)
        parsed = super().parse_args(args, namespace)
        parsed.overrides = overrides
        return parsed

    def _reject_unknown(self, args: list[str]) -> None:
        """Name an unknown option before argparse would complain about something else (a missing
        required option) or call it an 'unrecognized argument'."""
        if "--" in args:
            args = args[:args.index("--")]
        known = [o for o in self._option_string_actions if o.startswith("--")]
        for arg in args:
            name = arg.partition("=")[0]
            if not arg.startswith("-") or _NUMBER.match(arg) or name in self._option_string_actions:
                continue
            close = difflib.get_close_matches(name, known + (config_keys() if self.config else []), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "--help lists the options"
            self.error(f"unknown option '{name}' ({hint})")

    def load_config(self, path: str | None, overrides: Sequence[str]) -> Config:
        """`zppo_fast.config.load_config`, a ConfigError ending the process as a usage error."""
        try:
            return load_config(path, overrides)
        except ConfigError as e:
            self.error(str(e))
