"""`make run` clears a lock that a killed run left behind, and only then: longrope2.stale_lock."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

from longrope2 import stale_lock


def _lock(folder: Path) -> Path:
    lock = folder / ".snakemake" / "locks" / "0.output.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(folder / "results") + "\n")
    return lock


def _run(folder: Path) -> subprocess.CompletedProcess:
    args = ["--snakefile", str(REPO / "Snakefile"), "--config", "experiment=smoke"]
    return subprocess.run([sys.executable, "-m", "longrope2.stale_lock", *args], cwd=folder,
                          capture_output=True, text=True, timeout=300)


def test_the_working_directory_follows_snakemakes_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stale_lock.working_directory([]) == tmp_path.resolve()
    assert stale_lock.working_directory(["--cores", "2", "--directory", "/x"]) == Path("/x")
    assert stale_lock.working_directory(["-d", "/y", "all"]) == Path("/y")
    assert stale_lock.working_directory(["--directory=/z"]) == Path("/z")


def test_only_a_pipeline_process_in_the_folder_holds_the_lock(tmp_path):
    here, there = tmp_path / "a", tmp_path / "b"
    procs = [stale_lock.Process(1, here, ("python", "-m", "snakemake", "--cores", "2")),
             stale_lock.Process(2, here, ("python", "-m", "longrope2.train", "out_dir=x")),
             stale_lock.Process(3, here, ("bash",)),
             stale_lock.Process(4, there, ("snakemake",)),
             stale_lock.Process(5, here, ("python", "-m", "longrope2.stale_lock"))]
    assert [p.pid for p in stale_lock.pipeline_processes(here, procs, own_pid=5)] == [1, 2]
    assert stale_lock.pipeline_processes(there, procs, own_pid=5)[0].pid == 4


def test_a_lock_is_kept_while_a_run_lives_and_cleared_once_it_is_gone(tmp_path):
    lock = _lock(tmp_path)
    # a live process in the folder whose argv names snakemake (bash's exec -a sets argv[0])
    alive = subprocess.Popen(["bash", "-c", "exec -a snakemake-job sleep 60"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not any(p.pid == alive.pid for p in stale_lock.pipeline_processes(
                tmp_path.resolve(), stale_lock.processes(), own_pid=0)):
            assert time.monotonic() < deadline, "the stand-in process never showed up in /proc"
            time.sleep(0.05)
        kept = _run(tmp_path)
        assert kept.returncode == 0 and lock.exists()
        assert f"pid {alive.pid}: snakemake-job 60" in kept.stderr and "the lock is kept" in kept.stderr
    finally:
        alive.kill()
        alive.wait()
    cleared = _run(tmp_path)
    assert cleared.returncode == 0, cleared.stderr[-3000:]
    assert "no run alive there" in cleared.stderr and not lock.exists()
    assert _run(tmp_path).stderr == ""  # nothing locked: nothing to say, snakemake is not even started
