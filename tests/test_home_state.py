"""A home's state: a home made before the database moves into it once, and a person sees and takes the data."""
import pytest
from conftest import run_cli, synthetic_pairs

from embed_ft import flywheel, jsonl
from embed_ft.state import home_state, home_db
from embed_ft.state.home_db import HomeDB
from embed_ft.state.heldout import Ledger
from embed_ft.state.pair_store import PairStore


def as_posts(pairs, prefix):
    return [{"text1": a, "text2": b, "label": y, "id": f"{prefix}{i}", "source": prefix} for i, (a, b, y) in enumerate(pairs)]


@pytest.fixture
def file_home(tiny_model_dir, tmp_path):
    """A home as the code before the database made it: pairs/ batch files (one round has read some),
    conflicts/, splits.jsonl, current.json."""
    home = tmp_path / "fw"
    flywheel.settings(home, {"base": str(tiny_model_dir), "set": "epochs=1 device=cpu"})  # no `database`: files
    store = PairStore(home / "pairs")
    store.add(as_posts(synthetic_pairs(60, 1), "a"))
    flywheel.run_round(home, flywheel.settings(home, {}))  # too few to judge: it assigns splits and waits
    store.add(as_posts(synthetic_pairs(40, 5), "b"))
    first = as_posts(synthetic_pairs(60, 1), "a")[0]
    store.add([first | {"label": 1 - first["label"], "id": "c0"},                          # a contradiction
               {"text1": "t9a other", "text2": "t9b other", "label": 1, "id": "b3"}])       # an id reused
    jsonl.write_json(home / "current.json", {"version": "round-007", "path": "rounds/round-007", "promoted_at": "then"})
    return home


def test_a_file_home_moves_into_the_database_once_nothing_lost_nothing_doubled(file_home, capsys):
    store, splits_before = PairStore(file_home / "pairs"), dict(Ledger(file_home / "splits.jsonl").split_of)
    stored, conflicts = store.count(), store.conflicting
    assert home_state.new_pair_count(file_home) == 40
    flywheel.main(["--home", str(file_home), "--migrate"])
    out = capsys.readouterr().out
    assert "60 pairs that rounds have read and 40 not yet read" in out and "2 conflicts kept apart" in out
    db = home_state.database(file_home)
    assert db.url == home_state.DEFAULT_DATABASE and db.count() == stored == 100 and db.conflict_count() == conflicts == 2
    assert [p["id"] for p in db.pairs()][:60] == [f"a{i}" for i in range(60)]  # what rounds read comes first
    assert Ledger(db).split_of == splits_before and len(splits_before) > 0   # no text changed split
    assert home_state.new_pair_count(file_home) == 40                           # the unread pairs are still new
    assert home_state.current_version(file_home)["version"] == "round-007"
    code, err = run_cli(flywheel.main, ["--home", str(file_home), "--migrate"], capsys)
    assert code == 2 and "in sqlite:///pairs.db already" in err


def snapshot(db: HomeDB) -> tuple:
    """Everything a home keeps in its database, as a reader sees it."""
    return (db.pairs(), db.conflicts(), db.splits_after(0), db.state("served"), db.state("base"), db.state("migrated_through"))


def test_a_sqlite_home_moves_to_postgresql_and_back_nothing_lost_or_doubled(file_home, postgres, tmp_path, capsys):
    flywheel.main(["--home", str(file_home), "--migrate"])  # the file home into SQLite first
    home_state.keep_base_threshold(file_home, 0.61, 40, 1)
    sqlite, url = home_state.database(file_home), postgres.database("moved_home")
    before, new_before = snapshot(sqlite), home_state.new_pair_count(file_home)
    flywheel.main(["--home", str(file_home), "--migrate", "--database", url])
    assert "100 pairs, 2 conflicts" in capsys.readouterr().out
    moved = home_state.database(file_home)
    assert moved.url == url and snapshot(moved) == before and home_state.new_pair_count(file_home) == new_before == 40
    assert moved.add([{"text1": "one more", "text2": "pair", "label": 1}])["accepted"] == 1
    assert moved.last_seq() == before[0][-1]["seq"] + 1  # a new pair numbers on from the copied ones
    assert sqlite.count() == 100  # the old database is left as it was
    code, err = run_cli(flywheel.main, ["--home", str(file_home), "--migrate", "--database", url], capsys)
    assert code == 2 and "already" in err
    back = f"sqlite:///{tmp_path / 'copy.db'}"  # and back, for a test copy
    flywheel.main(["--home", str(file_home), "--migrate", "--database", back])
    assert snapshot(home_state.database(file_home))[1:] == snapshot(moved)[1:] and home_state.database(file_home).count() == 101
    code, err = run_cli(flywheel.main, ["--home", str(file_home), "--migrate", "--database", url], capsys)
    assert code == 2 and "holds a home's rows already" in err  # never into a database that has a home


def test_conflicts_are_listed_and_the_pairs_exported_as_pair_files(file_home, tmp_path, capsys):
    code, err = run_cli(flywheel.main, ["--home", str(file_home), "--conflicts"], capsys)
    assert code == 2 and "--migrate" in err  # a file home is told how to get there
    flywheel.main(["--home", str(file_home), "--migrate"])
    capsys.readouterr()
    flywheel.main(["--home", str(file_home), "--conflicts"])
    out = capsys.readouterr().out
    assert "another label" in out and "id 'b3' names another pair" in out and "2 conflicts" in out
    flywheel.main(["--home", str(file_home), "--export", str(tmp_path / "export")])
    from embed_ft.data import load_pairs
    exported = load_pairs(str(tmp_path / "export" / "pairs.tsv"))
    assert len(exported) == 100 and len(set(exported)) == 100
    assert exported[:60] == synthetic_pairs(60, 1)
    lines = (tmp_path / "export" / "conflicts.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:6] == ["text1", "text2", "label", "id", "source", "received"] and len(lines) == 3


def test_a_new_home_is_in_sqlite_and_a_password_never_in_the_home(tiny_model_dir, tmp_path, capsys):
    home = tmp_path / "fw"
    flywheel.main(["--home", str(home), "--base", str(tiny_model_dir), "--init"])
    assert jsonl.read_json(home / "flywheel.json")["database"] == "sqlite:///pairs.db" and (home / "pairs.db").is_file()
    code, err = run_cli(flywheel.main, ["--home", str(tmp_path / "pg"), "--base", str(tiny_model_dir), "--init",
                                        "--database", "postgresql://embed:secret@db:5432/fw"], capsys)
    assert code == 2 and "PGPASSWORD" in err and not (tmp_path / "pg" / "flywheel.json").exists()
    code, err = run_cli(flywheel.main, ["--home", str(home), "--database", "sqlite:///other.db"], capsys)
    assert code == 2 and "chosen when a home is made" in err


def test_the_versions_served_and_the_base_threshold_are_rows_every_process_reads(tmp_path):
    home = tmp_path / "fw"
    home.mkdir()
    jsonl.write_json(home / "flywheel.json", {"database": "sqlite:///pairs.db"})
    assert home_state.served(home) == {"current": home_state.BASE_POINTER, "previous": None}
    (home / "rounds" / "round-001").mkdir(parents=True)
    home_state.switch_current(home, home / "rounds" / "round-001")
    home_state.keep_base_threshold(home, 0.75, 100, 1)
    other = HomeDB("sqlite:///pairs.db", home)  # another process's connection
    assert other.state("served")["current"]["path"] == "rounds/round-001" and other.state("served")["previous"]["version"] == "base"
    assert other.state("base")["threshold"] == 0.75 and home_state.base_threshold(home) == 0.75


def test_a_person_corrects_a_label_or_withdraws_a_pair_and_the_round_export_and_move_keep_it(file_home, postgres, tmp_path, capsys):
    flywheel.main(["--home", str(file_home), "--migrate"])
    db = home_state.database(file_home)
    first, other = db.pairs()[0], db.pairs()[1]
    flywheel.main(["--home", str(file_home), "--conflicts"])
    assert "2 conflicts, 2 not settled" in capsys.readouterr().out
    # the contradiction said the first pair's label was wrong: a person settles it, and withdraws another pair
    flywheel.main(["--home", str(file_home), "--correct", first["text1"], first["text2"], str(1 - first["label"]),
                   "--why", "read both questions: the post was right", "--by", "ana"])
    flywheel.main(["--home", str(file_home), "--correct", other["text2"], other["text1"], "withdraw", "--why", "spam"])
    out = capsys.readouterr().out
    assert "by ana" in out and "withdrawn" in out
    code, err = run_cli(flywheel.main, ["--home", str(file_home), "--correct", "never", "posted", "1", "--why", "x"], capsys)
    assert code == 2 and "no stored pair" in err
    code, err = run_cli(flywheel.main, ["--home", str(file_home), "--correct", first["text1"], first["text2"], "2", "--why", "x"], capsys)
    assert code == 2 and "0, 1 or withdraw" in err
    flywheel.main(["--home", str(file_home), "--conflicts"])
    assert "settled by ana: label" in capsys.readouterr().out
    pairs, *_ = flywheel.pairs_from_database(file_home, db, None)  # what the next round trains and judges on
    assert (first["text1"], first["text2"], 1 - first["label"]) in pairs and len(pairs) == 99
    assert all((other["text1"], other["text2"]) != p[:2] for p in pairs)
    assert db.add([{"text1": first["text1"], "text2": first["text2"], "label": 1 - first["label"]}])["duplicates"] == 1
    split_of = Ledger(db).split_of
    flywheel.main(["--home", str(file_home), "--export", str(tmp_path / "out")])
    assert "corrections.tsv (2)" in capsys.readouterr().out
    assert "ana\tread both questions" in (tmp_path / "out" / "corrections.tsv").read_text()
    flywheel.main(["--home", str(file_home), "--migrate", "--database", postgres.database("corrected_home")])
    moved = home_state.database(file_home)
    assert moved.pairs() == db.pairs() and len(moved.corrections()) == 2 and Ledger(moved).split_of == split_of


def test_prune_keeps_the_versions_served_and_the_last_rounds(tiny_model_dir, tmp_path, capsys):
    home = tmp_path / "fw"
    flywheel.main(["--home", str(home), "--base", str(tiny_model_dir), "--init"])
    for n in range(1, 6):
        for kind in ("rounds", "work"):
            (home / kind / f"round-00{n}").mkdir(parents=True)
            (home / kind / f"round-00{n}" / "file").write_bytes(b"x" * 1000)
    pointer = lambda n: {"version": f"round-00{n}", "path": f"rounds/round-00{n}", "promoted_at": "then"}
    home_state.database(home).set_state("served", {"current": pointer(3), "previous": pointer(1)})
    flywheel.main(["--home", str(home), "--prune", "1"])
    assert sorted(p.name for p in (home / "rounds").iterdir()) == ["round-001", "round-003", "round-005"]
    assert [p.name for p in (home / "work").iterdir()] == ["round-005"]
    assert "6 folders removed" in capsys.readouterr().out
    code, err = run_cli(flywheel.main, ["--home", str(home), "--prune", "-1"], capsys)
    assert code == 2 and "0 or more" in err


def test_a_round_that_lost_its_lock_cannot_promote_and_no_number_is_taken_twice(tiny_model_dir, tmp_path, postgres):
    """Round A holds the lock and trains; its connection is terminated (an idle timeout, a proxy), so
    round B takes the lock and starts while A goes on: each takes its own number, B promotes, and A's
    switch, when it comes, is refused (the served row and the numbers taken are its fencing token)."""
    import psycopg
    home = tmp_path / "fw"
    flywheel.main(["--home", str(home), "--base", str(tiny_model_dir), "--init", "--database", postgres.database("lost_lock")])
    db, other = home_state.database(home), HomeDB(home_state.database(home).url)
    with db.round_lock():
        a_number, a_start = home_state.round_number(home, []), home_state.current_version(home)
        with psycopg.connect(db.url, autocommit=True) as admin:  # A's lock goes with its terminated session,
            admin.execute("SELECT pg_terminate_backend(pid, 30000) FROM pg_locks "  # once it has ended (30 s at most)
                          "WHERE locktype = 'advisory' AND objid = %s", (home_db.ROUND_LOCK,))
        with other.round_lock():  # B gets the lock A lost
            b_number = home_state.round_number(home, [])
            home_state.switch_current(home, home / "rounds" / f"round-{b_number:03d}", home_state.current_version(home), b_number)
        with pytest.raises(home_state.LostRace, match="serves round-002 now"):
            home_state.switch_current(home, home / "rounds" / f"round-{a_number:03d}", a_start, a_number)
    # leaving A's block does not raise: its lock went with its session, and what it did stands
    assert (a_number, b_number) == (1, 2) and home_state.current_version(home)["version"] == "round-002"
    with pytest.raises(home_state.LostRace, match="round 3 has started"):  # a round older than the last taken
        with db.round_lock():
            c = home_state.round_number(home, [{"round": 2}])
            home_state.switch_current(home, home / "rounds" / "round-009", home_state.current_version(home), c - 1)
    other.close()
