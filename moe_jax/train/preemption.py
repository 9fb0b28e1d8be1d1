"""Stopping every process of a run at the same step: signals, Cloud TPU maintenance events, and the agreed stop.

A preemption reaches one host (SIGTERM from the scheduler, SIGINT from a terminal, a Cloud TPU maintenance event),
but every process must save the same step: orbax's save is a collective, and a process that left the loop early
would leave the others hanging in the next step's all-reduce. So:

  * `LocalStop` catches SIGTERM/SIGINT in this process and records the request (`request()` does the same for other
    notices, e.g. `MaintenanceWatcher`);
  * `AgreedStop.check(step)`, called by every process after every step, returns the same answer on every process:
    with one process it is the local request; with several, every `every` steps each process publishes its request
    in the coordination service's key-value store (the one `jax.distributed.initialize` started), all meet at a
    barrier, and each reads the whole directory: the union is the same everywhere, so all stop after the same step.

Why not `jax.experimental.multihost_utils.reached_preemption_sync_point`: on jax 0.10.2 CPU its SIGTERM notifier
swallowed the signal but the sync point never came (2 processes, 3000 steps after the SIGTERM: docs/decisions.md),
it needs its C++ SIGTERM handler (which a Python handler replaces) and it knows nothing of SIGINT or maintenance
events. The barrier costs one round trip to process 0's coordinator and does not touch the devices, so it does not
stall the asynchronous dispatch of steps (measured in docs/decisions.md).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import threading
import time
import urllib.request

# The exit status of `python -m moe_jax.train` when a signal or maintenance event stopped it before train.steps
# (after saving): a scheduler can tell "preempted, resubmit" from success (0) and errors (1, 2).
EXIT_PREEMPTED = 3

BARRIER_TIMEOUT_MS = 10 * 60 * 1000


SIGNALS = (signal.SIGTERM, signal.SIGINT)


class LocalStop:
    """Context manager: while inside, SIGTERM and SIGINT set `.reason` instead of killing the process (main thread
    only; elsewhere signals keep their handlers). `request(reason)` sets it from other code. With a SignalWatcher
    running (the command line's), the watcher delivers the signals to it at once, with an acknowledgement naming
    `next_check` (the step after which the loop next asks whether to stop: the loop keeps it current)."""

    def __init__(self):
        self.reason: str | None = None
        self.next_check: int | None = None
        self._old = {}
        self._watcher = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _handle(self, signum, frame):
        self.request(f"signal {signal.Signals(signum).name}")

    def __enter__(self):
        if _watcher is not None:
            self._watcher, _watcher.target = _watcher, self
        elif threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        if self._watcher is not None:
            self._watcher.target = None
        for sig, old in self._old.items():
            # None: the old handler was installed outside Python (e.g. by JAX's preemption notifier); fall back
            signal.signal(sig, signal.SIG_DFL if old is None else old)


class SignalWatcher:
    """SIGTERM/SIGINT acted on at once, whatever the main thread is doing, for the life of a command (`python -m
    moe_jax.train` starts one first thing: `start()`).

    Python runs a signal handler only in the main thread between bytecodes, so a signal arriving while the main thread
    waits inside XLA (compiling for minutes; a long step run inline) would be seen only when that call returns. The C
    handler Python installs also writes the signal's number to the wakeup fd (signal.set_wakeup_fd): a daemon thread
    reads it there and acts at once, costing the train loop nothing:
      * outside the train loop (`phase`: starting, preparing data, compiling, restoring, writing the summary) nothing
        is being saved: one line on stderr names the signal and the phase, and the process ends with EXIT_PREEMPTED
        (os._exit: the main thread may be inside XLA and cannot unwind; the workdir's flock ends with the process;
        every file the trainer writes is written to a temporary name and renamed);
      * inside the loop (`target`: the loop's LocalStop) it requests the stop and prints the acknowledgement ("stop
        requested (SIGTERM): saving after step N ...") while the step still runs; the loop saves after step N.
    """

    def __init__(self):
        self.phase = "starting"
        self.target: LocalStop | None = None
        self._lock = threading.Lock()
        self._acknowledged = False
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)

    def start(self) -> "SignalWatcher":
        """Install the handlers (main thread only) and start the watching thread; becomes the process's watcher."""
        global _watcher
        self.install()
        threading.Thread(target=self._run, name="signal-watcher", daemon=True).start()
        _watcher = self
        return self

    def install(self) -> None:
        """(Re)install the handlers and the wakeup fd. Call again after anything that installs its own: the
        coordination client of jax.distributed.initialize puts a C++ SIGTERM handler (its preemption notifier) in
        place of Python's, after which a SIGTERM would no longer reach this watcher."""
        for sig in SIGNALS:
            signal.signal(sig, lambda signum, frame: None)  # the work is done by the thread, from the wakeup fd
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)

    def _run(self) -> None:
        while True:
            for signum in self._read.recv(64):
                if signum in SIGNALS:
                    self.deliver(signum)

    def deliver(self, signum: int) -> None:
        """Act on signal `signum` as described in the class docstring."""
        name = signal.Signals(signum).name
        with self._lock:
            target = self.target
            if target is None:
                sys.stdout.flush()
                print(f"interrupted by {name} while {self.phase}: nothing was being saved (the newest checkpoint, if "
                      f"any, is intact); exit status {EXIT_PREEMPTED}: run the same command to resume",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_PREEMPTED)
            target.request(f"signal {name}")
            if not self._acknowledged:
                self._acknowledged = True
                after = f"step {target.next_check}" if target.next_check is not None else "the current step"
                print(f"stop requested ({name}): saving after {after}, then exiting with status {EXIT_PREEMPTED}",
                      flush=True)


_watcher: SignalWatcher | None = None


def set_phase(phase: str) -> None:
    """Name what the command is doing now (`interrupted by SIGTERM while <phase>`); a no-op without a watcher."""
    if _watcher is not None:
        _watcher.phase = phase


def _client():
    from jax._src import distributed
    return distributed.global_state.client


class AgreedStop:
    """`check(step)` -> the same bool on every process: stop after `step` (see the module docstring).

    `every`: with several processes, consult the others every `every` steps (1: every step). `run_key`: a name for
    this run's keys, the same on every process and different for each train() call of one job."""

    def __init__(self, local: LocalStop, every: int = 1, run_key: str = "run"):
        self.local = local
        self.every = max(1, int(every))
        self.run_key = hashlib.sha256(run_key.encode()).hexdigest()[:16]
        import jax

        self.multi = jax.process_count() > 1
        self.reason: str | None = None

    def next_check(self, step: int) -> int:
        """The step after which the stop is next agreed (`check` answers True only there), the last being `step`."""
        return step + 1 if not self.multi else (step // self.every + 1) * self.every

    def check(self, step: int) -> bool:
        import jax

        if not self.multi:
            self.reason = self.local.reason
            return self.reason is not None
        if step % self.every:
            return False
        client = _client()
        prefix = f"moe_jax/stop/{self.run_key}/{step}/"
        if self.local.reason is not None:
            client.key_value_set(prefix + str(jax.process_index()), self.local.reason)
        client.wait_at_barrier(f"moe_jax/stop_barrier/{self.run_key}/{step}", BARRIER_TIMEOUT_MS)
        requests = sorted(client.key_value_dir_get(prefix))
        if requests:
            self.reason = "; ".join(f"process {k.rsplit('/', 1)[-1]}: {v}" for k, v in requests)
        return bool(requests)


# The exit status of a process whose peer process stopped answering (killed, out of memory, host down): the job's
# other processes cannot go on without it; resubmitting the whole job resumes from the newest checkpoint.
EXIT_PEER_LOST = 4
HEARTBEAT_EVERY_S = 2.0
PEER_TIMEOUT_S = 30.0  # well before the runtime's own failure (~75 s, then a 61-line dump of its state)


class PeerWatchdog:
    """With several processes: a daemon thread that beats a counter of this process in the coordination service's
    key-value store every `every_s` and reads everyone's, and a second one that judges: a process whose counter has
    not moved for `timeout_s` (or a coordinator that has not answered for as long, e.g. its host is down and the calls
    hang) is lost: one `error:` line on stderr names it and this process ends with EXIT_PEER_LOST (os._exit: the main
    thread may be waiting in a collective that never returns). jax.distributed has no callback for a missed heartbeat;
    without this, the survivors hung until the runtime aborted with a dump of its state. Process 0 is judged like the
    others because the coordination service outlives it (moe_jax/train/coordinator.py). The counters need the GIL
    only for microseconds every `every_s`."""

    PREFIX = "moe_jax/heartbeat/"

    def __init__(self, every_s: float = HEARTBEAT_EVERY_S, timeout_s: float = PEER_TIMEOUT_S):
        import jax

        self.every_s, self.timeout_s = every_s, timeout_s
        self.index, self.count = jax.process_index(), jax.process_count()
        self._lock = threading.Lock()
        self._answered, self._beats, self._error = time.monotonic(), {}, ""

    def start(self) -> "PeerWatchdog":
        threading.Thread(target=self._beat, args=(_client(),), name="peer-heartbeat", daemon=True).start()
        threading.Thread(target=self._judge, name="peer-watchdog", daemon=True).start()
        return self

    def _beat(self, client) -> None:
        while True:
            try:
                client.key_value_increment(f"{self.PREFIX}{self.index}", 1)
                beats = dict(client.key_value_dir_get(self.PREFIX))
            except Exception as e:  # the coordination service does not answer
                with self._lock:
                    self._error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            else:
                with self._lock:
                    self._answered, self._beats, self._error = time.monotonic(), beats, ""
            time.sleep(self.every_s)

    def _judge(self) -> None:
        seen = {i: (None, time.monotonic()) for i in range(self.count) if i != self.index}  # process -> (beat, since)
        while True:
            time.sleep(self.every_s)
            now = time.monotonic()
            with self._lock:
                answered, beats, error = self._answered, self._beats, self._error
            if now - answered > self.timeout_s:
                self.lost(0, f"the coordinator did not answer for {now - answered:.0f} s"
                             + (f": {error}" if error else ""))
            for i, (value, since) in seen.items():
                beat = beats.get(f"{self.PREFIX}{i}")
                if beat != value:
                    seen[i] = (beat, now)
                elif now - since > self.timeout_s:
                    self.lost(i, f"no heartbeat for {now - since:.0f} s")

    def settle(self) -> None:
        """Wait long enough for the watchdog to judge the peers (call it on an error that a lost peer may have
        caused, e.g. a collective's 'connection reset by peer'): returns if every peer is still alive; ends the
        process with EXIT_PEER_LOST and the one line otherwise."""
        time.sleep(self.timeout_s + 2 * self.every_s)

    def lost(self, process: int, why: str) -> None:
        sys.stdout.flush()
        print(f"error: process {process} of {self.count} was lost ({why}: killed, out of memory or its host is "
              f"down); process {self.index} stops too with exit status {EXIT_PEER_LOST}: resubmit the whole job to "
              "resume from the newest checkpoint", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)


MAINTENANCE_URL = "http://metadata.google.internal/computeMetadata/v1/instance/maintenance-event"


class MaintenanceWatcher:
    """A daemon thread that long-polls the GCE metadata server's maintenance-event value (Cloud TPU VMs announce
    host maintenance there before it happens) and calls `local.request(...)` when it is anything but NONE.
    `url`: the metadata URL (tests point it at a local server). Stops quietly when the server cannot be reached."""

    def __init__(self, local: LocalStop, url: str = MAINTENANCE_URL, timeout_s: float = 3600.0):
        self.local = local
        self.url = url
        self.timeout_s = timeout_s
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="maintenance-watcher", daemon=True)

    def start(self) -> "MaintenanceWatcher":
        self.thread.start()
        return self

    def _get(self, wait: bool) -> str:
        url = self.url + ("?wait_for_change=true" if wait else "")
        req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
            return r.read().decode().strip()

    def _run(self) -> None:
        wait = False
        while self.local.reason is None:
            try:
                value = self._get(wait)
            except OSError as e:  # not on GCE, or the server went away: nothing to watch
                self.error = str(e)
                return
            if value and value != "NONE":
                self.local.request(f"maintenance event {value}")
                return
            wait = True
