"""A SQLite run store: one row per finished evaluation cell, no server.

Each :meth:`RunStore.put` writes one whole record in its own transaction and commits it, so a
process killed at any moment leaves every earlier cell intact and never a partial one (SQLite's
journal rolls an interrupted transaction back on the next open). Several processes may share a
store: writes wait up to ``timeout`` seconds for each other, and a worker takes a *lease* on a
cell before it evaluates it (:meth:`RunStore.claim`), so workers sharing a sweep never evaluate
a cell twice at once; the lease of a killed worker expires and another worker takes the cell
(:func:`precisim.eval.sweep.run_sweep`). Lease times are wall-clock seconds: workers on other
hosts must share the file system and a synchronised clock (SQLite over NFS is not reliable:
prefer one host, or a local disk per host and one store per sweep part).

    with RunStore("precisim-runs.sqlite") as store:
        if not store.has(key):
            store.put(key, {"model": "smollm2-135m", "recipe": "mxfp4", "ppl": 21.3},
                      sweep="fp4")
        store.export("runs.csv")          # nested dicts become dotted columns
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from precisim.formats.files import write_atomic

__all__ = ["DEFAULT_STORE", "EXPORT_FORMATS", "RunStore", "flatten", "write_atomic"]

#: file name of the run store when none is given
DEFAULT_STORE = "precisim-runs.sqlite"

#: formats accepted by :meth:`RunStore.export`, by file suffix
EXPORT_FORMATS = {".csv": "csv", ".json": "json"}

_META = ("key", "sweep", "created")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key     TEXT PRIMARY KEY,
    sweep   TEXT,
    created TEXT NOT NULL,
    record  TEXT NOT NULL
)
"""


#: leases on cells being evaluated (created when first needed; an old store gains it then)
_CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    key     TEXT PRIMARY KEY,
    owner   TEXT NOT NULL,
    expires REAL NOT NULL
)
"""


def _json_default(obj: Any) -> Any:
    """JSON encoding of numpy / torch scalars and arrays, dataclasses (e.g. an Interval),
    paths, sets."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _dumps(record: Mapping[str, Any], what: str) -> str:
    try:
        return json.dumps(record, default=_json_default, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list | tuple | Mapping):
        return json.dumps(v, default=_json_default)
    return v


class RunStore:
    """Finished evaluation records in a SQLite file, keyed by a cell key.

    Args:
        path: the SQLite file (created with its folder if missing); default
            :data:`DEFAULT_STORE` in the working directory.
        timeout: seconds a write waits for another process holding the file.
        readonly: open an existing store for reading only (``precisim report``): nothing is
            written to the file, not even the table.

    A SQLite file that holds other tables (another program's database) is refused with a
    ``ValueError`` and left unchanged, in either mode.
    """

    def __init__(self, path: str | Path = DEFAULT_STORE, *, timeout: float = 30.0,
                 readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if self.path.is_dir():
            raise ValueError(f"run store path {str(self.path)!r} is a folder; give a file name "
                             f"such as {str(self.path / DEFAULT_STORE)!r}")
        if readonly and not self.path.is_file():
            raise ValueError(f"run store {str(self.path)!r} does not exist")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        try:
            if readonly:  # never writes: not even a journal or the runs table
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
            else:
                # autocommit mode: every transaction below is explicit (BEGIN ... COMMIT)
                conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._conn = conn
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise ValueError(f"{str(self.path)!r} is not a precisim run store (SQLite): "
                             f"{exc}") from None
        except BaseException:
            self.close()
            raise

    def _check_schema(self) -> None:
        """Create the ``runs`` table in a new (empty) file; refuse a SQLite database that holds
        other tables, or a ``runs`` table of another shape (another program's database is
        never modified)."""
        conn = self.conn
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        if "runs" in tables:
            cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
            if cols != ["key", "sweep", "created", "record"]:
                raise ValueError(f"{str(self.path)!r} is not a precisim run store: its 'runs' "
                                 f"table has the columns {', '.join(cols)} (expected key, "
                                 "sweep, created, record); it is left unchanged")
            return
        if tables or self.readonly:
            what = f"the tables {', '.join(tables)}" if tables else "no tables"
            # (a store holds 'runs' and, once a lease was taken, 'claims')
            raise ValueError(f"{str(self.path)!r} is not a precisim run store: it is a SQLite "
                             f"database with {what} and no 'runs' table; it is left unchanged")
        conn.execute(_SCHEMA)
        conn.execute(_CLAIMS)

    # -- connection ---------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        """The open SQLite connection (ValueError once the store is closed)."""
        if self._conn is None:
            raise ValueError(f"the run store {str(self.path)!r} is closed")
        return self._conn

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # -- records ------------------------------------------------------------------------------
    @staticmethod
    def _check_key(key: object) -> str:
        if not isinstance(key, str) or not key:
            raise ValueError(f"key={key!r} is not valid: accepted a non-empty string")
        return key

    def has(self, key: str) -> bool:
        """True when a record is stored under ``key``."""
        self._check_key(key)
        return self.conn.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None

    __contains__ = has

    def _writable(self) -> None:
        if self.readonly:
            raise ValueError(f"the run store {str(self.path)!r} was opened read-only")

    def put(self, key: str, record: Mapping[str, Any], *, sweep: str | None = None) -> None:
        """Store one finished record under ``key`` (replacing an earlier one), atomically.

        Args:
            key: the cell key (see :attr:`precisim.eval.sweep.Cell.key`).
            record: a JSON-serialisable mapping (numpy/torch scalars are converted).
            sweep: the sweep it belongs to; default ``record["sweep"]`` when that is a string.

        The record is serialised before anything is written; the row is written and committed
        in one transaction, so the store never holds a partial record.
        """
        self._check_key(key)
        self._writable()
        if not isinstance(record, Mapping):
            raise ValueError(f"record for {key!r} must be a dict, got {type(record).__name__}")
        if sweep is None and isinstance(record.get("sweep"), str):
            sweep = record["sweep"]
        if sweep is not None and not isinstance(sweep, str):
            raise ValueError(f"sweep={sweep!r} is not valid: accepted a string or None")
        text = _dumps(record, f"record for {key!r}")
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR REPLACE INTO runs (key, sweep, created, record) "
                         "VALUES (?, ?, ?, ?)", (key, sweep, created, text))
            conn.execute(_CLAIMS)
            conn.execute("DELETE FROM claims WHERE key = ?", (key,))  # the lease ends with it
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        """The record stored under ``key``, or None."""
        self._check_key(key)
        row = self.conn.execute("SELECT record FROM runs WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def delete(self, key: str) -> bool:
        """Remove the record under ``key``; True if there was one."""
        self._check_key(key)
        self._writable()
        cur = self.conn.execute("DELETE FROM runs WHERE key = ?", (key,))
        return cur.rowcount > 0

    # -- leases -------------------------------------------------------------------------------
    @staticmethod
    def _check_lease(owner: object, lease: object) -> None:
        if not isinstance(owner, str) or not owner:
            raise ValueError(f"owner={owner!r} is not valid: accepted a non-empty string")
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not lease > 0:
            raise ValueError(f"lease={lease!r} is not valid: accepted a positive number of "
                             "seconds")

    def claim(self, key: str, owner: str, *, lease: float) -> bool:
        """Take the lease on ``key`` for ``owner`` for ``lease`` seconds, in one transaction:
        False when the key is stored already or another owner holds an unexpired lease on it;
        True otherwise (an expired lease of a killed worker is taken over; the owner's own
        lease is extended). :meth:`put` of the key ends its lease."""
        self._check_key(key)
        self._check_lease(owner, lease)
        self._writable()
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CLAIMS)
            now = time.time()
            stored = conn.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone()
            row = conn.execute("SELECT owner, expires FROM claims WHERE key = ?",
                               (key,)).fetchone()
            ok = stored is None and (row is None or row[0] == owner or row[1] <= now
                                     or _dead_local_worker(row[0]))
            if ok:
                conn.execute("INSERT OR REPLACE INTO claims (key, owner, expires) "
                             "VALUES (?, ?, ?)", (key, owner, now + lease))
            conn.execute("COMMIT")
            return ok
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def renew(self, key: str, owner: str, *, lease: float) -> bool:
        """Extend ``owner``'s lease on ``key`` to ``lease`` seconds from now; False when it holds
        none (it expired and another owner took the key, or the key was stored)."""
        self._check_key(key)
        self._check_lease(owner, lease)
        self._writable()
        cur = self.conn.execute("UPDATE claims SET expires = ? WHERE key = ? AND owner = ?",
                                (time.time() + lease, key, owner))
        return cur.rowcount > 0

    def release(self, key: str, owner: str) -> None:
        """End ``owner``'s lease on ``key`` (if it holds one) without storing a record."""
        self._check_key(key)
        self._writable()
        if self._has_claims():
            self.conn.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    def claims(self) -> dict[str, tuple[str, float]]:
        """The current leases: key -> (owner, seconds until it expires; negative: expired)."""
        if not self._has_claims():
            return {}
        now = time.time()
        return {k: (o, e - now) for k, o, e in
                self.conn.execute("SELECT key, owner, expires FROM claims ORDER BY key")}

    def _has_claims(self) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                 "name = 'claims'").fetchone() is not None

    def _rows(self, sweep: str | None) -> Iterator[tuple[str, str | None, str, str]]:
        if sweep is None:
            return self.conn.execute(
                "SELECT key, sweep, created, record FROM runs ORDER BY rowid")
        return self.conn.execute("SELECT key, sweep, created, record FROM runs WHERE sweep = ? "
                                 "ORDER BY rowid", (sweep,))

    def keys(self, sweep: str | None = None) -> list[str]:
        """Stored keys in insertion order (of one sweep, or all)."""
        return [k for k, *_ in self._rows(sweep)]

    def records(self, sweep: str | None = None, *, meta: bool = False) -> list[dict[str, Any]]:
        """Stored records in insertion order, of one sweep or all.

        ``meta=True`` adds ``_key``, ``_sweep`` and ``_created`` (ISO 8601 UTC) to each.
        """
        out = []
        for key, sw, created, text in self._rows(sweep):
            rec = json.loads(text)
            if meta:
                rec = {**rec, "_key": key, "_sweep": sw, "_created": created}
            out.append(rec)
        return out

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    # -- export -------------------------------------------------------------------------------
    def export(self, path: str | Path, fmt: str | None = None, *,
               sweep: str | None = None) -> Path:
        """Write the records (of one sweep, or all) to a CSV or JSON file; returns the path.

        ``fmt`` is ``"csv"`` or ``"json"``, by default from the suffix. CSV: one row per record
        with columns ``key, sweep, created`` and the record's fields, nested dicts flattened to
        dotted names (``params.window``), lists as JSON text; a record field named like a meta
        column is written as ``record.<name>``. JSON: a list of
        ``{"key", "sweep", "created", "record"}`` objects. The file is written atomically.
        """
        path = Path(path)
        if fmt is None:
            fmt = EXPORT_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise ValueError(f"cannot tell the export format of {str(path)!r} from its "
                                 f"suffix: accepted {', '.join(EXPORT_FORMATS)} (or pass fmt)")
        if fmt not in EXPORT_FORMATS.values():
            raise ValueError(f"fmt={fmt!r} is not valid: accepted "
                             f"{', '.join(sorted(set(EXPORT_FORMATS.values())))}")
        rows = [(k, s, c, json.loads(t)) for k, s, c, t in self._rows(sweep)]
        if fmt == "json":
            text = json.dumps([{"key": k, "sweep": s, "created": c, "record": r}
                               for k, s, c, r in rows], indent=2) + "\n"
            return write_atomic(path, text)
        flat_rows = []
        columns: dict[str, None] = dict.fromkeys(_META)
        for k, s, c, r in rows:
            flat = {f"record.{n}" if n in _META else n: v for n, v in flatten(r).items()}
            columns.update(dict.fromkeys(flat))
            flat_rows.append({"key": k, "sweep": s, "created": c, **flat})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in flat_rows:
            writer.writerow({n: _csv_cell(row.get(n)) for n in columns})
        return write_atomic(path, buf.getvalue())


def _dead_local_worker(owner: str) -> bool:
    """True for a default worker name ``host:pid`` (:func:`precisim.eval.sweep.run_sweep`) of
    this host whose process no longer exists: its lease is taken over at once (a killed sweep
    resumes without waiting for the lease to expire). Other names: False (wait for expiry)."""
    import socket

    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists (another user's process)
        return False
    return False
