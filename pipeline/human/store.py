"""A study's durable state: one SQLite file in WAL mode (samples, items, annotators, assignments, votes).

Why SQLite: a vote must survive a server killed with SIGKILL the instant after it was acknowledged, and twenty
annotators post at once. WAL with ``synchronous=FULL`` makes a committed transaction durable before
:meth:`StudyStore.record_vote` returns, and the vote's primary key ``(annotator, item)`` makes a second vote on
the same item impossible rather than merely unlikely. Every connection is short-lived and per call, so any
number of server threads (or a second process, such as ``report`` while the server runs) can use one file.

What the browser may see is decided here too: items and images are addressed by random keys, and which of
the two systems (``A`` / ``B``) produced a sample never leaves this module except through the admin-only
:meth:`StudyStore.votes` and :meth:`StudyStore.samples` readers.

Tokens are never stored, only their SHA-256: a copy of the database does not grant access to the study.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

SCHEMA_VERSION = 1

# a study folder (study.py writes it; the server and the report need only this module)
DB_FILE = "study.sqlite"
CONFIG_FILE = "study.json"
LINKS_FILE = "links.md"
ADMIN_FILE = "admin_token.txt"

SIDES = ("left", "right", "tie", "skip")  # what the browser sends
CHOICES = ("A", "B", "tie", "skip")  # what is stored: the system the annotator preferred

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE samples (
    sample_id INTEGER PRIMARY KEY,
    system TEXT NOT NULL CHECK (system IN ('A', 'B')),
    image_key TEXT NOT NULL UNIQUE,
    png BLOB NOT NULL,
    latent BLOB,                 -- float32 bytes, C order; NULL when the source had no latents
    latent_shape TEXT,           -- JSON list
    seed INTEGER,
    reward REAL                  -- the automatic reward of this sample, when the study's source had one
);
CREATE TABLE items (
    item_id INTEGER PRIMARY KEY,
    item_key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    sample_a INTEGER NOT NULL REFERENCES samples (sample_id),
    sample_b INTEGER NOT NULL REFERENCES samples (sample_id)
);
CREATE TABLE annotators (
    annotator_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    group_index INTEGER NOT NULL,
    token_hash TEXT UNIQUE,      -- NULL for annotators imported from another tool (no link)
    source TEXT NOT NULL DEFAULT 'app'
);
CREATE TABLE assignments (
    annotator_id INTEGER NOT NULL REFERENCES annotators (annotator_id),
    position INTEGER NOT NULL,
    item_id INTEGER NOT NULL REFERENCES items (item_id),
    a_on_left INTEGER NOT NULL CHECK (a_on_left IN (0, 1)),
    PRIMARY KEY (annotator_id, position),
    UNIQUE (annotator_id, item_id)
);
CREATE TABLE votes (
    annotator_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')),
    side TEXT NOT NULL CHECK (side IN ('left', 'right', 'tie', 'skip')),
    created_at REAL NOT NULL,
    PRIMARY KEY (annotator_id, item_id),
    FOREIGN KEY (annotator_id, item_id) REFERENCES assignments (annotator_id, item_id)
);
"""


class StudyError(ValueError):
    """A request or input the study cannot accept; ``status`` is the HTTP status the server answers with."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class NotFound(StudyError):
    status = 404


class AlreadyVoted(StudyError):
    status = 409


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key() -> str:
    """A random, unguessable identifier for URLs (items, images, tokens)."""
    return secrets.token_urlsafe(18)


@dataclass(frozen=True)
class Annotator:
    annotator_id: int
    name: str
    group_index: int


@dataclass
class SampleRecord:
    """One image of the study before it is stored."""

    system: str  # "A" or "B"
    png: bytes
    latent: np.ndarray | None = None
    seed: int | None = None
    reward: float | None = None


@dataclass
class ItemRecord:
    """One comparison: the same prompt (and, for model studies, the same seed) from both systems."""

    prompt: str
    prompt_index: int
    a: SampleRecord
    b: SampleRecord


@dataclass
class AnnotatorRecord:
    name: str
    group_index: int
    token: str | None  # None: imported, no link
    order: Sequence[int]  # item indices in the order this annotator sees them
    a_on_left: Sequence[bool]  # per position in ``order``
    source: str = "app"


class StudyStore:
    """Read and write one study database (``study.sqlite``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"study database {self.path} does not exist; create one with "
                                    f"`python jobs/human_study.py create --out {self.path.parent}`")
        with self._read() as con:  # closes the connection (sqlite3's own context manager only commits)
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"meta", "items", "votes"} <= tables:
                raise StudyError(f"{self.path} is not a study database (tables found: {sorted(tables)})")
            version = self._meta(con, "schema_version")
            if version != SCHEMA_VERSION:
                raise StudyError(f"{self.path}: study schema version {version}; this reader supports {SCHEMA_VERSION}")

    # ------------------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | Path, *, meta: dict, items: Sequence[ItemRecord], annotators: Sequence[AnnotatorRecord],
               admin_token: str) -> "StudyStore":
        """Write a new study atomically: a temporary file, fsynced, renamed into place. An existing file is
        never replaced (a study holds people's work)."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} already exists; a study database is never overwritten "
                                  f"(it may hold votes): choose another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            con = sqlite3.connect(tmp)
            with con:
                con.executescript(_SCHEMA)
                rows = {"schema_version": SCHEMA_VERSION, "created_at": time.time(), "study": meta,
                        "admin_token_hash": hash_token(admin_token)}
                con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rows.items()])
                for i, item in enumerate(items):
                    ids = [cls._insert_sample(con, s) for s in (item.a, item.b)]
                    con.execute("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                                (i + 1, new_key(), item.prompt, item.prompt_index, *ids))
                for a in annotators:
                    cls._insert_annotator(con, a, len(items))
            con.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(path)  # its first connection switches the file to WAL, persistently

    @staticmethod
    def _insert_sample(con: sqlite3.Connection, s: SampleRecord) -> int:
        if s.system not in ("A", "B"):
            raise StudyError(f"sample system {s.system!r}: expected 'A' or 'B'")
        latent = None if s.latent is None else np.ascontiguousarray(s.latent, dtype=np.float32)
        cur = con.execute(
            "INSERT INTO samples (system, image_key, png, latent, latent_shape, seed, reward) VALUES (?,?,?,?,?,?,?)",
            (s.system, new_key(), s.png, None if latent is None else latent.tobytes(),
             None if latent is None else json.dumps(list(latent.shape)),
             None if s.seed is None else int(s.seed), None if s.reward is None else float(s.reward)))
        return int(cur.lastrowid)

    @staticmethod
    def _insert_annotator(con: sqlite3.Connection, a: AnnotatorRecord, num_items: int) -> int:
        if sorted(a.order) != list(range(num_items)) or len(a.a_on_left) != num_items:
            raise StudyError(f"annotator {a.name!r}: an order must list every one of the {num_items} items once")
        cur = con.execute("INSERT INTO annotators (name, group_index, token_hash, source) VALUES (?, ?, ?, ?)",
                          (a.name, int(a.group_index), None if a.token is None else hash_token(a.token), a.source))
        aid = int(cur.lastrowid)
        con.executemany("INSERT INTO assignments VALUES (?, ?, ?, ?)",
                        [(aid, pos, int(i) + 1, int(bool(left))) for pos, (i, left) in enumerate(zip(a.order, a.a_on_left))])
        return aid

    def add_annotators(self, annotators: Iterable[AnnotatorRecord],
                       votes: dict[str, Sequence[tuple[str, str]]] | None = None) -> int:
        """Add annotators (imported from another tool, or late joiners) and, optionally, their votes
        ``{name: [(item_key, choice), …]}``, in one transaction: all or nothing. Returns the votes stored."""
        n_votes = 0
        with self._transaction() as con:
            n = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            for a in annotators:
                if con.execute("SELECT 1 FROM annotators WHERE name = ?", (a.name,)).fetchone():
                    raise StudyError(f"annotator name {a.name!r} already exists in {self.path}")
                aid = self._insert_annotator(con, a, n)
                n_votes += self._insert_votes(con, aid, a.name, (votes or {}).get(a.name, ()))
        return n_votes

    # ------------------------------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("PRAGMA busy_timeout=30000")
        return con

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: writers queue on SQLite's lock instead of failing mid-transaction."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @staticmethod
    def _meta(con: sqlite3.Connection, key: str):
        row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def meta(self, key: str = "study"):
        with self._read() as con:
            return self._meta(con, key)

    def check_admin(self, token: str | None) -> bool:
        expected = self.meta("admin_token_hash")
        return bool(token) and secrets.compare_digest(hash_token(token), expected)

    # ------------------------------------------------------------------------------------------ annotator side
    def annotator(self, token: str) -> Annotator:
        with self._read() as con:
            row = con.execute("SELECT annotator_id, name, group_index FROM annotators WHERE token_hash = ?",
                              (hash_token(token),)).fetchone()
        if row is None:
            raise NotFound("unknown annotator link: check the link you were given")
        return Annotator(*row)

    def progress(self, annotator: Annotator, con: sqlite3.Connection | None = None) -> dict:
        def count(c):
            total = c.execute("SELECT COUNT(*) FROM assignments WHERE annotator_id = ?",
                              (annotator.annotator_id,)).fetchone()[0]
            done = c.execute("SELECT COUNT(*) FROM votes WHERE annotator_id = ?", (annotator.annotator_id,)).fetchone()[0]
            return {"done": done, "total": total}

        if con is not None:
            return count(con)
        with self._read() as c:
            return count(c)

    def next_item(self, annotator: Annotator) -> dict:
        """The first item in this annotator's order without a vote (resume = ask again), in screen terms only:
        ``{"item", "prompt", "left", "right", "progress"}`` with image keys — or ``item: None`` when done."""
        with self._read() as con:
            row = con.execute(
                """SELECT i.item_key, i.prompt, sa.image_key, sb.image_key, a.a_on_left
                   FROM assignments a JOIN items i ON i.item_id = a.item_id
                   JOIN samples sa ON sa.sample_id = i.sample_a JOIN samples sb ON sb.sample_id = i.sample_b
                   WHERE a.annotator_id = ? AND NOT EXISTS
                     (SELECT 1 FROM votes v WHERE v.annotator_id = a.annotator_id AND v.item_id = a.item_id)
                   ORDER BY a.position LIMIT 1""", (annotator.annotator_id,)).fetchone()
            progress = self.progress(annotator, con)
        if row is None:
            return {"item": None, "progress": progress}
        key, prompt, img_a, img_b, a_left = row
        left, right = (img_a, img_b) if a_left else (img_b, img_a)
        return {"item": key, "prompt": prompt, "left": left, "right": right, "progress": progress}

    def image(self, annotator: Annotator, image_key: str) -> bytes:
        """A PNG of an item assigned to this annotator; any other key is 'not found' (no probing of others')."""
        with self._read() as con:
            row = con.execute(
                """SELECT s.png FROM samples s JOIN items i ON s.sample_id IN (i.sample_a, i.sample_b)
                   JOIN assignments a ON a.item_id = i.item_id
                   WHERE s.image_key = ? AND a.annotator_id = ?""", (image_key, annotator.annotator_id)).fetchone()
        if row is None:
            raise NotFound(f"no image {image_key!r} among this annotator's items")
        return bytes(row[0])

    def record_vote(self, annotator: Annotator, item_key: str, side: str) -> dict:
        """Store one vote and return the annotator's progress once it is committed (durable). A second vote on
        the same item, an item not assigned to this annotator, or an unknown side writes nothing."""
        if side not in SIDES:
            raise StudyError(f"choice {side!r}: expected one of {list(SIDES)}")
        with self._transaction() as con:
            row = con.execute(
                """SELECT a.item_id, a.a_on_left FROM assignments a JOIN items i ON i.item_id = a.item_id
                   WHERE a.annotator_id = ? AND i.item_key = ?""", (annotator.annotator_id, item_key)).fetchone()
            if row is None:
                raise NotFound(f"no item {item_key!r} among this annotator's items")
            item_id, a_left = row
            if con.execute("SELECT 1 FROM votes WHERE annotator_id = ? AND item_id = ?",
                           (annotator.annotator_id, item_id)).fetchone():
                raise AlreadyVoted(f"item {item_key!r} already has this annotator's vote; a vote cannot be changed")
            choice = side_to_choice(side, bool(a_left))
            con.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?)",
                        (annotator.annotator_id, item_id, choice, side, time.time()))
            return self.progress(annotator, con)

    # ------------------------------------------------------------------------------------------ admin side
    def annotators(self) -> list[dict]:
        """Every annotator with group, source and progress (no tokens: they are not stored)."""
        with self._read() as con:
            rows = con.execute(
                """SELECT n.annotator_id, n.name, n.group_index, n.source,
                          (SELECT COUNT(*) FROM assignments a WHERE a.annotator_id = n.annotator_id),
                          (SELECT COUNT(*) FROM votes v WHERE v.annotator_id = n.annotator_id)
                   FROM annotators n ORDER BY n.annotator_id""").fetchall()
        return [{"annotator_id": r[0], "name": r[1], "group": r[2], "source": r[3], "assigned": r[4], "voted": r[5]}
                for r in rows]

    def items(self) -> list[dict]:
        """Every item with both samples' metadata (system identities included: admin only)."""
        with self._read() as con:
            rows = con.execute(
                """SELECT i.item_id, i.item_key, i.prompt, i.prompt_index, sa.seed, sb.seed, sa.reward, sb.reward,
                          sa.image_key, sb.image_key
                   FROM items i JOIN samples sa ON sa.sample_id = i.sample_a JOIN samples sb ON sb.sample_id = i.sample_b
                   ORDER BY i.item_id""").fetchall()
        keys = ("item_id", "item_key", "prompt", "prompt_index", "seed_a", "seed_b", "reward_a", "reward_b",
                "image_a", "image_b")
        return [dict(zip(keys, r)) for r in rows]

    def sample(self, item_id: int, system: str) -> dict:
        """One item's sample of system ``A`` or ``B``: png, latent (array or None), seed, reward."""
        column = {"A": "sample_a", "B": "sample_b"}[system]
        with self._read() as con:
            row = con.execute(f"""SELECT s.png, s.latent, s.latent_shape, s.seed, s.reward FROM items i
                                  JOIN samples s ON s.sample_id = i.{column} WHERE i.item_id = ?""", (item_id,)).fetchone()
        if row is None:
            raise NotFound(f"no item {item_id}")
        png, latent, shape, seed, reward = row
        arr = None if latent is None else np.frombuffer(latent, dtype=np.float32).reshape(json.loads(shape)).copy()
        return {"png": bytes(png), "latent": arr, "seed": seed, "reward": reward}

    def assignments(self) -> list[dict]:
        with self._read() as con:
            rows = con.execute(
                """SELECT n.name, n.group_index, i.item_key, i.prompt_index, a.position, a.a_on_left
                   FROM assignments a JOIN annotators n ON n.annotator_id = a.annotator_id
                   JOIN items i ON i.item_id = a.item_id ORDER BY n.annotator_id, a.position""").fetchall()
        keys = ("annotator", "group", "item", "prompt_index", "position", "a_on_left")
        return [dict(zip(keys, r)) for r in rows]

    def votes(self) -> list[dict]:
        """Every stored vote, with the system chosen (admin only)."""
        with self._read() as con:
            rows = con.execute(
                """SELECT n.name, n.group_index, i.item_key, i.prompt_index, v.choice, v.side, v.created_at
                   FROM votes v JOIN annotators n ON n.annotator_id = v.annotator_id
                   JOIN items i ON i.item_id = v.item_id ORDER BY v.created_at, n.annotator_id""").fetchall()
        keys = ("annotator", "group", "item", "prompt_index", "choice", "side", "created_at")
        return [dict(zip(keys, r)) for r in rows]

    def import_votes(self, annotator_name: str, votes: Iterable[tuple[str, str]]) -> int:
        """Store ``(item_key, choice)`` votes (choice in A/B/tie/skip) of an existing annotator in one transaction:
        all or nothing. Returns the number stored; a vote already present for the same item is an error."""
        with self._transaction() as con:
            row = con.execute("SELECT annotator_id FROM annotators WHERE name = ?", (annotator_name,)).fetchone()
            if row is None:
                raise NotFound(f"no annotator {annotator_name!r} in {self.path}")
            return self._insert_votes(con, row[0], annotator_name, votes)

    @staticmethod
    def _insert_votes(con: sqlite3.Connection, aid: int, name: str, votes: Iterable[tuple[str, str]]) -> int:
        n = 0
        for item_key, choice in votes:
            if choice not in CHOICES:
                raise StudyError(f"choice {choice!r} for item {item_key!r}: expected one of {list(CHOICES)}")
            r = con.execute("""SELECT a.item_id, a.a_on_left FROM assignments a JOIN items i ON i.item_id = a.item_id
                               WHERE a.annotator_id = ? AND i.item_key = ?""", (aid, item_key)).fetchone()
            if r is None:
                raise NotFound(f"no item {item_key!r} assigned to annotator {name!r}")
            try:
                con.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?)",
                            (aid, r[0], choice, choice_to_side(choice, bool(r[1])), time.time()))
            except sqlite3.IntegrityError as err:
                raise AlreadyVoted(f"annotator {name!r} already voted on item {item_key!r}") from err
            n += 1
        return n


def side_to_choice(side: str, a_on_left: bool) -> str:
    if side == "left":
        return "A" if a_on_left else "B"
    if side == "right":
        return "B" if a_on_left else "A"
    return side


def choice_to_side(choice: str, a_on_left: bool) -> str:
    if choice == "A":
        return "left" if a_on_left else "right"
    if choice == "B":
        return "right" if a_on_left else "left"
    return choice


def open_study(folder: str | Path) -> StudyStore:
    folder = Path(folder)
    db = folder / DB_FILE if folder.is_dir() else folder
    if not db.is_file():
        raise FileNotFoundError(f"{folder}: no study here (expected {DB_FILE}); create one with "
                                f"`python jobs/human_study.py create --out {folder}`")
    return StudyStore(db)
