"""Clear the Snakemake lock that a killed run left behind, so that `make run` resumes by itself.

Snakemake locks the outputs of a run in `.snakemake/locks/` and removes the lock when it ends; a run
killed by SIGKILL, an OOM killer or a lost session never removes it, and every later run stops with
`LockException` until `snakemake --unlock`. The lock is stale when no process of the killed run is
alive any more: no Snakemake and no stage (`python -m longrope2.<stage>`) with this folder as its
working directory. Then this runs `snakemake --unlock` with the user's arguments; while any such
process lives, it leaves the lock alone and names the processes.

    python -m longrope2.stale_lock [snakemake arguments]      # `make run` calls it before snakemake
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# argv words that mark a process of a pipeline run: Snakemake itself, its job wrappers and the stages
PIPELINE_WORDS = ("snakemake", "longrope2.")


@dataclass(frozen=True)
class Process:
    pid: int
    cwd: Path
    argv: tuple[str, ...]


def working_directory(args: list[str]) -> Path:
    """The folder Snakemake runs in: --directory / -d, else the current one."""
    for i, arg in enumerate(args):
        if arg in ("--directory", "-d") and i + 1 < len(args):
            return Path(args[i + 1]).resolve()
        if arg.startswith("--directory="):
            return Path(arg.split("=", 1)[1]).resolve()
    return Path.cwd().resolve()


def lock_files(workdir: Path) -> list[Path]:
    folder = workdir / ".snakemake" / "locks"
    return sorted(folder.glob("*.lock")) if folder.is_dir() else []


def processes(proc: Path = Path("/proc")) -> list[Process]:
    """Every process whose argv and working directory this user may read (Linux /proc)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = tuple(a for a in (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if a)
            cwd = (entry / "cwd").resolve(strict=True)
        except OSError:  # gone meanwhile, a kernel thread, or another user's
            continue
        found.append(Process(int(entry.name), cwd, argv))
    return found


def pipeline_processes(workdir: Path, candidates: list[Process], own_pid: int) -> list[Process]:
    """The processes of a run in workdir: Snakemake or a stage, started in that folder."""
    return [p for p in candidates
            if p.pid != own_pid and p.cwd == workdir and any(w in a for a in p.argv for w in PIPELINE_WORDS)]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    workdir = working_directory(args)
    locks = lock_files(workdir)
    if not locks:
        return 0
    alive = pipeline_processes(workdir, processes(), os.getpid())
    if alive:
        listed = "; ".join(f"pid {p.pid}: {' '.join(p.argv)[:120]}" for p in alive)
        print(f"stale_lock: {workdir} is locked and a run is still alive there ({listed}); the lock is kept",
              file=sys.stderr)
        return 0  # snakemake itself then reports the lock
    print(f"stale_lock: {len(locks)} lock file(s) in {workdir / '.snakemake' / 'locks'} and no run alive there: "
          "a killed run left them; running snakemake --unlock", file=sys.stderr)
    unlock = subprocess.run([sys.executable, "-m", "snakemake", "--unlock", *args], cwd=workdir)
    return unlock.returncode


if __name__ == "__main__":
    raise SystemExit(main())
