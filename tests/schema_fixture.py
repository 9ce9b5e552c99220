"""The first released schema, frozen: tests/data/schema_v1.sql holds what
migration 1 made, so tests/test_migrations.py can upgrade a database made by
it whatever later code does to db.MIGRATIONS.

Regenerate only while migration 1 is still unreleased:
    .venv/bin/python tests/schema_fixture.py
"""
import os
import sqlite3
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "data", "schema_v1.sql")


def dump():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
    from rc import db
    connection = sqlite3.connect(":memory:", isolation_level=None)
    for statement in db.split_statements(db.MIGRATIONS[0]):
        connection.execute(statement)
    # In the order they were made, so tables come before their indexes and triggers.
    rows = connection.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"
                              " AND name NOT LIKE 'sqlite_%' ORDER BY rowid").fetchall()
    return "".join("%s;\n\n" % row[0].strip() for row in rows)


def load(path):
    """A database at schema version 1, as the first release made it."""
    connection = sqlite3.connect(path, isolation_level=None)
    with open(PATH, encoding="utf-8") as f:
        connection.executescript(f.read())
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA user_version=1")
    return connection


if __name__ == "__main__":
    with open(PATH, "w", encoding="utf-8") as f:
        f.write("-- Schema version 1 (db.MIGRATIONS[0]), frozen; see tests/schema_fixture.py.\n\n")
        f.write(dump())
    print("wrote %s" % PATH)
