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
from typing import Dict, Optional, Sequence


@dataclass
class MsrunResult:
    """rc: msrun's exit status (124 when the timeout killed it); logs: file name -> text for every file in
    the log dir (scheduler.log, worker_N.log); output: msrun's own stdout+stderr; seconds: wall time."""

    rc: int
    timed_out: bool
    seconds: float
    output: str
    logs: Dict[str, str] = field(default_factory=dict)

    def worker_log(self, rank: int) -> str:
        return self.logs.get(f"worker_{rank}.log", "")

    def all_logs(self) -> str:
        return "\n".join(f"===== {name} =====\n{text}" for name, text in sorted(self.logs.items()))


def free_port() -> int:
    """A TCP port that was free a moment ago (msrun's scheduler binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_msrun(script: str, args: Sequence[str] = (), workers: int = 2, timeout: float = 300.0,
              workdir: Optional[str] = None, env: Optional[Dict[str, str]] = None,
              cluster_time_out: int = 60) -> MsrunResult:
    """Launch `msrun --worker_num=workers --local_worker_num=workers ... python script args` and wait at
    most `timeout` seconds. Logs go to `workdir/msrun_logs`."""
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
    proc = subprocess.Popen(cmd, cwd=workdir, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc = 124
    else:
        try:  # msrun has returned; make sure no worker of its group outlives it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    logs = {p.name: p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log"))}
    return MsrunResult(rc=rc, timed_out=timed_out, seconds=time.monotonic() - start, output=output or "",
                       logs=logs)
