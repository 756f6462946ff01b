"""``fitprune sweep``'s options, generated from ``flows.config.SweepConfig``: one option per field.

Each option is the field's name with dashes (``calib_samples`` → ``--calib-samples``), its help the
field's description and its choices the field's ``Literal`` values. No option has a default of its
own: an option not given is left out, so the config's default applies, exactly as in the flow and
the deployment. Two fields map differently:

* ``model`` (a discriminated union) is ``--model demo|toy|DIR`` plus ``--dtype`` for the demo model
  and checkpoints;
* ``data_root`` is the global ``--data-root``, accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import types
import typing

from pydantic import ValidationError

from flows.config import DemoModel, PathModel, SweepConfig, ToyModel

__all__ = ["add_config_options", "config_from_args", "one_line", "option_fields"]

_SPECIAL = {"model", "data_root"}  # not generated: see the module docstring


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.3,0.5,0.7; got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _strip_optional(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _argument(name: str, field) -> dict:
    """argparse keywords for one config field."""
    annotation = _strip_optional(field.annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    kw: dict = {"dest": name, "default": argparse.SUPPRESS}
    if origin is tuple and args[:1] == (float,):
        kw.update(type=_floats, metavar="X,Y")
    elif origin is tuple and args[:1] == (str,):
        kw.update(type=_names, metavar="A,B")
    elif origin is typing.Literal:
        kw.update(choices=list(args))
    elif annotation is int:
        kw.update(type=int, metavar="N")
    elif annotation is str:
        kw.update(type=str)
    else:
        raise TypeError(f"SweepConfig.{name}: no CLI mapping for {annotation!r}; add one in flows/cli_config.py")
    default = field.default
    shown = "" if default is None else f" (default {','.join(map(str, default)) if isinstance(default, tuple) else default})"
    kw["help"] = (field.description or "") + shown
    return kw


def option_fields() -> dict[str, str]:
    """``{field: option}`` of every generated option (``model`` and ``data_root`` excluded)."""
    return {name: "--" + name.replace("_", "-") for name in SweepConfig.model_fields if name not in _SPECIAL}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per ``SweepConfig`` field (module docstring) to the ``sweep`` subparser."""
    fields = SweepConfig.model_fields
    parser.add_argument("--model", default=argparse.SUPPRESS, help=fields["model"].description)
    dtype = DemoModel.model_fields["dtype"]
    parser.add_argument("--dtype", default=argparse.SUPPRESS, choices=list(typing.get_args(dtype.annotation)),
                        help="weights of the demo model or a checkpoint: " + dtype.description)
    for name, option in option_fields().items():
        parser.add_argument(option, **_argument(name, fields[name]))


def _model(args):
    name, dtype = getattr(args, "model", None), getattr(args, "dtype", None)
    extra = {} if dtype is None else {"dtype": dtype}
    if name == "toy":
        if dtype is not None:
            raise ValueError("--dtype applies to the demo model and checkpoints; the toy model runs in float32")
        return ToyModel()
    if name is None:
        return DemoModel(**extra) if extra else None
    return DemoModel(**extra) if name == "demo" else PathModel(path=name, **extra)


def one_line(err: ValidationError) -> str:
    """A pydantic error as one line naming the options: what was received and what is allowed."""
    parts = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"] if not str(x).isdigit()]
        option = "--" + loc[0].replace("_", "-") if loc else "sweep"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(msg if e["type"] == "value_error" else f"{option}: {msg}, got {e.get('input')!r}")
    return "; ".join(parts)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The ``SweepConfig`` of parsed ``sweep`` options: the options given, the config's defaults for the
    rest. A bad value raises ValueError in one line (``one_line``)."""
    given = {name: getattr(args, name) for name in option_fields() if hasattr(args, name)}
    try:
        model = _model(args)
        if model is not None:
            given["model"] = model
        return SweepConfig(data_root=args.data_root, **given)
    except ValidationError as err:
        raise ValueError(one_line(err)) from None
