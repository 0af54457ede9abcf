"""Each setting declared once, on its option field, and the surfaces built from the declarations.

A field of an option object (``ServeOptions``, ``PullOptions``, ``Timeouts``, ``Limits``, the
vLLM config) carries a :class:`Setting` in its metadata: its help, the :class:`Rule` that checks
and converts a value, its command-line flag and its vLLM key (or why it has none). A field
holding a nested option object carries a :class:`Group`. From these the command line gets its
flags (``add_flags``, ``from_flags``) and the vLLM config its keys (``key_table``,
``from_keys``), and each object checks its own fields (``check_fields``): one rule, one place.

Errors name what the caller typed: the vLLM key, the flag (argparse adds ``argument --flag:``)
or the Python keyword, the bad value, and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from netloader.errors import ConfigError
from netloader.rules import Rule

#: The metadata key of a field's declaration.
SETTING = "netloader.setting"

T = TypeVar("T")


@dataclass(frozen=True)
class Setting:
    """One setting: what it means, how its value is checked, and its name on each surface.

    ``flag``/``key`` None: not on that surface, and ``no_flag``/``no_key`` says why (a test
    holds every option field to that). ``formerly``: old names still accepted (a flag starts
    with ``--``, a key is upper case, anything else is a Python keyword). ``cli_rule``: a
    stricter check on the command line, where the vLLM surface gives the value another meaning
    (``note`` says which). ``cli_help``: the flag's help where it reads differently (a
    ``--no-...`` flag). ``unset``: what a default of None means, for help.
    """

    help: str
    rule: Rule | None = None
    flag: str | None = None
    key: str | None = None
    no_flag: str = ""
    no_key: str = ""
    formerly: tuple[str, ...] = ()
    cli_rule: Rule | None = None
    cli_help: str = ""
    unset: str = ""
    note: str = ""

    def show(self, default: Any) -> str:
        """`` (default ...)`` for help, or nothing when there is nothing to say."""
        if default is None or default == {}:
            return f" (default: {self.unset})" if self.unset else ""
        if isinstance(default, bool):
            return f" (default {str(default).lower()})"
        return f" (default {self.rule.show(default) if self.rule else default})"


@dataclass(frozen=True)
class Group:
    """A field holding a nested option object, whose fields are settings in turn. ``skip``:
    nested fields that do not apply here, each with the reason."""

    skip: Mapping[str, str] = field(default_factory=dict)


def declared(default: Any, declaration: Setting | Group, **field_args: Any) -> Any:
    """A dataclass field with ``default`` that carries ``declaration``."""
    return field(default=default, metadata={SETTING: declaration}, **field_args)


def declaration(f: dataclasses.Field[Any]) -> Setting | Group:
    found = f.metadata.get(SETTING)
    if not isinstance(found, Setting | Group):
        raise TypeError(f"field {f.name!r} declares no Setting or Group (see netloader.settings)")
    return found


def check_fields(options: Any, suffix: str = "") -> None:
    """Check every declared field of ``options`` with its rule, keeping the converted value.
    Errors name the field as a Python keyword (``suffix``: ``"_timeout"`` for ``Timeouts``)."""
    for f in dataclasses.fields(options):
        setting = declaration(f)
        if isinstance(setting, Setting) and setting.rule is not None:
            value = getattr(options, f.name)
            kept = setting.rule.check(f.name + suffix, value)
            if kept is not value:
                object.__setattr__(options, f.name, kept)


@dataclass(frozen=True)
class Leaf:
    """A setting inside an option object: where it is, its declaration, its default there."""

    path: tuple[str, ...]
    setting: Setting
    default: Any

    @property
    def dest(self) -> str:
        return ".".join(self.path)


def leaves(options: Any, skip: Iterable[str] = ()) -> list[Leaf]:
    """Every setting of ``options`` (nested groups included), in field order. A field without a
    declaration is a TypeError: every setting must say where it can be set."""
    found: list[Leaf] = []
    for f in dataclasses.fields(options):
        if f.name in skip:
            continue
        setting, value = declaration(f), getattr(options, f.name)
        if isinstance(setting, Group):
            inner = leaves(value, setting.skip)
            found += [Leaf((f.name, *leaf.path), leaf.setting, leaf.default) for leaf in inner]
        else:
            found.append(Leaf((f.name,), setting, value))
    return found


def apply(options: T, values: Mapping[tuple[str, ...], Any]) -> T:
    """``options`` with the setting at each path replaced; each object rebuilt checks itself."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in values.items():
        if len(path) == 1:
            direct[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, inner in nested.items():
        direct[name] = apply(getattr(options, name), inner)
    return dataclasses.replace(options, **direct)  # type: ignore[type-var]


# The command line.


def add_flags(
    parser: argparse.ArgumentParser,
    options: Any,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    prefix: str = "",
) -> None:
    """A flag for every setting of ``options`` that has one (``only``/``skip``: by dest, such
    as ``"timeouts.idle"``), its help (after ``prefix``) showing ``options``' value as the
    default. A flag not given leaves no attribute, so ``from_flags`` applies only what was
    typed."""
    for leaf in leaves(options):
        setting = leaf.setting
        if setting.flag is None or leaf.dest in skip:
            continue
        if only is not None and leaf.dest not in only:
            continue
        add_flag(parser, leaf.dest, setting, leaf.default, prefix=prefix)


def add_flag(
    parser: argparse.ArgumentParser,
    dest: str,
    setting: Setting,
    default: Any,
    keep: Any = argparse.SUPPRESS,
    prefix: str = "",
) -> None:
    """``setting``'s flag (and its former names) on ``parser``, storing under ``dest``;
    ``keep``: the attribute's value when the flag is not given (none by default)."""
    assert setting.flag is not None
    names = [setting.flag, *(n for n in setting.formerly if n.startswith("--"))]
    text = (prefix + (setting.cli_help or setting.help)).replace("%", "%%")
    if isinstance(default, bool):
        action = "store_false" if default else "store_true"
        parser.add_argument(*names, dest=dest, action=action, default=keep, help=text)
        return
    rule = setting.cli_rule or setting.rule
    parser.add_argument(
        *names,
        dest=dest,
        default=keep,
        type=_flag_type(setting.flag, rule) if rule else str,
        metavar=(rule and rule.metavar) or dest.rsplit(".", 1)[-1].upper(),
        help=text + setting.show(default).replace("%", "%%"),
    )


def _flag_type(flag: str, rule: Rule) -> Callable[[str], Any]:
    keyword = flag.removeprefix("--").replace("-", "_")

    def parse(text: str) -> Any:
        try:
            return rule.check(keyword, rule.decode(flag, text))
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def from_flags(args: argparse.Namespace, options: T, *, skip: Iterable[str] = ()) -> T:
    """``options`` with the flags given on the command line applied."""
    given = vars(args)
    values = {
        leaf.path: given[leaf.dest]
        for leaf in leaves(options)
        if leaf.dest in given and leaf.dest not in skip
    }
    return apply(options, values)


# The vLLM keys.


def key_table(options: Any) -> dict[str, str]:
    """Each key of ``options`` (nested groups included, first declaration wins) -> its help,
    with the default."""
    table: dict[str, str] = {}
    for leaf in leaves(options):
        key = leaf.setting.key
        if key is not None and key not in table:
            table[key] = leaf.setting.help + leaf.setting.show(leaf.default)
    return table


def former_keys(options: Any) -> dict[str, str]:
    """Each old key name still accepted -> the key it now is."""
    return {
        old: leaf.setting.key
        for leaf in leaves(options)
        if leaf.setting.key is not None
        for old in leaf.setting.formerly
        if old.isupper()
    }


def from_keys(options: T, values: Mapping[str, Any]) -> T:
    """``options`` with the keys in ``values`` checked and applied (unknown keys are ignored
    here: the caller checks them against ``key_table``). A key applies to every setting that
    declares it (``IDLE_TIMEOUT``: the server's and the client's)."""
    values = _renamed(values, former_keys(options))
    checked: dict[tuple[str, ...], Any] = {}
    for leaf in leaves(options):
        key, rule = leaf.setting.key, leaf.setting.rule
        if key is None or values.get(key) is None:
            continue
        checked[leaf.path] = rule.check(key, values[key]) if rule else values[key]
    return apply(options, checked)


def _renamed(values: Mapping[str, Any], former: Mapping[str, str]) -> dict[str, Any]:
    out = dict(values)
    for old, new in former.items():
        if old in out:
            if new in out:
                raise ConfigError(f"give {new} or its old name {old}, not both")
            out[new] = out.pop(old)
    return out


def with_keywords(options: T, keywords: Mapping[str, Any]) -> T:
    """``options`` with flat keyword settings applied: a field's own name (or a former name its
    declaration keeps, ``discovery=``), a field of a nested object with a ``keyword_suffix`` as ``<name><suffix>``: a ``Timeouts`` field as ``<name>_timeout``
    (``idle_timeout``), or a field of a nested ``Limits``/``PullHooks``.

    This is how ``Server(..., max_clients=2)`` and ``pull(..., idle_timeout=5)`` keep working
    beside the option objects. An unknown name is a TypeError, as for any function.
    """
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    names = {f.name for f in dataclasses.fields(options)}  # type: ignore[arg-type]
    former = _former_keywords(options)
    for key, value in keywords.items():
        key = former.get(key, key)
        if key in names:
            direct[key] = value
            continue
        owner = _nested_owner(options, key)
        if owner is None:
            raise TypeError(f"unexpected keyword argument {key!r}")
        nested.setdefault(owner[0], {})[owner[1]] = value
    for name, values in nested.items():
        direct[name] = dataclasses.replace(direct.get(name, getattr(options, name)), **values)
    return dataclasses.replace(options, **direct)  # type: ignore[type-var]


def _former_keywords(options: Any) -> dict[str, str]:
    """Old keyword -> field, from the fields' declarations (``discovery`` -> ``placement``)."""
    return {
        old: f.name
        for f in dataclasses.fields(options)
        if isinstance(setting := f.metadata.get(SETTING), Setting)
        for old in setting.formerly
        if old.isidentifier() and not old.isupper()
    }


def _nested_owner(options: Any, key: str) -> tuple[str, str] | None:
    """(field of ``options``, field inside it) that the flat name ``key`` stands for."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if not dataclasses.is_dataclass(value):
            continue
        inner = {g.name for g in dataclasses.fields(value)}
        suffix = getattr(value, "keyword_suffix", "")
        if suffix and key.endswith(suffix):
            if key.removesuffix(suffix) in inner:
                return f.name, key.removesuffix(suffix)
        elif key in inner:
            return f.name, key
    return None
