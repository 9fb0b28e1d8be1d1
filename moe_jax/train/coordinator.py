"""The coordination service of a several-process run, in a process of its own, so that losing process 0 is a lost
process like any other.

`jax.distributed.initialize` starts the coordination service (the key-value store, barriers and heartbeats that every
process's client talks to) inside process 0. When process 0 is killed (kill -9, the OOM killer), each other process's
client sees its connection reset at once and the runtime aborts that process from C++ (`client.h: Terminating process
because the JAX distributed service detected fatal errors`, then a 60-line stack dump), 0.3 s after the kill on this
machine (jax 0.10.2), before any Python code of the survivor can act: the client's `missed_heartbeat_callback` cannot
be given from Python (jaxlib 0.10.2 cannot convert the status it passes: `std::bad_cast`, which terminates too), and
no option turns the client's error polling off.

So `initialize` (used instead of `jax.distributed.initialize`) has process 0 run the service in a child process,
`python -m moe_jax.train.coordinator`, with exactly the arguments JAX would have used, and everything else as JAX does
it. When process 0 dies the service lives on, process 0's heartbeat stops like any other process's, and
`preemption.PeerWatchdog` ends the survivors with one `error:` line naming process 0 (exit status 4).

The child ignores SIGINT and SIGTERM and runs in its own session: a preempted job's processes still need the service to
agree on a step and save it, and Ctrl-C at a terminal is for the trainer. It ends when process 0 has gone (it is no longer
process 0's child, or its stdin, a pipe from process 0, reached end of file: process 0 exited, whatever the way, or
called `jax.distributed.shutdown`)
and no client is connected to it any more (Linux: the established connections to its port in /proc/net/tcp{,6}), at
the latest LINGER_S after process 0 went: well after the survivors' watchdogs have judged process 0 lost.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import signal
import subprocess
import sys
import time

LINGER_S = 90.0  # > preemption.PEER_TIMEOUT_S (30 s) + its heartbeat period, with room for a loaded host
START_TIMEOUT_S = 120.0
READY = "ready"


class ServiceError(RuntimeError):
    """The coordination service could not start (e.g. its port is taken)."""


class ServiceProcess:
    """What `jax.distributed.global_state.service` holds on process 0: the child serving the coordination service.
    `shutdown()` (called by `jax.distributed.shutdown`) tells it that process 0 is done with it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def shutdown(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()


def start_service(address: str, num_nodes: int, heartbeat_timeout: int | None = None,
                  shutdown_timeout: int | None = None, recoverable: bool | None = None,
                  **unknown) -> ServiceProcess:
    """Start the child serving the coordination service on `address` (the signature of jaxlib's
    `get_distributed_runtime_service`, which it replaces on process 0); returns once the service listens. A service
    that cannot start (the port is taken, ...) raises ServiceError with the child's one-line reason."""
    if unknown:  # a jaxlib whose service takes arguments this file does not know: do not guess what they mean
        raise RuntimeError(f"moe_jax.train.coordinator: unexpected service arguments {sorted(unknown)} (jaxlib "
                           "changed): update start_service")
    cmd = [sys.executable, "-m", "moe_jax.train.coordinator", "--address", address, "--num_nodes", str(num_nodes)]
    for flag, value in (("--heartbeat_timeout", heartbeat_timeout), ("--shutdown_timeout", shutdown_timeout)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--recoverable"] if recoverable else []
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    # stderr: the service's own log lines (a task's missed heartbeats, ...) say what the processes' logs say too,
    # and would land in a log whose process is gone
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)
    line = _read_line(proc, START_TIMEOUT_S)
    if line != READY:
        proc.kill()
        why = line or (f"it ended with status {proc.wait()}" if proc.poll() is not None
                       else f"no answer in {START_TIMEOUT_S:.0f} s")
        raise ServiceError(f"the coordination service on {address} did not start ({why})")
    return ServiceProcess(proc)


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
    return proc.stdout.readline().strip()


def initialize(**init_args) -> None:
    """`jax.distributed.initialize(**init_args)`, except that process 0 serves the coordination service from a child
    process (the module docstring says why)."""
    import jax
    from jax._src import distributed

    lib = distributed._jax
    original = lib.get_distributed_runtime_service
    lib.get_distributed_runtime_service = start_service  # called by initialize on process 0 only
    try:
        jax.distributed.initialize(**init_args)
    finally:
        lib.get_distributed_runtime_service = original


def connected_clients(port: int) -> int | None:
    """The established TCP connections whose local port is `port` (clients of a server on it); None where
    /proc/net/tcp is not readable (not Linux)."""
    count, readable = 0, False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count if readable else None


def linger(port: int, linger_s: float = LINGER_S, poll_s: float = 1.0) -> float:
    """After process 0 went: wait while clients are connected to `port`, at most `linger_s`; returns the wait."""
    start = time.monotonic()
    while time.monotonic() - start < linger_s:
        if connected_clients(port) == 0:
            break
        time.sleep(poll_s)
    return time.monotonic() - start


def port_problem(address: str) -> str:
    """"cannot listen on port P: ..." if `address` (HOST:PORT, HOST may be [v6]) is taken, else "": checked before
    jaxlib tries, whose service on a taken port crashes the process (SIGSEGV) in about half the tries instead of
    raising."""
    import socket

    host, port = address.rsplit(":", 1)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                                              type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a port in TIME_WAIT is free
            sock.bind(sockaddr)
    except OSError as e:  # anything but a taken port (no IPv6 on this host, ...) is left to jaxlib to judge
        if e.errno == errno.EADDRINUSE:
            return f"cannot listen on port {port}: {e.strerror}"
    except ValueError:
        pass
    return ""


def wait_for_parent(ppid: int, poll_s: float = 1.0) -> None:
    """Return when process 0 (`ppid`) has closed our stdin or exited (a process it forked may hold the pipe open)."""
    with selectors.DefaultSelector() as sel:
        sel.register(sys.stdin, selectors.EVENT_READ)
        while os.getppid() == ppid:
            if sel.select(poll_s) and not os.read(sys.stdin.fileno(), 4096):
                return


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="the coordination service of a moe_jax run (started by process 0)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--num_nodes", type=int, required=True)
    parser.add_argument("--heartbeat_timeout", type=int)
    parser.add_argument("--shutdown_timeout", type=int)
    parser.add_argument("--recoverable", action="store_true")
    parser.add_argument("--linger_s", type=float, default=LINGER_S)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from jaxlib import _jax

    problem = port_problem(args.address)
    if problem:
        print(problem, flush=True)
        sys.exit(2)
    kwargs = {k: v for k, v in (("heartbeat_timeout", args.heartbeat_timeout),
                                ("shutdown_timeout", args.shutdown_timeout)) if v is not None}
    try:
        service = _jax.get_distributed_runtime_service(args.address, args.num_nodes, recoverable=args.recoverable,
                                                       **kwargs)
    except Exception as e:  # the one line process 0 reports
        print(" ".join(str(e).split()) or type(e).__name__, flush=True)
        sys.exit(2)
    print(READY, flush=True)
    wait_for_parent(os.getppid())
    linger(int(args.address.rsplit(":", 1)[1]), args.linger_s)
    del service  # held until here: the service serves as long as it is referenced
    os._exit(0)  # the service's own shutdown would wait for clients that are gone


if __name__ == "__main__":
    main()
