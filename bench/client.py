"""The load generator: one process, blocking sockets where latency matters.

Run as ``python -m bench.client WORKLOAD ...``; it prints one JSON object on
stdout. Ping-pong and connect use a blocking socket with TCP_NODELAY, so each
round trip is one ``send`` and one ``recv`` with no event loop in between.
Concurrent tunnels use one epoll loop over non-blocking sockets.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import sys
import threading
import time
from array import array
from collections.abc import Sequence

from .procs import raise_nofile_limit

__all__ = ["ping_pong", "bulk", "connect_latency", "handshakes", "concurrent", "main"]

_CHUNK = 256 * 1024


def _connect(port: int, timeout: float = 60.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    size = len(view)
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"the peer closed the connection after {got} of {size} bytes")
        got += n


def _percentile(sorted_values: list[float], fraction: float) -> float:
    # Nearest-rank percentile: a value that was actually measured.
    index = max(0, min(len(sorted_values) - 1, int(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def ping_pong(port: int, size: int, count: int, warmup_seconds: float) -> dict:
    """Send ``size`` bytes, wait for them back, ``count`` times on one connection.

    The measured round trips follow at least ``warmup_seconds`` (and 500 round
    trips) of unmeasured ones.

    Returns:
        Median, p99, mean and minimum round trip in microseconds.
    """
    message = bytes(range(256)) * (size // 256) + bytes(size % 256)
    reply = bytearray(size)
    view = memoryview(reply)
    samples = array("q")
    clock = time.perf_counter_ns
    with _connect(port) as sock:
        # Round trips are slow until every process on the path has been busy for
        # a while (caches, CPU frequency): warm up for a time, not a count.
        warm_until = time.monotonic() + warmup_seconds
        trips = 0
        while trips < 500 or time.monotonic() < warm_until:
            sock.sendall(message)
            _recv_exact(sock, view)
            trips += 1
        for _ in range(count):
            start = clock()
            sock.sendall(message)
            _recv_exact(sock, view)
            samples.append(clock() - start)
        if reply != message:
            raise ConnectionError("the echo came back different from what was sent")
    values = sorted(v / 1000 for v in samples)
    return {
        "count": count,
        "size": size,
        "median_us": statistics.median(values),
        "p99_us": _percentile(values, 0.99),
        "mean_us": statistics.fmean(values),
        "min_us": values[0],
    }


def bulk(port: int, mode: str, total: int) -> dict:
    """Move ``total`` bytes to the sink (``mode="sink"``) or through the echo and back.

    The sink is told the length first and answers with its count once every
    byte arrived; the echo run ends when the last byte is back. Neither
    half-closes the connection.

    Returns:
        Bytes, seconds and MB/s (10^6 bytes per second of payload, one way).
    """
    block = bytes(range(256)) * (_CHUNK // 256)
    with _connect(port) as sock:
        start = time.perf_counter()
        if mode == "sink":
            sock.sendall(total.to_bytes(8, "big"))
            _send_total(sock, block, total)
            answer = bytearray(8)
            _recv_exact(sock, memoryview(answer))
            received = int.from_bytes(answer, "big")
            if received != total:
                raise ConnectionError(f"the sink counted {received} bytes, {total} were sent")
        else:
            failure: list[BaseException] = []

            def sender() -> None:
                try:
                    _send_total(sock, block, total)
                except BaseException as exc:  # reported by the receiving thread
                    failure.append(exc)

            thread = threading.Thread(target=sender, daemon=True)
            thread.start()
            buffer = bytearray(_CHUNK)
            received = 0
            while received < total:
                n = sock.recv_into(buffer)
                if n == 0:
                    break
                received += n
            thread.join()
            if failure:
                raise failure[0]
            if received != total:
                raise ConnectionError(f"the echo returned {received} bytes, {total} were sent")
        seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "mb_per_s": total / seconds / 1e6}


def _send_total(sock: socket.socket, block: bytes, total: int) -> None:
    view = memoryview(block)
    left = total
    while left > 0:
        n = min(left, len(block))
        sock.sendall(view[:n])
        left -= n


def connect_latency(ports: Sequence[int], count: int, size: int, block: int = 20) -> dict:
    """Time connect plus the first round trip, ``count`` times per port, the ports taking turns.

    The ports take turns in blocks of ``block`` connections (the last block
    may be shorter), the first port of each round one further along, so
    every port sees the same slow moments of the machine while each block
    runs as warm as a series of its own; the first connection of each block
    goes unmeasured.

    Returns:
        Per port (as a string): median, p90 and maximum in milliseconds, and
        ``paired_ms``: per other port, the median over rounds of this port's
        block median minus that port's in the same round.
    """
    message = b"x" * size
    reply = memoryview(bytearray(size))
    samples: dict[int, list[float]] = {port: [] for port in ports}
    blocks: dict[int, list[float]] = {port: [] for port in ports}
    left = count
    turn = 0
    while left > 0:
        n = min(block, left)
        for port in [*ports[turn:], *ports[:turn]]:
            taken = []
            for i in range(n + 1):
                start = time.perf_counter()
                with _connect(port) as sock:
                    sock.sendall(message)
                    _recv_exact(sock, reply)
                    took = (time.perf_counter() - start) * 1000
                if i:
                    taken.append(took)
            samples[port] += taken
            blocks[port].append(statistics.median(taken))
        left -= n
        turn = (turn + 1) % len(ports)
    result = {}
    for port, taken in samples.items():
        values = sorted(taken)
        result[str(port)] = {
            "count": count,
            "block": block,
            "median_ms": statistics.median(values),
            "p90_ms": _percentile(values, 0.90),
            "max_ms": values[-1],
            "paired_ms": {
                str(other): statistics.median(
                    a - b for a, b in zip(blocks[port], blocks[other], strict=True)
                )
                for other in ports
                if other != port
            },
        }
    return result


def _handshaker(engine: str, ca: str):
    """A function that connects to a port and completes one TLS handshake.

    ``stdlib`` is Python's ``ssl`` on the system OpenSSL (what stunnel and the
    stdlib engine's connector use); ``pyopenssl`` is pyOpenSSL on the OpenSSL
    in the ``cryptography`` wheel with its default groups, as the pyOpenSSL
    engine's connector offers them (X25519MLKEM768 first).  Both verify the
    certificate chain (the stdlib client also the address; neither cost is
    the server's) and return the negotiated version and group.
    """
    if engine == "stdlib":
        import ssl

        context = ssl.create_default_context(cafile=ca)

        def handshake(port: int) -> tuple[str, str]:
            with (
                _connect(port) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                return tls.version() or "?", "unknown"

        return handshake

    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.load_verify_locations(ca)
    context.set_verify(SSL.VERIFY_PEER, None)

    def handshake(port: int) -> tuple[str, str]:
        with _connect(port) as raw:
            raw.settimeout(None)  # pyOpenSSL wants a blocking socket, not a timeout
            conn = SSL.Connection(context, raw)
            conn.set_connect_state()
            try:
                conn.do_handshake()
            except SSL.Error as exc:
                raise ConnectionError(f"TLS handshake failed: {exc}") from exc
            return conn.get_protocol_version_name(), conn.get_group_name() or "unknown"

    return handshake


def handshakes(port: int, count: int, engine: str, ca: str) -> dict:
    """Complete ``count`` TLS handshakes one after another, closing each connection.

    Every handshake is a new TCP connection to the server side's TLS port.

    Returns:
        Handshakes per second, the median in milliseconds, and the TLS
        version and key-exchange group the last handshake negotiated.
    """
    handshake = _handshaker(engine, ca)
    samples = []
    version = group = "?"
    start = time.perf_counter()
    for _ in range(count):
        began = time.perf_counter()
        version, group = handshake(port)
        samples.append((time.perf_counter() - began) * 1000)
    elapsed = time.perf_counter() - start
    return {
        "count": count,
        "per_s": count / elapsed,
        "median_ms": statistics.median(samples),
        "version": version,
        "group": group,
    }


def concurrent(port: int, tunnels: int, size: int, duration: float, setup_timeout: float) -> dict:
    """Keep ``tunnels`` connections doing ping-pong at once for ``duration`` seconds.

    Every tunnel first completes one round trip (so every TLS handshake and token
    check is done) before the measured window starts.

    Returns:
        Aggregate round trips per second over the window, and the setup time.
    """
    message = b"p" * size
    buffer = bytearray(65536)
    sel = selectors.DefaultSelector()
    # Per socket: bytes still expected back.
    waiting: dict[socket.socket, int] = {}
    setup_start = time.perf_counter()
    socks = []
    for _ in range(tunnels):
        sock = _connect(port, timeout=setup_timeout)
        sock.setblocking(False)
        socks.append(sock)
        sel.register(sock, selectors.EVENT_READ)
    for sock in socks:
        sock.send(message)
        waiting[sock] = size
    warmed: set[socket.socket] = set()
    measuring = False
    window_start = window_end = 0.0
    done = 0
    setup_deadline = setup_start + setup_timeout
    try:
        while True:
            now = time.perf_counter()
            if measuring and now >= window_end:
                break
            if not measuring and now > setup_deadline:
                raise TimeoutError(
                    f"only {len(warmed)} of {tunnels} tunnels answered within {setup_timeout:.0f} s"
                )
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                n = sock.recv_into(buffer)
                if n == 0:
                    raise ConnectionError("a tunnel closed during the run")
                waiting[sock] -= n
                if waiting[sock] > 0:
                    continue
                if measuring:
                    done += 1
                elif sock not in warmed:
                    warmed.add(sock)
                    if len(warmed) == tunnels:
                        measuring = True
                        window_start = time.perf_counter()
                        window_end = window_start + duration
                sent = sock.send(message)
                if sent != size:
                    sock.setblocking(True)
                    sock.sendall(message[sent:])
                    sock.setblocking(False)
                waiting[sock] = size
        elapsed = time.perf_counter() - window_start
    finally:
        for sock in socks:
            sock.close()
    return {
        "tunnels": tunnels,
        "round_trips": done,
        "seconds": elapsed,
        "round_trips_per_s": done / elapsed,
        "setup_seconds": window_start - setup_start,
    }


def _port_list(text: str) -> list[int]:
    return [int(port) for port in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client")
    sub = parser.add_subparsers(dest="workload", required=True)
    p = sub.add_parser("pingpong")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--warmup-seconds", type=float, default=1.0)
    p = sub.add_parser("bulk")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("sink", "echo"), required=True)
    p.add_argument("--bytes", type=int, required=True)
    p = sub.add_parser("connect")
    p.add_argument("--ports", type=_port_list, required=True, help="comma-separated")
    p.add_argument("--block", type=int, default=20, help="connections per turn")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, default=64)
    p = sub.add_parser("handshake")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--engine", choices=("stdlib", "pyopenssl"), required=True)
    p.add_argument("--ca", required=True)
    p = sub.add_parser("concurrent")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tunnels", type=int, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--setup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    try:
        if args.workload == "pingpong":
            result = ping_pong(args.port, args.size, args.count, args.warmup_seconds)
        elif args.workload == "bulk":
            result = bulk(args.port, args.mode, args.bytes)
        elif args.workload == "connect":
            result = connect_latency(args.ports, args.count, args.size, args.block)
        elif args.workload == "handshake":
            result = handshakes(args.port, args.count, args.engine, args.ca)
        else:
            result = concurrent(
                args.port, args.tunnels, args.size, args.duration, args.setup_timeout
            )
    except (OSError, TimeoutError, ImportError) as exc:
        print(f"bench client {args.workload}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
