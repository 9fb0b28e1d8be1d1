"""Tests for moe_jax/train/preemption.py in one process: signals become a stop request, a Cloud TPU maintenance event (from a
local stand-in for the GCE metadata server) does too, and a single process's agreed stop is its own request. The
several-process agreement is tested in tests/test_multihost.py."""

import http.server
import os
import signal
import threading
import time

from moe_jax.train import preemption


def test_sigterm_and_sigint_become_requests_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.LocalStop() as local:
        stop = preemption.AgreedStop(local)
        assert not stop.check(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.check(2) and stop.reason == "signal SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # the first reason is kept
        time.sleep(0.1)
        assert local.reason == "signal SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def _metadata_server(values):
    """A local HTTP server answering each GET with the next of `values` (the last one repeated), recording requests."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Metadata-Flavor")))
            body = values[min(len(seen), len(values)) - 1].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_maintenance_event_requests_a_stop():
    server, seen = _metadata_server(["NONE", "TERMINATE_ON_HOST_MAINTENANCE"])
    try:
        local = preemption.LocalStop()
        url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/instance/maintenance-event"
        watcher = preemption.MaintenanceWatcher(local, url=url, timeout_s=10).start()
        watcher.thread.join(timeout=10)
        assert local.reason == "maintenance event TERMINATE_ON_HOST_MAINTENANCE"
        assert preemption.AgreedStop(local).check(7)
        # first a plain read, then long polls for a change, always with the header GCE requires
        assert seen[0] == ("/computeMetadata/v1/instance/maintenance-event", "Google")
        assert seen[1] == ("/computeMetadata/v1/instance/maintenance-event?wait_for_change=true", "Google")
    finally:
        server.shutdown()


def test_maintenance_watcher_without_a_metadata_server_does_nothing():
    local = preemption.LocalStop()
    watcher = preemption.MaintenanceWatcher(local, url="http://127.0.0.1:9/none", timeout_s=2).start()
    watcher.thread.join(timeout=10)
    assert not watcher.thread.is_alive() and watcher.error and local.reason is None


# ---------------------------------------------------------------------------------------------------------------
# SignalWatcher: a signal is acted on while the main thread is blocked (in a subprocess: it installs process-wide
# handlers and may end the process)

_WATCHED = """
import sys, time
from moe_jax.train import preemption
preemption.SignalWatcher().start()
if sys.argv[1] == "loop":
    with preemption.LocalStop() as local:
        local.next_check = 7
        print("ready", flush=True)
        time.sleep(4)  # the main thread is busy (a Python handler would run only after this call)
        print("woke", local.reason, flush=True)
else:
    preemption.set_phase("compiling the train step")
    print("ready", flush=True)
    time.sleep(30)
    print("not interrupted", flush=True)
"""


def _watched(mode, sig):
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", _WATCHED, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline() == "ready\n"
    sent = time.time()
    p.send_signal(sig)
    first = p.stdout.readline()
    acted = time.time() - sent
    out, err = p.communicate(timeout=60)
    return p.returncode, first + out, err, acted


def test_a_signal_outside_the_loop_exits_3_at_once_naming_the_phase():
    for sig in (signal.SIGTERM, signal.SIGINT):
        rc, out, err, acted = _watched("phase", sig)
        assert rc == preemption.EXIT_PREEMPTED == 3, err
        assert out == "" and acted < 10, (out, acted)  # long before the 30 s sleep ends
        assert err.splitlines() == [
            f"interrupted by {sig.name} while compiling the train step: nothing was being saved (the newest "
            "checkpoint, if any, is intact); exit status 3: run the same command to resume"], err


def test_a_signal_in_the_loop_is_acknowledged_while_the_main_thread_is_busy():
    rc, out, err, acted = _watched("loop", signal.SIGINT)
    assert rc == 0, err
    assert out.splitlines() == ["stop requested (SIGINT): saving after step 7, then exiting with status 3",
                                "woke signal SIGINT"], out
    assert acted < 3, acted  # the acknowledgement came before the 4 s call returned
