"""The ratings database: SQLite, one row per answer, committed before the next item.

Several raters may rate at once: each request opens its own connection, the database
runs in WAL mode (readers do not block the writer), and a rater's answer to an item
is one transaction (both questions, or neither). The schema carries its version in
`PRAGMA user_version`; a database written by a newer version is refused, not altered.
"""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
import time
from collections.abc import Iterator

from parti.runtime.errors import ConfigError

SCHEMA_VERSION = 1
QUESTIONS = ("realism", "match")
CHOICES = ("left", "right", "same")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
  id INTEGER PRIMARY KEY,
  rater TEXT NOT NULL,
  item TEXT NOT NULL,        -- rating_items.Item.id: the two runs and the prompt
  question TEXT NOT NULL,    -- one of QUESTIONS
  choice TEXT NOT NULL,      -- left, right or same, as the rater saw the page
  left_run TEXT NOT NULL,    -- the run shown on the left
  right_run TEXT NOT NULL,
  winner TEXT NOT NULL,      -- the preferred run's name, or '' for about the same
  answered_at REAL NOT NULL,
  UNIQUE (rater, item, question)
);
CREATE INDEX IF NOT EXISTS answers_by_rater ON answers (rater);
"""


class RatingStore:
  """The answers of every rater, in one SQLite file."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self._connect() as connection:
      version = connection.execute("PRAGMA user_version").fetchone()[0]
      if version > SCHEMA_VERSION:
        raise ConfigError(
          f"{self.path} was written by a newer version of the rating app (schema {version}; "
          f"this one reads up to {SCHEMA_VERSION}): upgrade, or rate into another database."
        )
      connection.execute("PRAGMA journal_mode=WAL")
      connection.executescript(_SCHEMA)
      connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

  @contextlib.contextmanager
  def _connect(self) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(self.path, timeout=30)
    try:
      with connection:  # Commits, or rolls back on an exception.
        yield connection
    except sqlite3.DatabaseError as error:
      raise ConfigError(f"{self.path} is not a usable ratings database: {error}") from error
    finally:
      connection.close()

  def answer(self, rater: str, item, left_run: str, choices: dict[str, str]) -> None:
    """Records a rater's answers to an item's questions ({question: choice}) in one
    transaction; answering again replaces the earlier answers."""
    right_run = item.runs[1] if left_run == item.runs[0] else item.runs[0]
    winners = {"left": left_run, "right": right_run, "same": ""}
    now = time.time()
    with self._connect() as connection:
      connection.executemany(
        "INSERT OR REPLACE INTO answers (rater, item, question, choice, left_run, right_run, "
        "winner, answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
          (rater, item.id, question, choice, left_run, right_run, winners[choice], now)
          for question, choice in choices.items()
        ],
      )

  def answered_items(self, rater: str) -> set[str]:
    """The items the rater answered every question of."""
    with self._connect() as connection:
      rows = connection.execute(
        "SELECT item FROM answers WHERE rater = ? GROUP BY item HAVING COUNT(*) = ?",
        (rater, len(QUESTIONS)),
      ).fetchall()
    return {item for (item,) in rows}

  def rows(self) -> list[dict]:
    """Every answer, oldest first."""
    with self._connect() as connection:
      connection.row_factory = sqlite3.Row
      rows = connection.execute("SELECT * FROM answers ORDER BY id").fetchall()
    return [dict(row) for row in rows]
