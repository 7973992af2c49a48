"""A loopback TCP proxy that gives a local S3 server the *shape* of real object storage.

Why: the object-storage tests and benchmarks run against moto's S3 server on loopback, which
answers a small GET in well under a millisecond and streams at memory speed. Real object
stores do not: every request costs tens of milliseconds before its first byte (a small GET
on S3 Standard from inside the region has a median latency of tens of ms, and AWS's
performance guidelines plan for roughly 100-200 ms small-object latencies), and one node's
share of the network caps its download rate at hundreds of MB/s at best. A loader that
issues one request per sample, or that does not overlap its reads, looks fine on loopback and
is latency-bound in production. Putting this proxy between the client and the loopback
server makes those costs visible in a test, deterministically and without any real network.

What it does (``python -m tools.shaping_proxy --upstream 127.0.0.1:PORT --latency-ms 20
--bandwidth-mbps 200 [--listen-port 0]``):

- listens on 127.0.0.1 only and forwards every connection to ``--upstream``, which must be a
  loopback address (127.0.0.0/8, ::1 or ``localhost``); anything else exits with code 2: a test
  fixture must never shape (or even touch) real network traffic;
- prints ``{"port": N}`` on stdout once listening;
- **latency**: added once per HTTP request, before the request's first bytes are forwarded
  upstream. A request is recognised by a heuristic, not by parsing HTTP: a client->server chunk
  that starts with a method token (``GET``, ``PUT``, ``HEAD``, ...) followed by a space, when
  it is the connection's first chunk or the server has sent bytes since the last request was
  counted (so a request body that happens to start with ``PUT `` is not counted, except in
  the rare case of a body sent after a ``100 Continue``). Requests are counted by method;
- **bandwidth** (MB/s = 10^6 bytes/s, 0 = uncapped): one pacing clock shared by *all*
  server->client bytes of all connections (the node's share of the network). Bytes go out in
  chunks of at most 64 KiB; each chunk advances a shared "next free time" by len/bandwidth and
  the sender sleeps only when it is more than ~4 ms ahead of the clock, so small responses are
  not delayed by timer granularity; mid-stream (the previous chunk was a full one: a backlog
  waits upstream), time the proxy lost to sleep overshoot or a busy machine (up to 250 ms) is
  made up, so the average rate is the cap. Client->server (uploads) is *not* capped;
- at most 512 concurrent connections (more are closed at once); a connection idle in both
  directions for 120 s is closed;
- control on stdin, one command a line, one JSON reply line each on stdout: ``stats``,
  ``reset`` (zero the counters, reply the stats), ``stop`` (close the listening socket and
  abort every open connection: an outage or server restart - clients mid-download see a
  reset or early EOF, new connections are refused), ``start`` (listen again on the same
  port), ``quit``. EOF on stdin quits too, so the proxy dies with its parent.

`ProxyProcess` runs it as a child process and wraps the control protocol.

Limits: the request detection is a heuristic (pipelined requests sent before the previous
response arrived are not counted or delayed; HTTP/2 and TLS are not understood - use plain
HTTP/1.1); latency is added to the request, not to the first byte of the response, and is a
constant (no jitter, no tail); the bandwidth cap is a single shared token clock with bursts
of ~4 ms (up to 250 ms when catching up mid-stream), not a model of TCP congestion, packet
loss or per-connection throughput limits; no throttling errors (503 SlowDown) are simulated;
it is a Python process, so on a CPU-starved machine it forwards late (slower, never faster
than the shaping).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHUNK = 64 * 1024
MAX_CONNECTIONS = 512
IDLE_TIMEOUT_S = 120.0
PACING_SLACK_S = 0.004  # sleep only when this far ahead of the shared clock
PACING_CATCH_UP_S = 0.25  # how far a streaming sender may lag the clock and then catch up
METHODS = (b"GET", b"PUT", b"HEAD", b"POST", b"DELETE", b"OPTIONS", b"PATCH")
ROOT = Path(__file__).resolve().parent.parent


def parse_upstream(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); ValueError unless the host is loopback."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--upstream {text!r}: expected HOST:PORT")
    if host.lower() != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"--upstream host {host!r} is not a loopback address (127.0.0.0/8, ::1, "
                             f"localhost): refusing to shape non-local traffic")
    return host, int(port)


class Pacer:
    """One clock shared by every server->client byte: bandwidth in bytes/s (0 = uncapped)."""

    def __init__(self, bytes_per_s: float):
        self.rate = bytes_per_s
        self.next_free = 0.0

    async def take(self, n: int, streaming: bool = False) -> None:
        """Wait for ``n`` bytes' slot. ``streaming``: the sender's previous chunk was a full one
        (a backlog was waiting upstream), so if the clock fell behind it was the proxy's own
        lateness (sleep overshoot, a busy machine), made up (up to PACING_CATCH_UP_S) so the
        average rate stays the cap; otherwise (a new response, or an upstream slower than the
        cap) the clock restarts at "now" and no burst is banked."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        if streaming:
            start = max(self.next_free, now - PACING_CATCH_UP_S)
        else:
            start = max(self.next_free, now)
        self.next_free = start + n / self.rate
        ahead = self.next_free - now
        if ahead > PACING_SLACK_S:
            await asyncio.sleep(ahead)


class Connection:
    def __init__(self, proxy: "Proxy", reader, writer):
        self.proxy, self.c_reader, self.c_writer = proxy, reader, writer
        self.u_reader = self.u_writer = None
        self.last_activity = time.monotonic()
        self.server_spoke = True  # the connection's first chunk may be a request
        self.tasks: list[asyncio.Task] = []

    def abort(self) -> None:
        for w in (self.c_writer, self.u_writer):
            if w is not None:
                w.transport.abort()
        for t in self.tasks:
            t.cancel()

    async def run(self) -> None:
        p = self.proxy
        try:
            try:
                self.u_reader, self.u_writer = await asyncio.open_connection(*p.upstream)
            except OSError:
                return
            self.tasks = [asyncio.create_task(self.client_to_server()),
                          asyncio.create_task(self.server_to_client())]
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            for w in (self.c_writer, self.u_writer):
                if w is not None:
                    w.close()
            p.connections.discard(self)

    async def client_to_server(self) -> None:
        p = self.proxy
        try:
            while True:
                data = await self.c_reader.read(CHUNK)
                if not data:
                    break
                self.last_activity = time.monotonic()
                method = data.split(b" ", 1)[0] if b" " in data[:8] else b""
                if self.server_spoke and method in METHODS:
                    self.server_spoke = False
                    name = method.decode()
                    p.requests += 1
                    p.by_method[name] = p.by_method.get(name, 0) + 1
                    if p.latency_s > 0:
                        await asyncio.sleep(p.latency_s)
                p.bytes_up += len(data)
                self.u_writer.write(data)
                await self.u_writer.drain()
            if self.u_writer.can_write_eof():
                self.u_writer.write_eof()
        except (OSError, ConnectionError):
            self.abort()

    async def server_to_client(self) -> None:
        p = self.proxy
        streaming = False
        try:
            while True:
                data = await self.u_reader.read(CHUNK)
                if not data:
                    break
                self.server_spoke = True
                await p.pacer.take(len(data), streaming)
                streaming = len(data) == CHUNK
                p.bytes_down += len(data)
                self.c_writer.write(data)
                await self.c_writer.drain()
                self.last_activity = time.monotonic()
            if self.c_writer.can_write_eof():
                self.c_writer.write_eof()
        except (OSError, ConnectionError):
            self.abort()


class Proxy:
    def __init__(self, upstream: tuple[str, int], latency_ms: float, bandwidth_mbps: float, port: int = 0):
        self.upstream = upstream
        self.latency_s = latency_ms / 1000.0
        self.pacer = Pacer(bandwidth_mbps * 1e6)
        self.port = port
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[Connection] = set()
        self.quit = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.requests, self.by_method, self.bytes_down, self.bytes_up = 0, {}, 0, 0
        self.accepted, self.rejected = 0, 0

    def stats(self) -> dict:
        return {"requests": self.requests, "by_method": dict(self.by_method), "bytes_down": self.bytes_down,
                "bytes_up": self.bytes_up, "connections": len(self.connections), "accepted": self.accepted,
                "rejected": self.rejected}

    async def listen(self) -> None:
        self.server = await asyncio.start_server(self.on_client, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.connections):
            conn.abort()

    async def on_client(self, reader, writer) -> None:
        if self.server is None or len(self.connections) >= MAX_CONNECTIONS:
            self.rejected += 1
            writer.transport.abort()
            return
        self.accepted += 1
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        await conn.run()

    async def janitor(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, IDLE_TIMEOUT_S / 4))
            cutoff = time.monotonic() - IDLE_TIMEOUT_S
            for conn in list(self.connections):
                if conn.last_activity < cutoff:
                    conn.abort()

    async def command(self, line: str) -> dict:
        cmd = line.strip().lower()
        if cmd == "stats":
            return self.stats()
        if cmd == "reset":
            self.reset()
            return self.stats()
        if cmd == "stop":
            self.stop()
            return {"ok": True}
        if cmd == "start":
            if self.server is None:
                try:
                    await self.listen()
                except OSError as e:
                    return {"ok": False, "error": str(e)}
            return {"ok": True}
        if cmd in ("quit", "exit"):
            self.quit.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r} (stats, reset, stop, start, quit)"}


def _control_thread(proxy: Proxy, loop: asyncio.AbstractEventLoop) -> None:
    """Reads stdin (blocking, off the loop); each command runs on the loop; EOF = quit."""
    for line in sys.stdin:
        if not line.strip():
            continue
        reply = asyncio.run_coroutine_threadsafe(proxy.command(line), loop).result()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if proxy.quit.is_set():
            return
    loop.call_soon_threadsafe(proxy.quit.set)


async def serve(upstream: tuple[str, int], latency_ms: float, bandwidth_mbps: float, port: int) -> None:
    proxy = Proxy(upstream, latency_ms, bandwidth_mbps, port)
    await proxy.listen()
    sys.stdout.write(json.dumps({"port": proxy.port}) + "\n")
    sys.stdout.flush()
    janitor = asyncio.create_task(proxy.janitor())
    threading.Thread(target=_control_thread, args=(proxy, asyncio.get_running_loop()), daemon=True).start()
    await proxy.quit.wait()
    janitor.cancel()
    proxy.stop()
    deadline = time.monotonic() + 1.0  # let the aborted connections' tasks finish
    while proxy.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.shaping_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the loopback server to forward to")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added once per HTTP request")
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0,
                    help="server->client cap in MB/s (10^6 bytes/s) shared by all connections; 0 = uncapped")
    ap.add_argument("--listen-port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    args = ap.parse_args(argv)
    try:
        upstream = parse_upstream(args.upstream)
    except ValueError as e:
        print(f"shaping_proxy: error: {e}", file=sys.stderr)
        return 2
    if args.latency_ms < 0 or args.bandwidth_mbps < 0:
        print("shaping_proxy: error: --latency-ms and --bandwidth-mbps must be >= 0", file=sys.stderr)
        return 2
    asyncio.run(serve(upstream, args.latency_ms, args.bandwidth_mbps, args.listen_port))
    return 0


class ProxyProcess:
    """`python -m tools.shaping_proxy` as a child process, driven through its stdin/stdout.

    ``with ProxyProcess("127.0.0.1:9000", latency_ms=20, bandwidth_mbps=200) as p: ...``
    then point clients at ``p.endpoint``. Command methods are thread-safe."""

    START_TIMEOUT_S = 15.0
    COMMAND_TIMEOUT_S = 10.0

    def __init__(self, upstream: str, latency_ms: float, bandwidth_mbps: float, listen_port: int = 0):
        self.upstream, self.latency_ms, self.bandwidth_mbps = upstream, latency_ms, bandwidth_mbps
        self.listen_port = listen_port
        self.proc: subprocess.Popen | None = None
        self._port: int | None = None
        self._lines: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stderr = None

    def start(self) -> "ProxyProcess":
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.shaping_proxy", "--upstream", self.upstream, "--latency-ms",
             str(self.latency_ms), "--bandwidth-mbps", str(self.bandwidth_mbps), "--listen-port",
             str(self.listen_port)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        threading.Thread(target=self._read_stdout, args=(self.proc.stdout,), daemon=True).start()
        try:
            line = self._lines.get(timeout=self.START_TIMEOUT_S)
        except queue.Empty:
            line = None
        if not line:
            self.close()
            raise RuntimeError(f"shaping proxy did not start within {self.START_TIMEOUT_S:.0f} s "
                               f"(exit code {self.proc.returncode}); stderr:\n{self.stderr()}")
        self._port = int(json.loads(line)["port"])
        return self

    def _read_stdout(self, stream) -> None:
        try:
            for line in stream:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        self._lines.put("")  # EOF

    def stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("shaping proxy not started")
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, cmd: str) -> dict:
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"shaping proxy is not running; stderr:\n{self.stderr()}")
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            try:
                line = self._lines.get(timeout=self.COMMAND_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"shaping proxy: no reply to {cmd!r} in {self.COMMAND_TIMEOUT_S:.0f} s") from None
            if not line:
                raise RuntimeError(f"shaping proxy exited during {cmd!r}; stderr:\n{self.stderr()}")
            return json.loads(line)

    def stats(self) -> dict:
        return self.command("stats")

    def reset(self) -> dict:
        return self.command("reset")

    def stop_serving(self) -> None:
        self._check(self.command("stop"))

    def start_serving(self) -> None:
        self._check(self.command("start"))

    @staticmethod
    def _check(reply: dict) -> None:
        if not reply.get("ok"):
            raise RuntimeError(f"shaping proxy: {reply.get('error', reply)}")

    def close(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with self._lock:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                except (OSError, ValueError):
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> "ProxyProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
