"""Start N processes of one command on this machine, as one multi-process JAX program.

    dsjax-launch -n 2 -- dsjax-train --distributed mesh.data=2 mesh.fsdp=2 mesh.expert=2
    dsjax-launch -n 4 --devices 2 -- python train.py --distributed ...

Each process gets its id, the process count and process 0's coordinator address through the
environment (``dsjax.parallel.distributed``) and, on a CPU host, ``--devices`` CPU devices. Their
output is prefixed with their id. If one fails, the others are stopped; the exit status is the
first failure's (0 when all succeed). On a pod, run ``dsjax-train --distributed`` on every host
instead: JAX finds its peers itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _relay(proc: subprocess.Popen, prefix: str, out) -> None:
    for line in proc.stdout:
        out.write(prefix + line)
        out.flush()


def launch(command: list[str], n: int, devices: int | None = None, heartbeat_s: int = 30) -> int:
    """Runs ``command`` as processes 0 .. n-1; returns the exit status (the first failure's, else 0)."""
    port = free_port()
    procs = []
    for i in range(n):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", DSJAX_NUM_PROCESSES=str(n),
                   DSJAX_PROCESS_ID=str(i), DSJAX_HEARTBEAT_TIMEOUT=str(heartbeat_s), PYTHONUNBUFFERED="1")  # fmt: skip
        if devices:
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
            env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_relay, args=(proc, f"[{i}] ", sys.stdout), daemon=True).start()
        procs.append(proc)
    status, deadline = 0, None
    try:
        while True:
            running = any(p.poll() is None for p in procs)
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed and not status:  # the others would wait for it until their heartbeat times out
                i, code = min(failed, key=lambda f: f[1] != -signal.SIGKILL)  # a killed one is the cause
                status = _exit_status(code)
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
                print(f"dsjax-launch: process {i} exited with {how}; stopping the others", file=sys.stderr)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                deadline = time.time() + heartbeat_s + 30
            if not running:
                break
            if deadline and time.time() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        status = 130
    for p in procs:
        p.wait()
    return status


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by a signal: 128 + its number, as a shell says


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsjax-launch", description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--processes", type=int, required=True, help="how many processes")
    ap.add_argument("--devices", type=int, help="CPU devices per process (a CPU host; default: JAX's)")
    ap.add_argument("--heartbeat-timeout", type=int, default=30, help="seconds before the others give up on a dead one")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. dsjax-train --distributed ...")
    a = ap.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command or a.processes < 1:
        ap.error("need -n N >= 1 and a command after --")
    return launch(command, a.processes, a.devices, a.heartbeat_timeout)


if __name__ == "__main__":
    sys.exit(main())
