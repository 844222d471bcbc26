"""Run an msrun job under a hard timeout and collect its logs (used by the msrun tests and scripts).

msrun starts `python` from PATH, so the interpreter running this module (its bin directory) is put first
on PATH. The job runs in its own process group in a working directory of the caller's choice (MindSpore
writes rank_*/ and kernel_meta/ there); on timeout the whole group is killed, so nothing is left behind.
A worker that dies makes msrun (--join=True) exit non-zero; the hard timeout is the backstop for a hang.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence


@dataclass
class MsrunResult:
    """rc: msrun's exit status (124 when the timeout killed it); logs: file name -> text for every file in
    the log dir (scheduler.log, worker_N.log); output: msrun's own stdout+stderr; seconds: wall time."""

    rc: int
    timed_out: bool
    seconds: float
    output: str
    logs: Dict[str, str] = field(default_factory=dict)
    killed: bool = False

    def worker_log(self, rank: int) -> str:
        return self.logs.get(f"worker_{rank}.log", "")

    def all_logs(self) -> str:
        return "\n".join(f"===== {name} =====\n{text}" for name, text in sorted(self.logs.items()))


def free_port() -> int:
    """A TCP port that was free a moment ago (msrun's scheduler binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list:
    """Every live process below `pid` (from /proc), children first."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def run_msrun(script: str, args: Sequence[str] = (), workers: int = 2, timeout: float = 300.0,
              workdir: Optional[str] = None, env: Optional[Dict[str, str]] = None,
              cluster_time_out: int = 60, kill_when: Optional[Callable[[], bool]] = None) -> MsrunResult:
    """Launch `msrun --worker_num=workers --local_worker_num=workers ... python script args` and wait at
    most `timeout` seconds. Logs go to `workdir/msrun_logs`. `kill_when` (polled about every millisecond
    while the job runs): once it returns True the whole job is killed with SIGKILL (result.killed)."""
    workdir = Path(workdir or os.getcwd())
    log_dir = workdir / "msrun_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    msrun = os.path.join(bin_dir, "msrun")
    if not os.path.exists(msrun):
        raise FileNotFoundError(f"msrun not found beside {sys.executable}; is mindspore installed there?")
    run_env = dict(os.environ)
    run_env.update(env or {})
    run_env["PATH"] = bin_dir + os.pathsep + run_env.get("PATH", "")
    # workers import the same telechat2_ms as this process (a checkout that is not pip-installed too)
    package_root = str(Path(__file__).resolve().parents[2])
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, run_env.get("PYTHONPATH", "")) if p)
    run_env.setdefault("GLOG_v", "3")
    cmd = [msrun, f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}",
           f"--log_dir={log_dir}", "--join=True", f"--cluster_time_out={cluster_time_out}",
           str(script), *map(str, args)]
    start = time.monotonic()
    output_path = log_dir / "msrun_output.txt"
    with open(output_path, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, cwd=workdir, env=run_env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    timed_out = killed = False
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            timed_out = True
            break
        if kill_when is not None and kill_when():
            killed = True
            break
        time.sleep(0.001 if kill_when is not None else 0.05)
    # kill -9 on timeout or kill_when (msrun's workers first: they are not all in its process group); after
    # a normal end, make sure no worker outlives msrun
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    rc = 124 if timed_out else proc.returncode
    logs = {p.name: p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log"))}
    return MsrunResult(rc=rc, timed_out=timed_out, seconds=time.monotonic() - start,
                       output=output_path.read_text(errors="replace"), logs=logs, killed=killed)
