"""One lookup mechanism for every named thing in precisim (docs/naming.md).

Formats, scaled formats, matrix units, kernels, recipes, metrics and op kinds are each kept in
a :class:`Registry`: a name space with one written grammar and one error style.

Grammar of a name (docs/naming.md):

* a name is ASCII letters, digits, ``_``, ``-`` and ``.``; lookups ignore case and treat ``-``
  and ``_`` as the same character (``deepseek-fp8`` = ``DeepSeek_FP8``), so two entries of one
  registry may not differ only in those;
* a registry may also accept a *family* of parametric names (``e5m7``, ``binary8p3se``), each a
  regular expression with a builder;
* a name may be *qualified* with its kind, ``kind:name`` (``format:mxint8``,
  ``scaled:mxint8``, ``unit:deepseek-fp8``, ``recipe:deepseek-fp8``): that is how a name that
  several kinds use is meant unambiguously (:func:`lookup` across every registry needs it).

Every miss raises the registry's :class:`UnknownNameError` subclass with the message
``unknown <kind> '<name>'; did you mean '<a>', '<b>'?; available: <names>``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["NAME_RE", "Registry", "UnknownNameError", "lookup", "normalize", "registries"]

#: the characters a registered name may use
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def normalize(name: str) -> str:
    """The key a name is looked up by: stripped, lower case, ``-`` read as ``_``."""
    return name.strip().lower().replace("-", "_")


class UnknownNameError(KeyError, ValueError):
    """A name that is not in a registry (a ``KeyError`` and a ``ValueError``); the message
    names it, the closest names and every available name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class _Family(Generic[T]):
    pattern: re.Pattern[str]
    build: Callable[[re.Match[str]], T]
    example: str


_ALL: dict[str, Registry[Any]] = {}


class Registry(Generic[T]):
    """Named entries of one kind (see the module docstring).

    ``kind``: what the entries are, as the error message says it (``"format"``, ``"matrix
    unit"``); ``prefix``: the qualifier ``prefix:name`` selects this registry (default: the
    kind's first word); ``error``: the :class:`UnknownNameError` subclass raised on a miss;
    ``materialize``: for registries whose entries are builders, what turns an entry into the
    named object (used by :func:`lookup`).
    """

    def __init__(self, kind: str, *, prefix: str | None = None,
                 error: type[UnknownNameError] = UnknownNameError,
                 hint: str = "", materialize: Callable[[Any], Any] | None = None) -> None:
        self.kind = kind
        self.materialize = materialize  # entry -> the named object (entries that are builders)
        self.prefix = normalize(prefix or kind.split()[0])
        self.error = error
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._names: dict[str, str] = {}  # key -> canonical spelling
        self._aliases: dict[str, str] = {}  # alias key -> canonical key
        self._families: list[_Family[T]] = []
        if self.prefix in _ALL:
            raise ValueError(f"a registry with prefix {self.prefix!r} exists already")
        _ALL[self.prefix] = self

    # -- registration --------------------------------------------------------------------
    def register(self, name: str, entry: T, *, aliases: tuple[str, ...] = (),
                 replace: bool = False) -> T:
        """Add ``entry`` under ``name`` (and ``aliases``); a taken name raises ``ValueError``
        unless ``replace``. Returns the entry."""
        for n in (name, *aliases):
            if not isinstance(n, str) or not NAME_RE.match(n):
                raise ValueError(f"{self.kind} name {n!r} is not valid: use letters, digits, "
                                 "'_', '-' and '.' (docs/naming.md)")
        key = normalize(name)
        if not replace:
            for n in (name, *aliases):
                k = normalize(n)
                if k in self._entries or k in self._aliases:
                    raise ValueError(f"{self.kind} {n!r} is registered already (pass "
                                     "replace=True to replace it)")
        self._entries[key] = entry
        self._names[key] = name
        for a in aliases:
            self._aliases[normalize(a)] = key
        return entry

    def register_family(self, pattern: str, build: Callable[[re.Match[str]], T],
                        example: str) -> None:
        """Accept every name that fully matches ``pattern`` (after :func:`normalize`), built
        by ``build(match)``; ``example`` is shown in error messages."""
        self._families.append(_Family(re.compile(pattern), build, example))

    def unregister(self, name: str) -> None:
        """Remove an entry and its aliases (tests and plug-ins that clean up)."""
        key = self._key(name)
        if key is None:
            raise self._unknown(name)
        del self._entries[key]
        del self._names[key]
        for a in [a for a, k in self._aliases.items() if k == key]:
            del self._aliases[a]

    # -- lookup --------------------------------------------------------------------------
    def _strip(self, name: str) -> str:
        kind, sep, rest = name.partition(":")
        if not sep:
            return name
        if normalize(kind) == normalize(self.prefix):
            return rest
        other = _ALL.get(normalize(kind))
        what = f"a {other.kind}" if other is not None else f"of kind {kind!r}"
        raise self.error(f"{name!r} names {what}, not a {self.kind}; write "
                         f"'{self.prefix}:<name>' or a bare name")

    def _key(self, name: str) -> str | None:
        key = normalize(name)
        if key in self._entries:
            return key
        return self._aliases.get(key)

    def get(self, name: str) -> T:
        """The entry named ``name`` (also ``prefix:name``, an alias, or a family member)."""
        if not isinstance(name, str):
            raise TypeError(f"a {self.kind} name must be a string, got {type(name).__name__}")
        bare = self._strip(name)
        key = self._key(bare)
        if key is not None:
            return self._entries[key]
        norm = normalize(bare)
        for fam in self._families:
            m = fam.pattern.fullmatch(norm)
            if m:
                return fam.build(m)
        raise self._unknown(bare)

    def find(self, name: str) -> T | None:
        """:meth:`get`, or None when the name is unknown (other errors still raise)."""
        try:
            return self.get(name)
        except self.error:
            return None

    def _unknown(self, name: str) -> UnknownNameError:
        return self.error(unknown_message(self.kind, name, self.names(), self._all_keys(),
                                          self.hint, [f.example for f in self._families]))

    def _all_keys(self) -> list[str]:
        return list(self._names.values()) + [a for a in self._aliases]

    # -- listing -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The canonical names, in registration order."""
        return list(self._names.values())

    def items(self) -> list[tuple[str, T]]:
        return [(self._names[k], v) for k, v in self._entries.items()]

    def canonical(self, name: str) -> str:
        """The canonical spelling of a registered name or alias."""
        key = self._key(self._strip(name))
        if key is None:
            raise self._unknown(name)
        return self._names[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<Registry of {len(self)} {self.kind}s>"


def unknown_message(kind: str, name: str, available: list[str], candidates: list[str] | None
                    = None, hint: str = "", families: list[str] | None = None) -> str:
    """The one error message of an unknown name: ``unknown <kind> '<name>'; did you mean
    ...?; available: ...`` (plus the accepted families and a hint)."""
    pool = candidates if candidates is not None else available
    close = difflib.get_close_matches(normalize(name), [normalize(c) for c in pool], n=3,
                                      cutoff=0.5)
    spelled = {normalize(c): c for c in pool}
    msg = f"unknown {kind} {name!r}"
    if close:
        msg += "; did you mean " + ", ".join(repr(spelled[c]) for c in close) + "?"
    msg += "; available: " + ", ".join(available)
    if families:
        msg += "; also any name like " + ", ".join(families)
    if hint:
        msg += f"; {hint}"
    return msg


def registries() -> dict[str, Registry[Any]]:
    """Every registry by its prefix (``format``, ``scaled``, ``unit``, ``recipe``...)."""
    return dict(_ALL)


def _get(reg: Registry[Any], name: str) -> Any:
    entry = reg.get(name)
    return entry if reg.materialize is None else reg.materialize(entry)


def lookup(name: str) -> Any:
    """Resolve ``kind:name`` in the registry of that kind, or a bare name in whichever registry
    holds it; a bare name that several kinds hold raises, naming the qualified spellings. Only
    registries whose modules are imported take part (:func:`precisim.lookup` imports them all).
    """
    kind, sep, _ = name.partition(":")
    if sep:
        reg = _ALL.get(normalize(kind))
        if reg is None:
            raise UnknownNameError(unknown_message("kind", kind, sorted(_ALL)))
        return _get(reg, name)
    hits = [(p, r) for p, r in _ALL.items() if r.find(name) is not None]
    if len(hits) == 1:
        return _get(hits[0][1], name)
    if not hits:
        every = sorted({n for r in _ALL.values() for n in r.names()})
        raise UnknownNameError(unknown_message("name", name, every))
    raise UnknownNameError(f"{name!r} is ambiguous: it names a "
                           + " and a ".join(r.kind for _, r in hits) + "; write "
                           + " or ".join(f"'{p}:{name}'" for p, _ in hits))
