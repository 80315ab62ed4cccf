"""One writer per --out: a second run refuses, a lock left by a crash is taken over, a finished
model is never silently replaced."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from embed_ft import run_folder
from embed_ft.errors import InputError


def dead_pid() -> int:
    """The process id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(folder, host, pid, age_seconds=0.0):
    folder.mkdir(exist_ok=True)
    lock = folder / run_folder.LOCK
    lock.write_text(json.dumps({"host": host, "pid": pid}))
    stamp = time.time() - age_seconds
    os.utime(lock, (stamp, stamp))
    return lock


def test_a_second_writer_refuses_and_the_lock_goes_with_the_run(tmp_path):
    with run_folder.claim(tmp_path / "out", resume=False, overwrite=False):
        assert (tmp_path / "out" / run_folder.LOCK).is_file()
        with pytest.raises(InputError, match=r"in use by another run \(process \d+ on "):
            with run_folder.claim(tmp_path / "out", resume=False, overwrite=False):
                pass
    assert not (tmp_path / "out" / run_folder.LOCK).exists()


@pytest.mark.parametrize("holder, age, stale", [
    ("this machine, process gone", 0, True),
    ("this machine, torn lock file", 10, True),
    ("another machine, refreshed lately", 60, False),
    ("another machine, silent for long", run_folder.STALE_AFTER + 60, True),
    ("another machine, an earlier attempt of the same input", 60, True),
])
def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys, monkeypatch, holder, age, stale):
    out = tmp_path / "out"
    host, pid = (socket.gethostname(), dead_pid()) if holder.startswith("this") else ("elsewhere", 1)
    lock = write_lock(out, host, pid, age)
    if "same input" in holder:  # Modal retries an input in a new container once the old one is gone
        lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "owner": "in-123"}))
        monkeypatch.setenv(run_folder.OWNER, "in-123")
    if "torn" in holder:
        lock.write_text('{"host": "')
        os.utime(lock, (time.time() - age, time.time() - age))
    if stale:
        with run_folder.claim(out, resume=False, overwrite=False):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert "was left by a run that is gone" in capsys.readouterr().err
    else:
        with pytest.raises(InputError, match="in use by another run"):
            with run_folder.claim(out, resume=False, overwrite=False):
                pass


def test_overwrite_replaces_a_finished_run_and_drops_its_checkpoints(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"fine_tuned": {}}))
    (out / "checkpoint.prev.pt").write_bytes(b"old")
    with pytest.raises(InputError, match="already holds a finished model: add --overwrite"):
        with run_folder.claim(out, resume=False, overwrite=False):
            pass
    with run_folder.claim(out, resume=False, overwrite=True):
        assert not (out / "checkpoint.prev.pt").exists()
