"""The command line of every entry script comes from its one config dataclass (CleanRL style).

Each field becomes `--field-name`; its `help` metadata is the flag's documentation, and the default is shown.
Booleans get `--flag / --no-flag`. `Optional` fields accept the word `none`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _parser_for(tp):
    """The argparse `type` for a field annotation (str, int, float, or Optional of one of them)."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        inner = [t for t in typing.get_args(tp) if t is not type(None)][0]
        base = _parser_for(inner)
        return lambda s: None if s.lower() == "none" else base(s)
    if typing.get_origin(tp) is typing.Literal:
        return str
    return tp


def parse_dataclass_args(cls, argv=None, description: str | None = None):
    """Build an argparse parser from dataclass `cls`, parse `argv`, return an instance of `cls`."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kwargs = {"type": _parser_for(tp), "default": default, "help": help_text, "dest": f.name}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        parser.add_argument(flag, **kwargs)
    return cls(**vars(parser.parse_args(argv)))


def arg(default, help: str, **kwargs):
    """A dataclass field with its --help text: `lr: float = arg(1e-6, "learning rate")`."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
