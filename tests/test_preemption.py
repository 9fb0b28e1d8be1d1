"""Tests for moe_jax/preemption.py in one process: signals become a stop request, a Cloud TPU maintenance event (from a
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
