"""A flywheel home's shared state in a database: SQLite in the home by default, PostgreSQL when
several machines serve one home. Model folders stay files; everything that processes must agree on
is here.

    db = HomeDB("sqlite:///pairs.db", home)                  # or postgresql://embed@db:5432/flywheel
    db.add([{"text1": "How do I learn Python?", "text2": "Best way to learn Python?", "label": 1}])
    # -> {"accepted": 1, "duplicates": 0, "conflicts": 0, "dropped_self_pairs": 0}

Four tables:
- `pairs`: what users send to `POST /v1/pairs`. A pair is stored once, by its key (its two texts
  normalised as everywhere else, `data.normalise`, in either order: a duplicate relation is
  symmetric), and a client's `id` names one pair: both are UNIQUE columns. A batch is one
  transaction, and `add` returns after it commits: an acknowledged pair survives `kill -9` of the
  server (and, on SQLite with synchronous=FULL, a power cut).
- `conflicts`: a post whose label contradicts the stored one, or whose id names another pair, kept
  (once, however often it is retried) for a person to settle, never trained on. The answer to a post
  is the same from every process, because it is decided inside the transaction against what is
  committed.
- `splits`: the ledger of `state/heldout.py`, each normalised text's split, decided once by a round.
- `state`: small JSON rows: `served` (the current version and the one before it, which every server
  polls), `base` (the base model's threshold), `migrated_through` (see `flywheel.py --migrate`).

Writers take turns (SQLite's write lock, `BEGIN IMMEDIATE`; on PostgreSQL a transaction-level
advisory lock): a batch reads the rows its pairs might meet, decides, and inserts, with no other
batch in between. Taking turns also makes `seq` (the arrival order) commit order, so "the pairs after
seq N" that a round reads never skips one that commits late. One round at a time: on PostgreSQL a
session-level advisory lock, held by the round's connection (a killed round's connection closes and
the lock goes with it); on SQLite, whose home is one machine, the home's file lock.

A PostgreSQL URL carries no password, in any form (user:password@, ?password=): libpq takes it from
PGPASSWORD (or ~/.pgpass), so a home's settings never hold one. A host other than this machine is
reached over TLS (sslmode=require) unless the URL names an sslmode itself. Every connection reads
committed data (READ COMMITTED, set here rather than left to the server's default: a stricter
default refused batches whose writers take turns anyway), and gives up on a lock after
LOCK_TIMEOUT_MS and on a statement after STATEMENT_TIMEOUT_MS: a writer that stalls while it holds
the writers' turn (a vanished client, a paused machine) makes the others answer 503 with
Retry-After within seconds, rather than wait for ever, and they recover as soon as it goes.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path

from embed_ft.errors import InputError, first_line
from embed_ft.state.file_lock import BusyError, FileLock
from embed_ft.state.pair_store import pair_key

ADD_LOCK = 0x656D6264    # the advisory lock id that PostgreSQL writers take turns on ("embd")
ROUND_LOCK = 0x726F756E  # ... and the one a round holds for its whole length ("roun")
SELECT_CHUNK = 500     # keys a SELECT ... IN (...) names at most (SQLite limits bound parameters)
LOCK_TIMEOUT_MS, STATEMENT_TIMEOUT_MS = 5_000, 60_000  # then a writer answers 503, a round fails in one line
LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")
EXPORT_FIELDS = ("text1", "text2", "label", "id", "source", "received")
CORRECTION_FIELDS = ("text1", "text2", "posted_label", "id", "label", "withdrawn", "by", "why", "received")

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    seq {serial},
    pair_key TEXT NOT NULL UNIQUE,
    text1 TEXT NOT NULL,
    text2 TEXT NOT NULL,
    label SMALLINT NOT NULL CHECK (label IN (0, 1)),
    client_id TEXT UNIQUE,
    source TEXT,
    received TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conflicts (
    seq {serial},
    post_key TEXT NOT NULL UNIQUE,
    stored_key TEXT NOT NULL REFERENCES pairs (pair_key),
    reason TEXT NOT NULL CHECK (reason IN ('label', 'id')),
    text1 TEXT NOT NULL,
    text2 TEXT NOT NULL,
    label SMALLINT NOT NULL,
    client_id TEXT,
    source TEXT,
    received TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS splits (
    seq {serial},
    text_key TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    split TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS corrections (
    seq {serial},
    pair_key TEXT NOT NULL REFERENCES pairs (pair_key),
    label SMALLINT CHECK (label IN (0, 1)),
    withdrawn SMALLINT NOT NULL CHECK (withdrawn IN (0, 1)),
    by_whom TEXT NOT NULL,
    why TEXT NOT NULL,
    received TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS corrections_of_pair ON corrections (pair_key, seq);
"""
# A pair's label as a person last corrected it, else as it was posted; and whether it was withdrawn.
CORRECTED = ("(SELECT c.{column} FROM corrections c WHERE c.pair_key = p.pair_key ORDER BY c.seq DESC LIMIT 1)")
LABEL = f"COALESCE({CORRECTED.format(column='label')}, p.label)"
WITHDRAWN = f"COALESCE({CORRECTED.format(column='withdrawn')}, 0)"
SERIAL = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}
COLUMNS = {"pairs": ("seq", "pair_key", "text1", "text2", "label", "client_id", "source", "received"),
           "conflicts": ("seq", "post_key", "stored_key", "reason", "text1", "text2", "label", "client_id", "source", "received"),
           "splits": ("seq", "text_key", "text", "split"), "state": ("name", "value"),
           "corrections": ("seq", "pair_key", "label", "withdrawn", "by_whom", "why", "received")}


class StoreUnavailable(Exception):
    """The database could not answer (a full disk, a server down or unreachable): nothing was committed."""


def key_digest(key: tuple[str, ...]) -> str:
    """What the UNIQUE column holds: a fixed-width digest (a B-tree index refuses very long texts)."""
    return hashlib.sha256("\t".join(key).encode()).hexdigest()


def check_url(url: str) -> str:
    """A database URL that a home may keep: sqlite:///PATH or postgresql://USER@HOST:PORT/DB, no password."""
    if url.startswith("sqlite:///"):
        return url
    if url.startswith(("postgresql://", "postgres://")):
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None or "password" in urllib.parse.parse_qs(parts.query):
            raise InputError("--database: give the password in PGPASSWORD (or ~/.pgpass), not in the URL: "
                             "the URL is kept in the home's settings")
        return url
    raise InputError(f"--database {url}: give sqlite:///PATH or postgresql://USER@HOST:PORT/DB")


def connection_url(url: str) -> str:
    """What a PostgreSQL pool connects to: the URL, with sslmode=require where the host is another
    machine and the URL names no sslmode (libpq's default, prefer, falls back to plain text)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    host = parts.hostname or query.get("host", [""])[0]
    if "sslmode" in query or host in LOCAL_HOSTS or host.startswith("/"):
        return url
    return url + ("&" if parts.query else "?") + "sslmode=require"


def configure(connection) -> None:
    """Every pooled connection reads committed data, whatever the server's default."""
    import psycopg
    connection.isolation_level = psycopg.IsolationLevel.READ_COMMITTED


class HomeDB:
    """The pairs, conflicts, ledger and state rows of one home. Thread-safe; shared by processes
    through the database."""

    def __init__(self, url: str, home: Path | None = None):
        """The database at `url` (a relative sqlite path is under `home`), its tables made if new."""
        self.url, self.home = check_url(url), home
        self.dialect = "sqlite" if self.url.startswith("sqlite:///") else "postgresql"
        if self.dialect == "sqlite":
            path = Path(self.url.removeprefix("sqlite:///"))
            path = home / path if home is not None and not path.is_absolute() else path
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path = path
            self.connection = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            self.connection.execute("PRAGMA journal_mode=WAL")   # readers never wait for the writer
            self.connection.execute("PRAGMA synchronous=FULL")  # a commit is on the disk when add returns
            self.lock = threading.Lock()                         # one connection: this process's threads take turns
        else:
            import psycopg  # only where a home uses PostgreSQL
            import psycopg_pool
            self.unavailable = (psycopg.OperationalError, psycopg_pool.PoolTimeout)  # what StoreUnavailable stands for
            timeouts = f"-c lock_timeout={LOCK_TIMEOUT_MS} -c statement_timeout={STATEMENT_TIMEOUT_MS}"
            self.pool = psycopg_pool.ConnectionPool(connection_url(self.url), min_size=1, max_size=4, open=False,
                                                    kwargs={"options": timeouts}, configure=configure,
                                                    check=psycopg_pool.ConnectionPool.check_connection)
            try:
                self.pool.open(wait=True, timeout=10)
            except psycopg_pool.PoolTimeout:
                self.pool.close()
                raise InputError(f"cannot reach the database {self.url} (is it up? PGPASSWORD set?)") from None
        with self.transaction(writing=True) as cursor:
            for statement in SCHEMA.format(serial=SERIAL[self.dialect]).split(";"):
                if statement.strip():
                    cursor.execute(statement)

    @contextlib.contextmanager
    def transaction(self, writing: bool = False):
        """A cursor inside one transaction, committed on a clean exit and rolled back on an exception.
        A writing one takes its turn with every other writer, in every process. A database that cannot
        answer (a full disk, a server down) raises StoreUnavailable, with nothing committed."""
        if self.dialect == "sqlite":
            with self.lock:
                cursor = self.connection.cursor()
                try:
                    cursor.execute("BEGIN IMMEDIATE" if writing else "BEGIN")
                    yield cursor
                    cursor.execute("COMMIT")
                except BaseException as e:
                    if self.connection.in_transaction:
                        cursor.execute("ROLLBACK")
                    if isinstance(e, sqlite3.OperationalError):
                        raise StoreUnavailable(f"{self.url}: {e}") from e
                    raise
        else:  # the pool commits a clean block and rolls back a failed one; a dropped connection is replaced
            try:
                with self.pool.connection() as connection, connection.cursor() as cursor:
                    if writing:
                        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (ADD_LOCK,))
                    yield cursor
            except self.unavailable as e:
                raise StoreUnavailable(f"{self.url}: {first_line(e)}") from e

    def sql(self, statement: str) -> str:
        """Our statements use SQLite's ? placeholders; psycopg's are %s."""
        return statement.replace("?", "%s") if self.dialect == "postgresql" else statement

    # ------------------------------------------------------------------------------- the writes

    def add(self, pairs: list[dict], received: str | None = None) -> dict:
        """Store a batch (already validated: text1, text2, label 0/1, optional id and source) in one
        transaction, and return, after it commits, how many were accepted, duplicates, conflicts and
        pairs of a text with itself (dropped, as train.py drops them), and how many the store holds."""
        received = received or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        keyed = [(pair_key(p["text1"], p["text2"]), p) for p in pairs]
        keep = [(key_digest(texts), texts, p) for texts, p in keyed if texts[0] != texts[1]]
        counts = {"accepted": 0, "duplicates": 0, "conflicts": 0, "dropped_self_pairs": len(keyed) - len(keep)}
        with self.transaction(writing=True) as cursor:
            by_key = self.rows(cursor, "pair_key", [k for k, _, _ in keep])
            by_id = self.rows(cursor, "client_id", sorted({str(p["id"]) for *_, p in keep if p.get("id") is not None}))
            fresh, conflicts = [], []
            for key, texts, pair in keep:
                pair_id = None if pair.get("id") is None else str(pair["id"])
                named, known = by_id.get(pair_id), by_key.get(key)
                if named is not None and named[0] != key:  # one id, two pairs: a question for a person
                    conflicts.append(conflict_row(pair, texts, pair_id, named[0], "id", received))
                elif known is not None and known[1] != pair["label"]:
                    conflicts.append(conflict_row(pair, texts, pair_id, key, "label", received))
                elif known is not None:
                    counts["duplicates"] += 1
                else:
                    row = (key, pair["text1"], pair["text2"], pair["label"], pair_id, pair.get("source"), received)
                    fresh.append(row)
                    by_key[key] = (key, pair["label"], pair_id)
                    if pair_id is not None:
                        by_id[pair_id] = by_key[key]
            cursor.executemany(self.sql("INSERT INTO pairs (pair_key, text1, text2, label, client_id, source, received) "
                                        "VALUES (?, ?, ?, ?, ?, ?, ?)"), fresh) if fresh else None
            cursor.executemany(self.sql("INSERT INTO conflicts (post_key, stored_key, reason, text1, text2, label, "
                                        "client_id, source, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                                        "ON CONFLICT (post_key) DO NOTHING"), conflicts) if conflicts else None
            counts["stored"] = self.count_stored(cursor, len(fresh))
        counts["accepted"], counts["conflicts"] = len(fresh), len(conflicts)
        return counts

    def count_stored(self, cursor, added: int) -> int:
        """The pairs stored, kept in a state row that writers update in their turn: count(*) reads the
        whole table, a cost every acknowledged batch would pay more of as the home grows. Counted once
        where the row is missing (a database made before it)."""
        stored = self.read_state(cursor, "pairs_stored")
        if stored is None:
            cursor.execute("SELECT count(*) FROM pairs")  # this batch's rows included
            stored = cursor.fetchone()[0]
        else:
            stored += added
        self.write_state(cursor, "pairs_stored", stored)
        return stored

    def rows(self, cursor, column: str, values: list[str]) -> dict[str, tuple]:
        """The stored (pair_key, label as last corrected, client_id) whose `column` is one of `values`,
        by that value."""
        found = {}
        for start in range(0, len(values), SELECT_CHUNK):
            chunk = values[start:start + SELECT_CHUNK]
            cursor.execute(self.sql(f"SELECT pair_key, {LABEL}, client_id FROM pairs p WHERE {column} IN "
                                    f"({', '.join('?' * len(chunk))})"), chunk)
            for row in cursor.fetchall():
                found[row[0] if column == "pair_key" else row[2]] = tuple(row)
        return found

    # -------------------------------------------------------------------------------- the reads

    def pairs(self, after: int = 0) -> list[dict]:
        """Every stored pair after seq `after` that no one withdrew, in arrival order, its label as last
        corrected: {seq, text1, text2, label, id, source, received}."""
        with self.transaction() as cursor:
            cursor.execute(self.sql(f"SELECT seq, text1, text2, {LABEL}, client_id, source, received FROM pairs p "
                                    f"WHERE seq > ? AND {WITHDRAWN} = 0 ORDER BY seq"), (after,))
            return [dict(zip(("seq", "text1", "text2", "label", "id", "source", "received"), r)) for r in cursor.fetchall()]

    def correct(self, corrections: list[dict], received: str | None = None) -> int:
        """Correct stored pairs' labels, or withdraw pairs, as a person decided: each {text1, text2 or
        id, label (0, 1, or None to withdraw), by, why}, kept with who, when and why (a later
        correction of the same pair wins; none is ever deleted). The pair keeps its seq and its
        texts their splits. Returns how many were kept; a pair that is not stored is an InputError."""
        received = received or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self.transaction(writing=True) as cursor:
            rows = []
            for c in corrections:
                column, value = (("client_id", str(c["id"])) if c.get("id") is not None else
                                 ("pair_key", key_digest(pair_key(c["text1"], c["text2"]))))
                found = self.rows(cursor, column, [value]).get(value)
                if found is None:
                    named = f"id {c['id']!r}" if c.get("id") is not None else f"{c['text1']!r} / {c['text2']!r}"
                    raise InputError(f"no stored pair is {named}: nothing to correct")
                withdrawn = c.get("label") is None
                rows.append((found[0], None if withdrawn else int(c["label"]), int(withdrawn), c["by"], c["why"], received))
            cursor.executemany(self.sql("INSERT INTO corrections (pair_key, label, withdrawn, by_whom, why, received) "
                                        "VALUES (?, ?, ?, ?, ?, ?)"), rows)
        return len(rows)

    def corrections(self) -> list[dict]:
        """Every correction, oldest first, with the pair's texts and the label it was posted with."""
        with self.transaction() as cursor:
            cursor.execute("SELECT p.text1, p.text2, p.label, p.client_id, c.label, c.withdrawn, c.by_whom, c.why, "
                           "c.received FROM corrections c JOIN pairs p ON p.pair_key = c.pair_key ORDER BY c.seq")
            return [dict(zip(CORRECTION_FIELDS, r)) for r in cursor.fetchall()]

    def count(self, after: int = 0) -> int:
        """Pairs stored after seq `after` (all of them by default)."""
        with self.transaction() as cursor:
            cursor.execute(self.sql("SELECT count(*) FROM pairs WHERE seq > ?"), (after,))
            return cursor.fetchone()[0]

    def last_seq(self) -> int:
        with self.transaction() as cursor:
            cursor.execute("SELECT coalesce(max(seq), 0) FROM pairs")
            return cursor.fetchone()[0]

    def conflict_count(self) -> int:
        with self.transaction() as cursor:
            cursor.execute("SELECT count(*) FROM conflicts")
            return cursor.fetchone()[0]

    def conflicts(self) -> list[dict]:
        """Each contradiction beside the stored pair it contradicts, oldest first, and how a person
        settled it (the stored pair's label now, withdrawn, `settled_by` None while no one has)."""
        with self.transaction() as cursor:
            cursor.execute(f"SELECT c.reason, c.text1, c.text2, c.label, c.client_id, c.source, c.received, "
                           f"p.text1, p.text2, p.label, p.client_id, p.received, {LABEL}, {WITHDRAWN}, "
                           f"{CORRECTED.format(column='by_whom')} "
                           f"FROM conflicts c JOIN pairs p ON p.pair_key = c.stored_key ORDER BY c.seq")
            names = ("reason", "text1", "text2", "label", "id", "source", "received", "stored_text1", "stored_text2",
                     "stored_label", "stored_id", "stored_received", "label_now", "withdrawn", "settled_by")
            return [dict(zip(names, r)) for r in cursor.fetchall()]

    def export(self, folder: Path) -> dict[str, int]:
        """folder/pairs.tsv (every stored pair once, as corrected, none withdrawn) and folder/conflicts.tsv,
        as pair files that `train.py --data` reads (text1, text2, label, then id, source, received), and
        folder/corrections.tsv (who corrected what, when and why)."""
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        with open(folder / "corrections.tsv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            corrections = self.corrections()
            writer.writerow(CORRECTION_FIELDS)
            writer.writerows([["" if v is None else v for v in c.values()] for c in corrections])
        written["corrections"] = len(corrections)
        for name, rows in (("pairs", self.pairs()), ("conflicts", self.conflicts())):
            with open(folder / f"{name}.tsv", "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, delimiter="\t", lineterminator="\n")
                writer.writerow(EXPORT_FIELDS + (("reason", "stored_label", "stored_id") if name == "conflicts" else ()))
                for row in rows:
                    extra = (row["reason"], row["stored_label"], row["stored_id"]) if name == "conflicts" else ()
                    writer.writerow([row[k] if row[k] is not None else "" for k in EXPORT_FIELDS] + list(extra))
            written[name] = len(rows)
        return written

    # ------------------------------------------------------------------------ the ledger, the state

    def splits_after(self, after: int = 0) -> tuple[list[tuple[str, str]], int]:
        """The ledger's (text, split) rows after seq `after`, in the order they were decided, and the
        last seq read (a reader asks again from there)."""
        with self.transaction() as cursor:
            cursor.execute(self.sql("SELECT seq, text, split FROM splits WHERE seq > ? ORDER BY seq"), (after,))
            rows = cursor.fetchall()
        return [(text, split) for _, text, split in rows], (rows[-1][0] if rows else after)

    def add_splits(self, rows: list[tuple[str, str]]) -> None:
        """Keep the splits of newly decided texts; a text decided before keeps its first split."""
        with self.transaction(writing=True) as cursor:
            cursor.executemany(self.sql("INSERT INTO splits (text_key, text, split) VALUES (?, ?, ?) "
                                        "ON CONFLICT (text_key) DO NOTHING"),
                               [(key_digest((text,)), text, split) for text, split in rows])

    def state(self, name: str) -> dict | None:
        """A state row's JSON value, None where it was never set."""
        with self.transaction() as cursor:
            return self.read_state(cursor, name)

    def read_state(self, cursor, name: str):
        cursor.execute(self.sql("SELECT value FROM state WHERE name = ?"), (name,))
        row = cursor.fetchone()
        return json.loads(row[0]) if row else None

    def set_state(self, name: str, value) -> None:
        with self.transaction(writing=True) as cursor:
            self.write_state(cursor, name, value)

    def write_state(self, cursor, name: str, value) -> None:
        cursor.execute(self.sql("INSERT INTO state (name, value) VALUES (?, ?) "
                                "ON CONFLICT (name) DO UPDATE SET value = excluded.value"), (name, json.dumps(value)))

    def take_round_number(self, at_least: int) -> int:
        """A round number no round has taken, at least `at_least`, taken in the writers' turn."""
        with self.transaction(writing=True) as cursor:
            number = max(at_least, (self.read_state(cursor, "round_taken") or 0) + 1)
            self.write_state(cursor, "round_taken", number)
        return number

    @contextlib.contextmanager
    def round_lock(self, wait: bool = False):
        """One round at a time for the home, across processes and, on PostgreSQL, machines."""
        if self.dialect == "sqlite":
            with FileLock(self.path.with_name("round.lock"), wait=wait):
                yield
            return
        with self.pool.connection() as connection:
            connection.autocommit = True  # a session lock, not a transaction left open for hours
            if wait:  # a round that waits its turn waits as long as the round before takes
                for setting in ("lock_timeout", "statement_timeout"):
                    connection.execute(f"SET {setting} = 0")
                connection.execute("SELECT pg_advisory_lock(%s)", (ROUND_LOCK,))
                for setting in ("lock_timeout", "statement_timeout"):
                    connection.execute(f"RESET {setting}")
            elif not connection.execute("SELECT pg_try_advisory_lock(%s)", (ROUND_LOCK,)).fetchone()[0]:
                raise BusyError("a round of this home is running (it holds the database's round lock): one at a time; "
                                "try again when it is done, or pass --wait")
            try:
                yield
            finally:
                try:
                    connection.execute("SELECT pg_advisory_unlock(%s)", (ROUND_LOCK,))
                    connection.autocommit = False
                except self.unavailable:  # the connection is gone, and the session's lock with it:
                    pass                   # what the round did stands, and it says so itself

    def copy_into(self, other: "HomeDB") -> dict[str, int]:
        """Every row of every table into `other`, which must hold none, each `seq` kept (a home's
        history names the pairs its rounds read by seq): one transaction on each side, so a copy
        that fails leaves `other` empty. Returns the rows copied, by table."""
        with self.transaction() as source, other.transaction(writing=True) as target:
            target.execute("SELECT (SELECT count(*) FROM pairs) + (SELECT count(*) FROM splits) + (SELECT count(*) FROM state)")
            if target.fetchone()[0]:
                raise InputError(f"{other.url} holds a home's rows already: give an empty database")
            counts = {}
            for table, columns in COLUMNS.items():
                source.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}")
                rows = source.fetchall()
                keep_seq = " OVERRIDING SYSTEM VALUE" if other.dialect == "postgresql" and columns[0] == "seq" else ""
                target.executemany(other.sql(f"INSERT INTO {table} ({', '.join(columns)}){keep_seq} "
                                             f"VALUES ({', '.join('?' * len(columns))})"), rows)
                if keep_seq and rows:  # new rows number on from the copied ones
                    target.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'), {rows[-1][0]})")
                counts[table] = len(rows)
            return counts

    def close(self) -> None:
        (self.connection if self.dialect == "sqlite" else self.pool).close()


def conflict_row(pair: dict, texts: tuple[str, str], pair_id: str | None, stored_key: str, reason: str,
                 received: str) -> tuple:
    """A conflicts row; its post_key is the same for the same post, so a retried one is kept once."""
    post_key = key_digest((stored_key, reason, *texts, str(pair["label"]), pair_id or ""))
    return (post_key, stored_key, reason, pair["text1"], pair["text2"], pair["label"], pair_id, pair.get("source"), received)
