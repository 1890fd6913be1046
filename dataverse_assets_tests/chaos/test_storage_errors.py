"""The disk fills up, or the database turns read-only, while a change set is published: the
publish fails with an error that names the problem, nothing of the change set is half-written,
and once the problem is gone the next run completes as if it had never happened.

PostgreSQL has no file to fill or lock; its faults are the server's: the database read-only (a
standby, or `default_transaction_read_only`), a statement cancelled by `statement_timeout`
(a table locked by someone else for longer), the connection ended under the publish (an
administrator's `pg_terminate_backend`, a network cut), the whole server stopped mid-run
(then unreachable), and, before anything is written, a wrong database name, a user without
the rights on the database or its schema. A full disk on the server (SQLSTATE 53100) is mapped
like the others but not simulated here.
"""

import sqlite3
import time
import uuid

import psycopg
import pytest

from dataverse_assets.errors import StorageError
from dataverse_assets.simulator import serve_on_loopback
from dataverse_assets.store import mirror as resources
from dataverse_assets.store.backend import is_postgres_address
from dataverse_assets.store.db import connect, quote_identifier
from dataverse_assets.sync import steps
from dataverse_assets_tests.chaos.harness import (
    ALL_ENTITIES,
    canonical_problems,
    make_chaos_mirror,
    mutate_source,
    new_simulator,
)
from dataverse_assets_tests.servers import free_port
from dataverse_assets_tests.truth import mirror_contents

PROBLEMS = {
    # SQLite's own limit on the file's pages: writes past it fail as on a full disk.
    "disk_full": ("PRAGMA max_page_count = {pages}", "disk is full"),
    "read_only": ("PRAGMA query_only = ON", "read-only"),
}
# PostgreSQL: what each new connection made while publishing meets, and the words its error
# must say (see troubled_connect).
POSTGRES_PROBLEMS = {
    "read_only": "read-only",
    "statement_timeout": "statement_timeout",
    "connection_ended": "ended the connection",
    "server_stopped": "ended the connection",
}
STATEMENT_TIMEOUT = "300ms"


def _side_connection(address: str):
    """A connection of someone else's (an administrator, another program) to the store."""
    return psycopg.connect(address, autocommit=True)


@pytest.fixture
def storage_trouble(monkeypatch, request):
    """While publishing (and only then), every new connection to the mirror has the problem."""
    state = {"problem": None, "publishing": False}
    connect = resources.connect

    def troubled_connect(path):
        connection = connect(path)
        if state["problem"] and state["publishing"]:
            if is_postgres_address(path):
                postgres_trouble(connection, state)
            else:
                pragma, _ = PROBLEMS[state["problem"]]
                pages = connection.execute("PRAGMA page_count").fetchone()[0]
                connection.execute(pragma.format(pages=pages))
        return connection

    def postgres_trouble(connection, state) -> None:
        problem = state["problem"]
        if problem == "read_only":  # as on a standby, or a database set read-only
            connection.execute("SET default_transaction_read_only = on")
        elif problem == "statement_timeout":  # the role's setting; the table is locked
            connection.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
        else:  # the session ends inside the publish's first transaction
            execute, ended = connection.execute, []

            def execute_then_end(sql, parameters=()):
                if connection.in_transaction and not ended:
                    ended.append(True)
                    if problem == "server_stopped":
                        request.getfixturevalue("postgres_cluster").stop()
                    else:
                        with _side_connection(connection.path) as admin:
                            admin.execute("SELECT pg_terminate_backend(%s)",
                                          (connection.raw.info.backend_pid,))
                return execute(sql, parameters)

            connection.execute = execute_then_end

    publish = steps.publish

    def publishing(store, entity, *args, **kwargs):
        state["publishing"] = True
        locked = None
        try:
            if state["problem"] == "statement_timeout":
                # Someone holds the entity's table (a migration, a VACUUM FULL) for longer
                # than the mirror's user may wait.
                locked = _side_connection(store.db_path)
                locked.execute("BEGIN")
                locked.execute(f"LOCK TABLE {quote_identifier(entity.name)}"
                               " IN ACCESS EXCLUSIVE MODE")
            return publish(store, entity, *args, **kwargs)
        finally:
            state["publishing"] = False
            if locked is not None:
                locked.close()

    monkeypatch.setattr(resources, "connect", troubled_connect)
    monkeypatch.setattr(steps, "publish", publishing)
    return state


@pytest.mark.parametrize(("chaos_store", "problem"), [
    *(("sqlite", problem) for problem in sorted(PROBLEMS)),
    *(("postgresql", problem) for problem in POSTGRES_PROBLEMS),
], indirect=["chaos_store"])
def test_a_storage_problem_while_publishing_fails_clearly_and_writes_nothing(
        tmp_path, chaos_store, problem, storage_trouble, request, chaos_report):
    started = time.perf_counter()
    simulator = new_simulator()
    with serve_on_loopback(simulator) as url:
        mirror = make_chaos_mirror(tmp_path, simulator, url, "mirror", page_size=50,
                                   store_for=chaos_store)
        reference = make_chaos_mirror(tmp_path, simulator, url, "reference", page_size=50,
                                      store_for=chaos_store)
        postgres = is_postgres_address(mirror.store.db_path)
        assert not any(mirror.sync_all().values())
        assert not any(reference.sync_all().values())
        mutate_source(simulator, __import__("random").Random(5))
        before = mirror_contents(mirror, ALL_ENTITIES)

        storage_trouble["problem"] = problem
        try:
            outcome = mirror.sync("hourly")
        finally:
            storage_trouble["problem"] = None
            if problem == "server_stopped":  # it is back: the next run can connect
                request.getfixturevalue("postgres_cluster").start()

        errors = {name: error for name, error in outcome.items() if error}
        assert errors, "the publish should have failed"
        # (An entity whose linking table failed is skipped, as Dagster skips it: no message.)
        messages = {name: error for name, error in errors.items()
                    if not error.startswith("skipped:")}
        expected_words = POSTGRES_PROBLEMS[problem] if postgres else PROBLEMS[problem][1]
        unclear = {name: error for name, error in messages.items()
                   if str(mirror.store.db_path) not in error or "nothing" not in error.lower()
                   or "\n" in error}
        assert not unclear, unclear
        # The entity whose publish met the problem says it; with the server stopped, the ones
        # after it cannot connect, and say that.
        assert any(expected_words in error for error in messages.values()), messages
        if problem == "server_stopped":
            assert all(expected_words in error or "cannot connect" in error
                       for error in messages.values()), messages
        else:
            assert all(expected_words in error for error in messages.values()), messages
        # Nothing half-written: an entity whose publish failed has its tables, defunct ids and
        # watermark exactly as before (some other entities' smaller writes may have fit).
        after = mirror_contents(mirror, ALL_ENTITIES)
        for name, error in errors.items():
            if "was published (COMPLETE" in error:
                continue  # its data committed whole; only the step log after it failed
            assert after[name] == before[name], name
            assert after[name + "__history"] == before[name + "__history"], name
            assert ([r for r in after["_defunct"] if r[0] == name]
                    == [r for r in before["_defunct"] if r[0] == name]), name
            watermark = {r[0]: r[1] for r in after["_sync_state"]}
            assert watermark[name] == {r[0]: r[1] for r in before["_sync_state"]}[name]

        # Space is back: the next run publishes everything, as if nothing had happened.
        assert not any(mirror.sync_all().values())
        assert not any(reference.sync_all().values())
        assert canonical_problems(mirror) == []
        equal = mirror_contents(mirror, ALL_ENTITIES) == mirror_contents(reference, ALL_ENTITIES)
        assert equal
    chaos_report({"scenario": problem, "passed": True, "failed_publishes": len(errors),
                  "error": next(iter(errors.values()))[:300],
                  "seconds": round(time.perf_counter() - started, 2)})


def test_sqlite_reports_what_the_storage_tests_simulate(tmp_path):
    """The simulation is SQLite's real error for each case."""
    connection = sqlite3.connect(tmp_path / "x.db")
    connection.execute("CREATE TABLE t (x)")
    connection.execute("PRAGMA query_only = ON")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        connection.execute("INSERT INTO t VALUES (1)")


def test_a_postgresql_store_that_cannot_be_opened_is_one_line_naming_the_fix(
        tmp_path, postgres_cluster, postgres_store_url, chaos_report):
    """Before anything is written: a database that does not exist, a server that does not
    answer, a user without the rights to make the mirror's tables (PostgreSQL 15 gives no one
    but the owner CREATE on the public schema). Each is one line naming the fix, and once the
    user has the rights a sync completes."""
    started = time.perf_counter()
    server, role = postgres_cluster, f"writer_{uuid.uuid4().hex[:8]}"
    unreachable = f"postgresql://{server.user}@{server.host}:{free_port()}/mirror"
    cases = {
        server.url("no_such_database"): 'database "no_such_database" does not exist',
        unreachable: "Connection refused",
    }
    database = postgres_store_url.rsplit("/", 1)[1]
    limited = f"postgresql://{role}@{server.host}:{server.port}/{database}"
    with _side_connection(server.url(database)) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        cases[limited] = "may not create or change the mirror's tables"
        for address, words in cases.items():
            with pytest.raises(StorageError) as refused:
                connect(address).close()
            message = str(refused.value)
            assert words in message and "\n" not in message, message
            assert message.startswith(address) and "nothing" in message.lower(), message
            assert "To fix: " in message
        admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO {role}')
        with pytest.raises(StorageError, match="permission denied for schema public"):
            connect(limited).close()  # the staging schema made, then the tables refused
        admin.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
    simulator = new_simulator()
    with serve_on_loopback(simulator) as url:
        mirror = make_chaos_mirror(tmp_path, simulator, url, "mirror", page_size=50,
                                   store_for=lambda folder: limited)
        assert not any(mirror.sync_all().values())
        assert canonical_problems(mirror) == []
    chaos_report({"scenario": "cannot_open", "passed": True,
                  "seconds": round(time.perf_counter() - started, 2)})
