"""The home database: the same guarantees on SQLite and on a real PostgreSQL, across processes."""
import multiprocessing
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from embed_ft.state import home_db
from embed_ft.state.home_db import HomeDB, check_url, connection_url
from embed_ft.errors import InputError
from embed_ft.state.file_lock import BusyError


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pairs.db'}"
    return request.getfixturevalue("postgres").database(f"t_{abs(hash(str(tmp_path)))}")


def pair(a, b, label, pair_id=None):
    return {"text1": a, "text2": b, "label": label} | ({"id": pair_id} if pair_id else {})


def test_a_pair_is_stored_once_and_contradictions_and_reused_ids_are_kept_apart(url):
    db = HomeDB(url)
    batch = [pair("How do I learn Python?", "Best way to learn Python", 1, "a"), pair("x y", "X  y", 0),
             pair("cats", "dogs", 0, "b")]
    assert db.add(batch) == {"accepted": 2, "duplicates": 0, "conflicts": 0, "dropped_self_pairs": 1, "stored": 2}
    assert db.add(batch) == {"accepted": 0, "duplicates": 2, "conflicts": 0, "dropped_self_pairs": 1, "stored": 2}  # a retry
    contradicting = [pair("best way to learn  python", "how do i learn python?", 0, "c"), pair("cats", "birds", 0, "b")]
    assert db.add(contradicting)["conflicts"] == 2
    assert db.add(contradicting)["conflicts"] == 2  # the same answer again, and kept once
    with db.transaction(writing=True) as cursor:  # a database made before the running count: counted once
        cursor.execute("DELETE FROM state WHERE name = 'pairs_stored'")
    assert db.add([pair("one more", "pair", 1)])["stored"] == 3
    assert db.count() == 3 and [c["reason"] for c in db.conflicts()] == ["label", "id"]
    assert db.conflicts()[0]["stored_label"] == 1 and db.conflicts()[1]["stored_id"] == "b"
    assert [p["seq"] for p in db.pairs()] == sorted(p["seq"] for p in db.pairs()) and len(db.pairs(after=db.last_seq())) == 0
    db.close()


def add_batches(url, batches, answers):
    db = HomeDB(url)
    for batch in batches:
        answers.append(db.add(batch))
    db.close()


def in_processes(url, plans) -> list[dict]:
    """Each plan (a list of batches) added by a process of its own, all at once; every answer. A
    batch refused (an exception) ends its process with a nonzero code, which fails the test."""
    with multiprocessing.Manager() as manager:
        answers = manager.list()
        workers = [multiprocessing.get_context("spawn").Process(target=add_batches, args=(url, plan, answers))
                   for plan in plans]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        answers = list(answers)
    assert all(w.exitcode == 0 for w in workers)
    return answers


def test_three_processes_retrying_each_others_batches_store_each_pair_once(url):
    batches = [[pair(f"q{b} {i}", f"r{b} {i}", i % 2, f"id-{b}-{i}") for i in range(20)] for b in range(12)]
    clash = [pair("q0 0", "r0 0", 1, "other-id")]                    # contradicts batch 0's first pair
    plans = [batches[0:6] + batches[6:8], batches[6:12] + batches[0:2] + [clash], batches[2:6] + batches[8:12] + [clash]]
    answers = in_processes(url, plans)
    db = HomeDB(url)
    assert db.count() == 240 and sum(a["accepted"] for a in answers) == 240   # none lost, none doubled
    assert sum(a["duplicates"] for a in answers) == 12 * 20  # each of the 12 batches was sent twice, over processes
    assert sum(a["conflicts"] for a in answers) == 2 and len(db.conflicts()) == 1
    assert max(a["stored"] for a in answers) == 240  # the running count, kept by writers in turn
    db.close()


def test_the_ledger_and_the_state_rows_keep_what_was_decided_first(url):
    db, other = HomeDB(url), HomeDB(url)
    db.add_splits([("how do i learn python?", "test"), ("cats", "train")])
    other.add_splits([("cats", "audit"), ("dogs", "validation")])  # "cats" was decided already: it keeps "train"
    rows, last = other.splits_after(0)
    assert rows == [("how do i learn python?", "test"), ("cats", "train"), ("dogs", "validation")]
    assert db.splits_after(last) == ([], last)
    assert db.state("served") is None
    db.set_state("served", {"current": {"version": "round-002"}})
    other.set_state("served", {"current": {"version": "round-003"}})
    assert db.state("served") == {"current": {"version": "round-003"}}
    db.close(), other.close()


HOLD_THE_ROUND_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from embed_ft.state.home_db import HomeDB
with HomeDB({url!r}, None).round_lock():
    print("held", flush=True)
    time.sleep(60)
"""


def test_one_round_at_a_time_across_processes_and_a_killed_rounds_lock_goes_with_it(url, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_ROUND_LOCK.format(root=str(ROOT), url=url)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    db = HomeDB(url)
    with pytest.raises(BusyError, match="one at a time"):
        with db.round_lock():
            pass
    holder.kill()  # kill -9: its connection (or its flock) dies with it
    holder.wait()
    with db.round_lock(wait=True):
        pass
    db.close()


def test_a_url_with_a_password_or_of_another_kind_is_one_line():
    for url in ("postgresql://embed:secret@db:5432/fw", "postgresql://embed@db:5432/fw?password=secret",
                "postgresql://embed@db/fw?sslmode=require&password=x"):
        with pytest.raises(InputError, match="PGPASSWORD"):
            check_url(url)
    with pytest.raises(InputError, match="sqlite:///PATH"):
        check_url("mysql://db/fw")
    assert check_url("postgresql://embed@db:5432/fw") == "postgresql://embed@db:5432/fw"


def test_another_machine_is_reached_over_tls_unless_the_url_says_otherwise():
    assert connection_url("postgresql://embed@db.example:5432/fw") == "postgresql://embed@db.example:5432/fw?sslmode=require"
    assert connection_url("postgresql://embed@db.example/fw?connect_timeout=5").endswith("?connect_timeout=5&sslmode=require")
    for url in ("postgresql://embed@db.example/fw?sslmode=disable", "postgresql://embed@127.0.0.1:5432/fw",
                "postgresql://embed@localhost/fw", "postgresql://embed@/fw?host=/var/run/postgresql"):
        assert connection_url(url) == url  # said explicitly, or this machine


def hold_the_writers_turn(url, held, release):
    """A writer that takes the writers' turn and stalls (a vanished client, a paused machine)."""
    import psycopg
    with psycopg.connect(url) as connection:
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (home_db.ADD_LOCK,))
        held.set()
        release.wait(60)


def test_a_stalled_writer_makes_the_others_answer_unavailable_within_the_timeout_then_they_recover(postgres, monkeypatch):
    url = postgres.database("stalled_writer")
    monkeypatch.setattr(home_db, "LOCK_TIMEOUT_MS", 500)
    db = HomeDB(url)
    held, release = threading.Event(), threading.Event()
    stall = threading.Thread(target=hold_the_writers_turn, args=(url, held, release))
    stall.start()
    try:
        assert held.wait(30)
        started = time.perf_counter()
        with pytest.raises(home_db.StoreUnavailable, match="lock timeout"):
            db.add([pair("a stalled", "writer", 1)])
        assert time.perf_counter() - started < 5  # the timeout, not TCP's hours
    finally:
        release.set()
        stall.join(30)
    assert db.add([pair("a stalled", "writer", 1)])["accepted"] == 1 and db.count() == 1  # it recovers by itself
    db.close()


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
def test_no_batch_is_refused_whatever_the_servers_default_isolation(postgres, isolation):
    url = postgres.database(f"isolation_{isolation.replace(' ', '_')}")
    import psycopg
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET default_transaction_isolation = '{isolation}'")
    batches = [[pair(f"q{b} {i}", f"r{b} {i}", i % 2, f"id-{b}-{i}") for i in range(20)] for b in range(9)]
    plans = [batches[0:6], batches[3:9], batches[6:9] + batches[0:3]]  # every batch sent twice, by two processes
    answers = in_processes(url, plans)
    assert len(answers) == 18  # no batch refused
    db = HomeDB(url)
    assert db.count() == 180 and sum(a["accepted"] for a in answers) == 180
    db.close()
