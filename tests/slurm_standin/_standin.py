"""Shared state of the Slurm stand-ins (sbatch, sacct, squeue, srun, scancel, scontrol, sinfo, sacctmgr,
sshare): a "cluster" of NODES whose jobs are local background processes; a job of several nodes (--nodes)
runs its batch script once (on its first node), and srun starts one local process per task of a step, each
with the node's SLURM_NODEID, SLURM_PROCID, SLURMD_NODENAME, ...

Everything lives in $STANDIN_SLURM_DIR (not SLURM_*: the slurm-jobstep executor strips SLURM_* variables, but
a few, from the environment of the srun it starts inside a job):
  next_jobid           job id counter
  jobs/<id>.json       one record per job (options, state, exit code, pids); jobs/<id>.sh its batch script
  steps/<id>.<n>.json  one record per srun step inside job <id> (argv, options, command; per task its node,
                       ranks and SLURM_* environment)
  sbatch.jsonl         argv and outcome of every sbatch call
  calls.jsonl          argv of every stand-in call (which command asked what)
Other settings (environment):
  STANDIN_SLURM_PARTITIONS  comma-separated partitions, the first is the default (default: standin)
  STANDIN_SLURM_ACCOUNTS    comma-separated accounts of the user (default: standin)
  STANDIN_SLURM_FAIL_RULES  comma-separated Snakemake rule names whose jobs exit 1 without running

Run as `python3 _standin.py run-job ID`: the detached process that runs one job (started by sbatch).
"""

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

CLUSTER = "standin"
# The nodes are loopback addresses: a name taken from the nodelist (e.g. a c10d rendezvous on the first node)
# resolves to this machine without /etc/hosts entries.
NODES = tuple(f"127.0.0.{i}" for i in range(1, 9))
NODE = NODES[0]
MIN_JOB_AGE = 300  # seconds a finished job stays visible to squeue (scontrol show config: MinJobAge)
MAX_ARRAY_SIZE = 1001
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def fail(command: str, message: str, code: int = 1):
    """Exit like a Slurm client does on a bad request: 'command: error: message' on stderr."""
    print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(code)


def state_dir() -> str:
    path = os.environ.get("STANDIN_SLURM_DIR")
    if not path:
        fail(os.path.basename(sys.argv[0]), "STANDIN_SLURM_DIR is not set (the stand-in's state folder)")
    for sub in ("jobs", "steps"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    return path


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def partitions() -> list[str]:
    return env_list("STANDIN_SLURM_PARTITIONS", CLUSTER)


def accounts() -> list[str]:
    return env_list("STANDIN_SLURM_ACCOUNTS", CLUSTER)


@contextlib.contextmanager
def locked():
    """One lock for the whole state folder: sbatch calls and job updates come from several processes."""
    with open(os.path.join(state_dir(), ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_jsonl(name: str, entry: dict):
    with locked(), open(os.path.join(state_dir(), name), "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def log_call(command: str, argv: list[str]):
    append_jsonl("calls.jsonl", {"command": command, "argv": argv, "time": time.time()})


def write_json(path: str, data: dict):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)  # readers never see a half-written record


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def job_path(jobid: str) -> str:
    return os.path.join(state_dir(), "jobs", f"{jobid}.json")


def next_jobid() -> str:
    with locked():
        path = os.path.join(state_dir(), "next_jobid")
        jobid = int(open(path).read()) if os.path.exists(path) else 4001
        with open(path, "w") as handle:
            handle.write(str(jobid + 1))
    return str(jobid)


def load_job(jobid: str) -> dict | None:
    path = job_path(jobid)
    return read_json(path) if os.path.exists(path) else None


def update_job(jobid: str, **changes) -> dict:
    with locked():
        record = read_json(job_path(jobid))
        record.update(changes)
        write_json(job_path(jobid), record)
    return record


def all_jobs() -> list[dict]:
    folder = os.path.join(state_dir(), "jobs")
    names = [n for n in os.listdir(folder) if n.endswith(".json")]
    return sorted((read_json(os.path.join(folder, n)) for n in names), key=lambda r: int(r["jobid"]))


def job_steps(jobid: str) -> list[dict]:
    folder = os.path.join(state_dir(), "steps")
    names = [n for n in os.listdir(folder) if n.startswith(f"{jobid}.") and n.endswith(".json")]
    return sorted((read_json(os.path.join(folder, n)) for n in names), key=lambda r: r["step"])


def job_nodes(record: dict | None) -> list[str]:
    """The nodes of a job's allocation (the first NODES; records of the one-node stand-in: its node)."""
    return list((record or {}).get("nodes") or [NODE])


def hostlist(names: list[str]) -> str:
    """Slurm's compact node list: ['127.0.0.1', '127.0.0.2', '127.0.0.4'] -> '127.0.0.[1-2,4]'."""
    prefix = os.path.commonprefix(names).rstrip("0123456789")
    if len(names) == 1 or not all(n[len(prefix):].isdigit() for n in names):
        return ",".join(names)
    numbers, ranges = sorted(int(n[len(prefix):]) for n in names), []
    for number in numbers:
        if ranges and ranges[-1][1] == number - 1:
            ranges[-1][1] = number
        else:
            ranges.append([number, number])
    return prefix + "[" + ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges) + "]"


def expand_hostlist(spec: str) -> list[str]:
    """`scontrol show hostnames`: 'a[1-2,4],b' -> ['a1', 'a2', 'a4', 'b']."""
    names = []
    for prefix, ranges, plain in re.findall(r"([^,\[]*)\[([^\]]*)\]|([^,\[\]]+)", spec):
        if plain:
            names.append(plain)
            continue
        for item in ranges.split(","):
            first, _, last = item.partition("-")
            names += [f"{prefix}{k:0{len(first)}d}" for k in range(int(first), int(last or first) + 1)]
    return names


def rule_of(comment: str) -> str:
    """The Snakemake rule in the slurm plugin's --comment: rule_<name> or rule_<name>_wildcards_<values>."""
    match = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment or "")
    return match.group(1) if match else ""


def exit_code_field(code: int | None) -> str:
    """sacct's ExitCode: '<exit status>:<signal>'."""
    if code is None:
        return "0:0"
    return f"{code}:0" if code >= 0 else f"0:{-code}"


def parse_minutes(spec: str) -> int | None:
    """Slurm --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]];
    0 for no limit (UNLIMITED), None if malformed."""
    if spec.strip().lower() in ("unlimited", "infinite"):
        return 0
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec.strip())
    if not match:
        return None
    days, first, second, third = match.groups()
    if days is not None:
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return int(days) * 1440 + hours * 60 + minutes + (seconds > 0)
    if third is not None:
        return int(first) * 60 + int(second) + (int(third) > 0)
    return int(first) + (second is not None and int(second) > 0)


def parse_options(command: str, argv: list[str], value_opts: dict, flag_opts: dict,
                  stop_at_positional: bool) -> tuple[dict, list[str]]:
    """getopt-like parsing of Slurm client options.

    value_opts/flag_opts map every spelling ('--mem', '-t') to a canonical name. '--opt=value', '--opt value',
    '-tvalue', '-t value' and clustered short flags ('-nu user') are accepted; an unknown option is an error,
    as with the real clients. stop_at_positional: the rest after the first positional is the command/script.
    """
    options, positional = {}, []
    i = 0

    def next_arg(missing: str) -> str:  # an option's value given as the next argument
        nonlocal i
        i += 1
        if i >= len(argv):
            fail(command, missing)
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional += argv[i + 1:]
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name in value_opts:
                if not eq:
                    value = next_arg(f"option '{name}' requires an argument")
                options[value_opts[name]] = value
            elif name in flag_opts and not eq:
                options[flag_opts[name]] = True
            else:
                fail(command, f"unrecognized option '{arg}'")
        elif arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                short = f"-{arg[j]}"
                if short in value_opts:
                    value = arg[j + 1:]
                    if not value:
                        value = next_arg(f"option requires an argument -- '{arg[j]}'")
                    options[value_opts[short]] = value
                    break
                if short in flag_opts:
                    options[flag_opts[short]] = True
                    j += 1
                    continue
                fail(command, f"invalid option -- '{arg[j]}'")
        else:
            positional.append(arg)
            if stop_at_positional:
                positional += argv[i + 1:]
                break
        i += 1
    return options, positional


DEFAULT_WIDTHS = {"jobid": 12, "jobidraw": 12, "reason": 20, "nodelist": 15, "comment": 15, "submit": 19,
                  "start": 19, "end": 19}


def format_table(rows: list[list[str]], headers: list[str], widths: list[int | None], parsable: str | None,
                 noheader: bool) -> str:
    """sacct/sshare-style output: 'a|b' (--parsable2), 'a|b|' (--parsable) or fixed-width columns
    (width from 'Field%N', '%-N' left-justified, default 10 or DEFAULT_WIDTHS; longer values are cut and
    end in '+')."""
    widths = [w if w is not None else DEFAULT_WIDTHS.get(h.lower()) for h, w in zip(headers, widths, strict=True)]
    lines = []
    if parsable:
        end = "|" if parsable == "parsable" else ""
        if not noheader:
            lines.append("|".join(headers) + end)
        lines += ["|".join(row) + end for row in rows]
        return "".join(line + "\n" for line in lines)

    def cell(value: str, width: int | None) -> str:
        size = abs(width) if width else 10
        if len(value) > size:
            value = value[:size - 1] + "+"
        return value.ljust(size) if width is not None and width < 0 else value.rjust(size)

    if not noheader:
        lines.append(" ".join(cell(h, w) for h, w in zip(headers, widths, strict=True)))
        lines.append(" ".join("-" * (abs(w) if w else 10) for w in widths))
    lines += [" ".join(cell(v, w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "".join(line + "\n" for line in lines)


def parse_fields(spec: str) -> list[tuple[str, int | None]]:
    """'JobIdRaw,State' or 'Account%256' / 'nodelist%-256' -> [(field, width)]."""
    fields = []
    for item in spec.split(","):
        name, _, width = item.strip().partition("%")
        fields.append((name, int(width) if width else None))
    return fields


def run_job(jobid: str):
    """The job itself: runs the batch script as its own process group and records how it ended.

    Started detached by sbatch with stdout/stderr already on the job's --output file. scancel and this
    runner change the record under the lock, so a cancel lands before the start, or kills the started group.
    """
    with locked():
        record = read_json(job_path(jobid))
        if record.get("cancelled"):
            return  # cancelled while pending: scancel has recorded it
        record.update(state="RUNNING", start_time=time.time(), runner_pid=os.getpid(), node=job_nodes(record)[0])
        write_json(job_path(jobid), record)
    node = record["node"]
    if rule_of(record["comment"]) in env_list("STANDIN_SLURM_FAIL_RULES", ""):
        print(f"slurmstepd: error: *** JOB {jobid} ON {node} made to fail by STANDIN_SLURM_FAIL_RULES ***",
              flush=True)
        update_job(jobid, state="FAILED", exit_code=1, end_time=time.time())
        return
    proc = subprocess.Popen([record["script"], *record["script_args"]], cwd=record["workdir"],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    with locked():
        record = read_json(job_path(jobid))
        record["pgid"] = proc.pid
        write_json(job_path(jobid), record)
        if record.get("cancelled"):
            os.killpg(proc.pid, signal.SIGTERM)
    limit = record["time_limit_min"]
    try:
        code = proc.wait(timeout=limit * 60 if limit else None)
        timed_out = False
    except subprocess.TimeoutExpired:
        print(f"slurmstepd: error: *** JOB {jobid} ON {node} CANCELLED DUE TO TIME LIMIT ***", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        timed_out = True
    with locked():
        record = read_json(job_path(jobid))
        if record.get("cancelled"):
            state = "CANCELLED"
        elif timed_out:
            state = "TIMEOUT"
        else:
            state = "COMPLETED" if code == 0 else "FAILED"
        record.update(state=state, exit_code=code, end_time=time.time())
        write_json(job_path(jobid), record)


def submit_host() -> str:
    return socket.gethostname()


if __name__ == "__main__":
    if sys.argv[1:2] == ["run-job"] and len(sys.argv) == 3:
        run_job(sys.argv[2])
    else:
        fail("_standin.py", "usage: _standin.py run-job JOBID")
