"""Every flag of every role also reads an environment variable: ``--grpc-port`` <-> ``DYN_GRPC_PORT``.

One mechanism, applied to each role's parser once it is built (:func:`env_defaults`), so a container
or a Kubernetes manifest configures a process with ``env:`` alone. The variable sets the option's
default, so an explicit flag still wins. Values are converted with the option's ``type`` and checked
against its ``choices``; on/off flags take ``1/true/yes/on`` or ``0/false/no/off``; options that
repeat or take several values take a comma-separated list. A bad value exits (status 2) with a
message naming the variable. ``--help`` shows each option's variable (``[env: DYN_X]``).

A few options keep the names they had before this rule (:data:`ENV_NAMES`): Dynamo's ``DYN_LOG``,
Consul's ``CONSUL_HTTP_ADDR``, ``DYN_TLS_RELOAD_S`` and ``DYN_ROUTER_USE_KV_EVENTS``. ``consul-dev`` uses the
prefix ``CONSUL_DEV_`` (its existing ``CONSUL_DEV_TIME_SCALE`` family), so its TLS flags never pick up the mesh's
``DYN_TLS_*``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import Any

PREFIX = "DYN_"
#: flags whose variable is not ``PREFIX + FLAG`` (names that existed before the rule, or are Consul's/Dynamo's)
ENV_NAMES: dict[str, str] = {
    "--log-level": "DYN_LOG",
    "--consul": "CONSUL_HTTP_ADDR",
    "--tls-reload-interval": "DYN_TLS_RELOAD_S",
    "--router-kv-events": "DYN_ROUTER_USE_KV_EVENTS",
    "--api-key": "DYN_API_KEYS",  # the frontend's keys (frontend/limits.py), comma-separated
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_name(option: argparse.Action, prefix: str = PREFIX) -> str | None:
    """The variable of an option (from its first long spelling); None for positionals and hidden aliases."""
    longs = [s for s in option.option_strings if s.startswith("--")]
    if not longs or option.help == argparse.SUPPRESS:
        return None
    if longs[0] in ENV_NAMES:
        return ENV_NAMES[longs[0]]
    return prefix + longs[0][2:].replace("-", "_").upper()


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")


def _convert(option: argparse.Action, raw: str) -> Any:
    """The value an option gets from the variable's text; ValueError says why it is refused."""
    if isinstance(option, argparse.BooleanOptionalAction):
        return _bool(raw)
    if isinstance(option, argparse._StoreTrueAction | argparse._StoreFalseAction):
        on = _bool(raw)
        return on if isinstance(option, argparse._StoreTrueAction) else not on
    if isinstance(option, argparse._StoreConstAction):
        return option.const if _bool(raw) else option.default
    if isinstance(option, argparse._CountAction):
        return int(raw)
    convert: Callable[[str], Any] = option.type if callable(option.type) else str  # type: ignore[assignment]
    many = isinstance(option, argparse._AppendAction) or option.nargs in ("*", "+")
    parts = [p.strip() for p in raw.split(",") if p.strip()] if many else [raw]
    values = []
    for part in parts:
        try:
            value = convert(part)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            kind = getattr(convert, "__name__", "value")
            raise ValueError(f"invalid {kind} value {part!r}" + (f" ({e})" if str(e) else "")) from None
        if option.choices is not None and value not in option.choices:
            raise ValueError(f"{part!r} is not one of {', '.join(map(str, option.choices))}")
        values.append(value)
    return values if many else values[0]


def _options(parser: argparse.ArgumentParser) -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    """Every option of a parser and of its sub-commands."""
    out: list[tuple[argparse.ArgumentParser, argparse.Action]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += _options(sub)
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            out.append((parser, action))
    return out


def env_defaults(
    parser: argparse.ArgumentParser, prefix: str = PREFIX, env: Mapping[str, str] | None = None
) -> argparse.ArgumentParser:
    """Give every option of ``parser`` its ``<prefix><FLAG>`` variable as default; returns the parser.

    An empty variable counts as unset. A value the option would refuse exits through ``parser.error``
    with the variable's name, the way a bad flag does.
    """
    env = os.environ if env is None else env
    for owner, option in _options(parser):
        name = env_name(option, prefix)
        if name is None:
            continue
        if option.help and name not in option.help:
            option.help = f"{option.help} [env: {name}]"
        elif not option.help:
            option.help = f"[env: {name}]"
        raw = env.get(name, "")
        if not raw:
            continue
        try:
            value = _convert(option, raw)
        except ValueError as e:
            owner.error(f"{name}={raw!r}: {e} (environment variable for {option.option_strings[0]})")
        if type(option) is argparse._AppendAction:
            value = _FromEnv(value)
            option.__class__ = _ReplaceEnvAppend
        option.default = value
    return parser


class _FromEnv(list):  # type: ignore[type-arg]
    """A repeatable option's values taken from its variable: the command line's first use replaces them."""


class _ReplaceEnvAppend(argparse._AppendAction):
    """argparse appends a repeated flag to its default; a flag given on the command line must replace the
    variable's values instead, as every other flag replaces its variable."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        if isinstance(getattr(namespace, self.dest, None), _FromEnv):
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)
