"""An HTTP/3 client that follows RFC 9114 (aioquic) against Courtside's WebTransport: what a
session and every refusal (404, 403, 503, 429) look like to it, on each engine. Part of
tests/run.sh, which installs aioquic when it is missing.

    pip install aioquic==1.7.2
    cargo build && python3 tests/h3client/refusals.py quinn proto

Prints one line per attempt: the status read, the control stream's reply to a ping, the
STOP_SENDING frames the client got and how the connection closed. (aioquic's H3 layer does not
report data on a WebTransport stream the client opened, so the reply is read from QUIC.) Exits 1
unless every attempt got its status (200 with a pong, 404, 403, and 503 and 429 for a second
session under `--max-connections 1` and `--max-connections-per-ip 1`), refusals closed with
H3_REQUEST_REJECTED, and no STOP_SENDING on the client's HTTP/3 control and QPACK streams, which
RFC 9114 §6.2.1 makes a connection error."""
import asyncio, os, queue, re, ssl, subprocess, sys, threading

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StopSendingReceived, StreamDataReceived

BIN = os.environ.get("COURTSIDE_BIN", "target/debug/courtside")


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.seen = []
        self.raw = {}
        self.changed = asyncio.Event()

    def quic_event_received(self, event):
        if isinstance(event, (ConnectionTerminated, StopSendingReceived)):
            self.seen.append(event)
        if isinstance(event, StreamDataReceived):
            self.raw[event.stream_id] = self.raw.get(event.stream_id, b"") + event.data
        for e in self.h3.handle_event(event):
            self.seen.append(e)
        self.changed.set()

    async def wait_for(self, pred, timeout=10.0):
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            for e in self.seen:
                if pred(e):
                    return e
            self.changed.clear()
            left = end - loop.time()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return None


def start(engine, extra=()):
    env = dict(os.environ, COURTSIDE_WT_ENGINE=engine, NO_COLOR="1")
    p = subprocess.Popen([BIN, "serve", "--http", "127.0.0.1:0", "--wt", "127.0.0.1:0",
                          "--publish-token", "x", "--log-format", "json", *extra],
                         env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found = queue.Queue()

    def read():
        # Reads the log to its end, so the server never blocks on a full pipe.
        for line in p.stderr:
            m = re.search(r'"wt":"([0-9.]+):(\d+)"', line)
            if m:
                found.put((m.group(1), int(m.group(2))))
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        address = found.get(timeout=30)
    except queue.Empty:
        address = None
    if address is None:
        p.kill()
        raise SystemExit(f"{engine}: the server printed no WebTransport address in 30 s")
    return p, *address


async def attempt(host, port, path, origin=b"https://scores.example", meanwhile=None):
    """One CONNECT; with `meanwhile`, an attempt made while this session (answered 200) is held."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                               max_datagram_frame_size=65536)
    async with connect(host, port, configuration=config, create_protocol=Client) as client:
        sid = client._quic.get_next_available_stream_id()
        client.h3.send_headers(sid, [(b":method", b"CONNECT"), (b":scheme", b"https"),
                                     (b":authority", b"localhost"), (b":path", path),
                                     (b":protocol", b"webtransport"), (b"origin", origin)])
        client.transmit()
        e = await client.wait_for(lambda e: isinstance(e, (HeadersReceived, ConnectionTerminated)))
        result = {"path": path.decode()}
        if isinstance(e, HeadersReceived):
            result["status"] = dict(e.headers).get(b":status", b"?").decode()
        if result.get("status") == "200":
            ws = client.h3.create_webtransport_stream(sid, is_unidirectional=False)
            client._quic.send_stream_data(ws, b"\x01\x03")
            client.transmit()
            # A ping (length 1, type 0x03); the pong is 01 12.
            await client.wait_for(lambda _: len(client.raw.get(ws, b"")) >= 2)
            result["reply"] = client.raw.get(ws, b"").hex()
            if meanwhile is not None:
                result["meanwhile"] = await meanwhile()
        else:
            # The server closes a refused connection about a second after its answer: anything it
            # sent before that (a STOP_SENDING included) has arrived by then.
            await client.wait_for(lambda e: isinstance(e, ConnectionTerminated))
        result["stop_sending"] = [(s.stream_id, hex(s.error_code)) for s in client.seen if isinstance(s, StopSendingReceived)]
        t = [s for s in client.seen if isinstance(s, ConnectionTerminated)]
        result["closed"] = (hex(t[0].error_code), t[0].reason_phrase) if t else None
        return result


# aioquic's client opens its HTTP/3 control stream and its QPACK encoder and decoder streams as
# its first three unidirectional streams: ids 2, 6 and 10.
CRITICAL_STREAMS = {2, 6, 10}


def check(engine, what, r, status, failures):
    print(engine, what, r, flush=True)
    if r.get("status") != status:
        failures.append(f"{engine} {what}: status {r.get('status')}, expected {status}")
    if status == "200" and r.get("reply") != "0112":
        failures.append(f"{engine} {what}: no pong on the session's control stream: {r.get('reply')}")
    if status != "200" and (r["closed"] or ("?",))[0] != "0x10b":
        failures.append(f"{engine} {what}: closed {r['closed']}, expected H3_REQUEST_REJECTED (0x10b)")
    stopped = [s for s, _ in r["stop_sending"] if s in CRITICAL_STREAMS]
    if stopped:
        failures.append(f"{engine} {what}: STOP_SENDING on critical streams {stopped}")


async def main():
    failures = []
    ours, evil = b"https://scores.example", b"https://evil.example"
    for engine in sys.argv[1:]:
        # A session, a wrong path (404), a refused Origin (403).
        p, host, port = start(engine, ["--allowed-origins", "https://scores.example"])
        try:
            check(engine, "session", await attempt(host, port, b"/wt", ours), "200", failures)
            check(engine, "wrong path", await attempt(host, port, b"/nope", ours), "404", failures)
            check(engine, "refused origin", await attempt(host, port, b"/wt", evil), "403", failures)
        finally:
            p.terminate()
            p.wait()
        # A second session while the first is held: the node's limit (503), the address's (429).
        for flag, status in [("--max-connections", "503"), ("--max-connections-per-ip", "429")]:
            p, host, port = start(engine, [flag, "1"])
            try:
                held = await attempt(host, port, b"/wt", ours,
                                     meanwhile=lambda: attempt(host, port, b"/wt", ours))
                second = held.pop("meanwhile", None)
                check(engine, f"held under {flag} 1", held, "200", failures)
                if second is None:
                    failures.append(f"{engine} {flag} 1: the held session was refused, no second attempt")
                else:
                    check(engine, f"second under {flag} 1", second, status, failures)
            finally:
                p.terminate()
                p.wait()
    for failure in failures:
        print("FAILED:", failure, flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    asyncio.run(main())
