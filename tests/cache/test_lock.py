"""One writer per cache: the lock file's refusals, its release and the takeover of a stale one."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from repa_cache.cache.lock import LOCK_FILE, LockHeld, acquire, is_stale, release, writer_lock
from repa_cache.cache.storage import store_path

from ..conftest import HUNG


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock(root: Path, **info) -> None:
    root.mkdir(exist_ok=True)
    (root / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "t",
                                              "command": "repa precompute", "started_at": "2026-01-01T00:00:00+00:00",
                                              **info}))


def test_lock_is_exclusive_and_released(tmp_path):
    root = store_path(tmp_path / "c")
    with writer_lock(root, "repa precompute") as info:
        held = json.loads((tmp_path / "c" / LOCK_FILE).read_text())
        assert held == info and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(LockHeld) as e:
            acquire(root, "repa cache copy")
        assert str(e.value) == (f"{root} is being written by repa precompute (host {held['host']}, pid {os.getpid()}, "
                                f"started {held['started_at']}); wait for it to finish (or stop it) and run again")
    assert not (tmp_path / "c" / LOCK_FILE).exists()


def test_release_never_removes_another_writers_lock(tmp_path):
    root = store_path(tmp_path)
    info = acquire(root, "a")
    _lock(tmp_path, token="someone else")
    release(root, info)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "someone else"


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    _lock(tmp_path, pid=pid)
    assert is_stale(json.loads((tmp_path / LOCK_FILE).read_text()))
    info = acquire(store_path(tmp_path), "repa precompute")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == info["token"]
    assert f"taking over the stale lock of {tmp_path} left by repa precompute (host {socket.gethostname()}, pid {pid}" in capsys.readouterr().err


def test_a_reused_pid_is_stale(tmp_path):
    _lock(tmp_path, pid_start="1")  # our pid, but not our process's start time
    assert is_stale(json.loads((tmp_path / LOCK_FILE).read_text()))


def test_another_hosts_lock_is_refused_saying_how_to_remove_it(tmp_path):
    _lock(tmp_path, host="gpu-node-7", pid=_dead_pid())
    with pytest.raises(LockHeld) as e:
        acquire(store_path(tmp_path), "repa precompute")
    assert str(e.value) == (f"{tmp_path} is being written by repa precompute (host gpu-node-7, pid "
                            f"{json.loads((tmp_path / LOCK_FILE).read_text())['pid']}, started 2026-01-01T00:00:00+00:00); "
                            f"if that writer is gone, delete {tmp_path / LOCK_FILE} and run again")


def test_an_unreadable_lock_is_refused(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{torn")
    with pytest.raises(LockHeld, match=r"is locked by another writer \(.*_lock.json is unreadable\); if no writer is running, delete"):
        acquire(store_path(tmp_path), "x")


def _race(root: str, q, done) -> None:
    try:
        acquire(store_path(root), "racer")
        q.put("won")
        done.wait(30)  # hold it (alive) until every racer has tried
    except LockHeld:
        q.put("refused")


def test_racing_writers_one_wins_even_on_a_stale_lock(tmp_path):
    _lock(tmp_path, pid=_dead_pid())
    ctx = mp.get_context("fork")
    q, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), q, done)) for _ in range(6)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=HUNG) for _ in procs)
    done.set()
    for p in procs:
        p.join(30)
    assert results == ["refused"] * 5 + ["won"]
