#!/usr/bin/env python3
"""Small HTTP/1.1 load clients for benches/compare.sh, memory.sh and idle_conns.sh (standard library only).

burst: open N connections first, then send one GET on each, back to back, and time every answer from
       its send to the kernel's receive timestamp of its last bytes (SO_TIMESTAMPNS; the moment this
       client read it is reported as *_app). Prints one JSON object: statuses, latencies (ms), how
       many answers took at least --threshold-ms, and the counts of each cache header value seen.
fill:  send GETs for a list of targets over C keep-alive connections until done or --deadline;
       prints JSON with the count of answers per status and the sum of response body bytes.
hold:  open N keep-alive connections (at most C opening at once), one GET on each, read the whole
       answer, then hold them all idle; reads VmRSS of each --pid before the first connection and
       --settle seconds after the last answer, prints JSON, then closes them.

Everything is bounded: connect, each answer and the whole run have timeouts; only 127.0.0.1.
"""
import argparse
import asyncio
import json
import struct
import sys
import time

CACHE_HEADERS = (b"cache-status", b"x-cache-status", b"x-cache")


def request_bytes(host, port, target, headers):
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: insights-proxy-bench", "Accept: */*"]
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head):
    """(status, headers with lower-case names) of a response head."""
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(lines[0].split(b" ")[1]), headers


async def read_answer(reader):
    """Reads one response (Content-Length or chunked). Returns (status, headers dict, body length)."""
    status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        await reader.readexactly(n)
        return status, headers, n
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            total += size
            if size == 0:
                return status, headers, total
    body = await reader.read()  # close-delimited
    return status, headers, len(body)


def cache_value(headers):
    for h in CACHE_HEADERS:
        if h in headers:
            v = headers[h].decode(errors="replace")
            # Drop the per-answer ttl so equal outcomes count together.
            return ";".join(p for p in v.split(";") if not p.strip().startswith("ttl="))
    return "-"


SO_TIMESTAMPNS = 35  # Linux; SCM_TIMESTAMPNS has the same value (not exposed by Python's socket module)


def parse_answer(buf, eof):
    """(status, headers) once buf holds a whole response (Content-Length, chunked or, at EOF,
    close-delimited), else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status, headers = parse_head(bytes(buf[:end]))
    body = end + 4
    if b"content-length" in headers:
        return (status, headers) if len(buf) - body >= int(headers[b"content-length"]) else None
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        i = body
        while True:
            nl = buf.find(b"\r\n", i)
            if nl < 0:
                return None
            size = int(bytes(buf[i:nl]).split(b";")[0], 16)
            if size == 0:
                return (status, headers) if buf.find(b"\r\n", nl + 2) >= 0 else None
            i = nl + 2 + size + 2
            if i > len(buf):
                return None
    return (status, headers) if eof else None


def burst(args):
    """Every latency runs from the send to the kernel's receive timestamp of the answer's last bytes
    (SO_TIMESTAMPNS), so it does not include the time this single-threaded client takes to get
    round to reading 200 answers that arrive together; when the client got to each answer is
    reported too (*_app)."""
    import selectors
    import socket
    req = request_bytes(args.host, args.port, args.target, args.header)
    socks = [socket.create_connection((args.host, args.port), timeout=args.timeout) for _ in range(args.n)]
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setblocking(False)
    sel = selectors.DefaultSelector()
    state = {}
    for s in socks:  # the requests go out back to back, before any answer is read
        state[s] = {"t0": time.time_ns(), "buf": bytearray(), "ts": None}
        s.send(req)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + args.timeout
    results = []
    while state and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            s, st = key.fileobj, state[key.fileobj]
            try:
                data, anc, _, _ = s.recvmsg(1 << 16, socket.CMSG_SPACE(16))
            except BlockingIOError:
                continue
            except OSError:
                data, anc = b"", []
            for level, kind, d in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(d) >= 16:
                    sec, ns = struct.unpack("qq", d[:16])
                    st["ts"] = sec * 1_000_000_000 + ns
            st["buf"] += data
            try:
                done = parse_answer(st["buf"], eof=not data)
            except (ValueError, IndexError):
                done = (None, {})
            if done is None and data:
                continue
            app = (time.time_ns() - st["t0"]) / 1e6
            kernel = (st["ts"] - st["t0"]) / 1e6 if st["ts"] else app
            status, headers = done if done else (None, {})
            results.append((status, cache_value(headers) if done else "error", kernel, app))
            sel.unregister(s)
            s.close()
            del state[s]
    for s in state:  # timed out
        results.append((None, "timeout", args.timeout * 1000, args.timeout * 1000))
        s.close()
    lat = sorted(r[2] for r in results)
    app = sorted(r[3] for r in results)
    statuses, caches = {}, {}
    for s, c, _, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
        caches[c] = caches.get(c, 0) + 1
    out = {
        "n": len(results),
        "ok": statuses.get("200", 0),
        "statuses": statuses,
        "cache": caches,
        "min_ms": round(lat[0], 1),
        "p50_ms": round(lat[len(lat) // 2], 1),
        "max_ms": round(lat[-1], 1),
        "waited": sum(1 for x in lat if x >= args.threshold_ms),
        "threshold_ms": args.threshold_ms,
        "p50_ms_app": round(app[len(app) // 2], 1),
        "max_ms_app": round(app[-1], 1),
    }
    print(json.dumps(out))


async def fill(args):
    targets = [line.strip() for line in open(args.targets) if line.strip()]
    queue = asyncio.Queue()
    for t in targets:
        queue.put_nowait(t)
    deadline = time.monotonic() + args.deadline
    statuses, caches = {}, {}
    totals = {"bytes": 0, "done": 0}

    async def worker():
        reader = writer = None
        while time.monotonic() < deadline:
            try:
                target = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            for _attempt in range(3):
                try:
                    if writer is None:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(args.host, args.port), args.timeout)
                    writer.write(request_bytes(args.host, args.port, target, args.header))
                    status, headers, n = await asyncio.wait_for(read_answer(reader), args.timeout)
                    break
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    status, headers, n = None, {}, 0
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            c = cache_value(headers)
            caches[c] = caches.get(c, 0) + 1
            if status == 200:
                totals["bytes"] += n
            totals["done"] += 1
            if headers.get(b"connection", b"").lower() == b"close" and writer is not None:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    print(json.dumps({
        "requested": len(targets),
        "done": totals["done"],
        "statuses": statuses,
        "cache": caches,
        "body_bytes_200": totals["bytes"],
        "seconds": round(time.monotonic() - t0, 1),
        "timed_out": totals["done"] < len(targets),
    }))


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def hold(args):
    pids = [int(p) for p in args.pid]
    before = {p: vm_rss_kib(p) for p in pids}
    deadline = time.monotonic() + args.deadline
    sem = asyncio.Semaphore(args.concurrency)
    held, statuses = [], {}
    body_bytes = 0

    async def open_one():
        nonlocal body_bytes
        async with sem:
            if time.monotonic() > deadline:
                statuses["deadline"] = statuses.get("deadline", 0) + 1
                return
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(args.host, args.port), args.timeout)
                writer.write(request_bytes(args.host, args.port, args.target, args.header))
                status, _headers, n = await asyncio.wait_for(read_answer(reader), args.timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                return
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            body_bytes = n
            held.append(writer)

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.n)))
    opened_s = time.monotonic() - t0
    await asyncio.sleep(args.settle)
    after = {p: vm_rss_kib(p) for p in pids}
    for w in held:
        w.close()
    per = {str(p): round((after[p] - before[p]) * 1024 / max(1, len(held))) for p in pids}
    print(json.dumps({
        "requested": args.n, "held": len(held), "statuses": statuses, "body_bytes": body_bytes,
        "open_seconds": round(opened_s, 1), "rss_kib_before": {str(p): v for p, v in before.items()},
        "rss_kib_held": {str(p): v for p, v in after.items()}, "rss_bytes_per_conn": per,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("burst", "fill", "hold"):
        s = sub.add_parser(name)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
        s.add_argument("--timeout", type=float, default=30.0, help="seconds per connect / answer")
    b = sub.choices["burst"]
    b.add_argument("--target", required=True, help="request target, e.g. /api/environments/1/insights/3/")
    b.add_argument("-n", type=int, default=200)
    b.add_argument("--threshold-ms", type=float, default=200.0)
    f = sub.choices["fill"]
    f.add_argument("--targets", required=True, help="file with one request target per line")
    f.add_argument("--concurrency", type=int, default=16)
    f.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole fill")
    h = sub.choices["hold"]
    h.add_argument("--target", required=True)
    h.add_argument("-n", type=int, default=1000)
    h.add_argument("--concurrency", type=int, default=200)
    h.add_argument("--pid", action="append", default=[], help="a server process to read VmRSS of, repeatable")
    h.add_argument("--settle", type=float, default=2.0, help="seconds between the last answer and reading RSS")
    h.add_argument("--deadline", type=float, default=300.0, help="seconds for opening them all")
    args = p.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("loopback only")
    if args.cmd == "burst":
        burst(args)
        return
    run = fill if args.cmd == "fill" else hold
    asyncio.run(asyncio.wait_for(run(args), args.deadline + args.timeout + 30))


if __name__ == "__main__":
    main()
