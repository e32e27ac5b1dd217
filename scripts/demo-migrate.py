#!/usr/bin/env python3
"""Live migration demo: a redis-server in a runc container moves between two network
namespaces ("hosts" joined by a veth with a bandwidth cap) while a client writes to it.

    scripts/demo-migrate.py [--keys N] [--rate 1gbit] [--rtt MS] [--writes-per-s N] [--moves N]

1. Two namespaces PREFIX-a (10.77.0.1, the source) and PREFIX-b (10.77.0.2, the target).
2. An OCI bundle with redis-server and its libraries; the container shares the host's network
   namespace, so redis listens on the host's address. CRIU closes the client's established TCP
   connections at the freeze and leaves connections still being set up alone (runc reads
   `tcp-close` and `skip-in-flight` from the CRIU config file named by the bundle's
   `org.criu.config` annotation): the client reconnects to the new host.
3. N keys of ~1,000 bytes are loaded (500,000 keys: ~550 MiB of redis memory).
4. `hop serve` runs as the target in each namespace; a writer adds keys w:0, w:1, ... at a
   bounded rate and records each acknowledged write.
5. `hop migrate --runc redis` moves the container a -> b (and back, for --moves 2 ...), printing
   its timeline; then every key acknowledged before the freeze is read back at the new host.

Needs root. Everything it starts is stopped and removed at the end.
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOP = os.path.join(ROOT, "target", "release", "hop")
ADDR = {"a": "10.77.0.1", "b": "10.77.0.2"}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def enter(prefix, side):
    """Switch only the network namespace (ip netns exec would add a mount namespace, which
    CRIU would then have to dump)."""
    return ["nsenter", f"--net=/run/netns/{prefix}-{side}"]


def value(kind, i):
    """The deterministic ~1,000-byte value of key kind:i."""
    head = f'{{"id":{i},"kind":"{kind}","payload":"'
    body = (f"{i:012d}" * 80)[: 1000 - len(head) - 2]
    return head + body + '"}'


# ---- helpers run inside a namespace (this script re-invoked) ----

def resp(*args):
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def cmd_load(a):
    """Stream SETs for key:0..N-1 to stdout, in redis protocol (for redis-cli --pipe)."""
    w = sys.stdout.buffer
    for i in range(a.keys):
        w.write(resp("SET", f"key:{i:012d}", value("key", i)))


def read_reply(f):
    line = f.readline()
    if not line:
        raise ConnectionError("connection closed")
    if line[:1] == b"$":
        n = int(line[1:])
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if line[:1] == b"-":
        raise RuntimeError(line.decode().strip())
    return line[1:].strip()


def cmd_write(a):
    """Overwrite random loaded keys at about --per-s writes/s (value w:SEQ), in batches of 20;
    log every acknowledged write as "SEQ KEY" and, at the end, the batch in flight as
    "? SEQ KEY". Stops at the first connection error (the freeze), or after --max-s seconds."""
    rng = random.Random(a.seed)
    seq = a.seq_start
    done = 0
    batch = 20
    t0 = time.time()
    log = open(a.out, "a")
    pending = []
    try:
        s = socket.create_connection((a.host, 6379), timeout=10)
        f = s.makefile("rb")
        while time.time() - t0 < a.max_s:
            pending = [(seq + j, rng.randrange(a.keys)) for j in range(batch)]
            s.sendall(b"".join(resp("SET", f"key:{k:012d}", value("w", q)) for q, k in pending))
            for _ in range(batch):
                if read_reply(f) != b"OK":
                    raise RuntimeError("unexpected reply")
            log.write("".join(f"{q} {k}\n" for q, k in pending))
            log.flush()
            pending = []
            seq += batch
            done += batch
            ahead = done / a.per_s - (time.time() - t0)
            if ahead > 0:
                time.sleep(ahead)
    except (OSError, ConnectionError, RuntimeError) as e:
        print(f"writer: stopped after {done} acknowledged writes: {e}", file=sys.stderr)
    log.write("".join(f"? {q} {k}\n" for q, k in pending))
    log.close()


def expected_values(logs):
    """From writer logs: per key, the value of its last acknowledged write and the values of
    writes that were in flight (unacknowledged, possibly applied) after it."""
    last, maybe, acked = {}, {}, 0
    for path in logs:
        for line in open(path):
            parts = line.split()
            if parts[0] == "?":
                q, k = int(parts[1]), int(parts[2])
                maybe.setdefault(k, set()).add(q)
            else:
                q, k = int(parts[0]), int(parts[1])
                acked += 1
                if q > last.get(k, -1):
                    last[k] = q
                    maybe.pop(k, None)
    return last, maybe, acked


def cmd_check(a):
    """Read back every key a writer acknowledged (its last value, or a later in-flight one) and a
    sample of keys never written, at --host."""
    deadline = time.time() + 10
    while True:
        try:
            s = socket.create_connection((a.host, 6379), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    f = s.makefile("rb")
    last, maybe, acked = expected_values(a.logs)
    bad = 0
    keys = sorted(set(last) | set(maybe))
    for start in range(0, len(keys), 500):
        part = keys[start:start + 500]
        s.sendall(b"".join(resp("GET", f"key:{k:012d}") for k in part))
        for k in part:
            got = read_reply(f)
            ok = {value("w", q).encode() for q in maybe.get(k, ())}
            ok.add(value("w", last[k]).encode() if k in last else value("key", k).encode())
            if got not in ok:
                bad += 1
    untouched = [i for i in range(0, a.keys, max(1, a.keys // 2000)) if i not in last and i not in maybe]
    s.sendall(b"".join(resp("GET", f"key:{i:012d}") for i in untouched))
    for i in untouched:
        if read_reply(f) != value("key", i).encode():
            bad += 1
    s.sendall(resp("DBSIZE"))
    size = int(read_reply(f))
    print(json.dumps({"acked_writes": acked, "keys_written": len(keys), "untouched_sampled": len(untouched),
                      "bad": bad, "dbsize": size}))
    sys.exit(1 if bad or size != a.keys else 0)


def cmd_ping(a):
    deadline = time.time() + a.wait
    while time.time() < deadline:
        try:
            s = socket.create_connection((a.host, 6379), timeout=1)
            s.sendall(resp("PING"))
            if read_reply(s.makefile("rb")) == b"PONG":
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"redis at {a.host} does not answer")


# ---- the demo ----

def make_bundle(w, criu_conf):
    b = os.path.join(w, "bundle")
    rootfs = os.path.join(b, "rootfs")
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "data"]:
        os.makedirs(os.path.join(rootfs, sub), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(rootfs, "bin/busybox"))
    os.symlink("busybox", os.path.join(rootfs, "bin/sh"))
    exe = "/usr/bin/redis-server"
    libs = [exe]
    for line in subprocess.run(["ldd", exe], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(path)
    for p in libs:
        dest = os.path.join(rootfs, p.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(os.path.realpath(p), dest)
    run(["runc", "spec", "--bundle", b])
    cfg_path = os.path.join(b, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["process"]["terminal"] = False
    cfg["root"]["readonly"] = False
    cfg["process"]["cwd"] = "/data"
    cfg["process"]["args"] = ["/usr/bin/redis-server", "--bind", "0.0.0.0", "--port", "6379",
                              "--save", "", "--appendonly", "no", "--protected-mode", "no",
                              "--dir", "/data"]
    # The host's network namespace: redis listens on the host's address.
    cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
    cfg.setdefault("annotations", {})["org.criu.config"] = criu_conf
    json.dump(cfg, open(cfg_path, "w"), indent=1)
    return b


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    for name in ["load", "write", "check", "ping"]:
        s = sub.add_parser(name)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--keys", type=int, default=0)
        s.add_argument("--acked", type=int, default=0)
        s.add_argument("--per-s", type=float, default=2000)
        s.add_argument("--max-s", type=float, default=120)
        s.add_argument("--wait", type=float, default=20)
        s.add_argument("--out", default="")
        s.add_argument("--seed", type=int, default=1)
        s.add_argument("--seq-start", type=int, default=0)
        s.add_argument("--logs", nargs="*", default=[])
    p.add_argument("--keys", type=int, default=500000, help="keys of ~1,000 bytes to load")
    p.add_argument("--rate", default="1gbit", help="link cap (tc tbf), e.g. 1gbit, 100mbit")
    p.add_argument("--rtt", type=float, default=0, help="added round-trip time in ms (NFQUEUE delay)")
    p.add_argument("--writes-per-s", type=float, default=2000, help="client write rate (0: idle)")
    p.add_argument("--moves", type=int, default=1, help="migrations, alternating a->b, b->a")
    p.add_argument("--max-downtime", default="2s")
    p.add_argument("--prefix", default="hopdemo")
    p.add_argument("--json", help="write the timelines and checks here")
    p.add_argument("--logs", metavar="DIR", help="keep the target agents' logs (hop serve) in DIR")
    p.add_argument("--variant", action="append", dest="variants", metavar="ARGS",
                   help="extra hop migrate options for a move; several are taken in turn, move by "
                        "move (e.g. --variant= --variant=--no-push): an A/B comparison in one run, "
                        "summarized per variant")
    a = p.parse_args()
    a.variants = a.variants or [""]
    if a.cmd:
        return {"load": cmd_load, "write": cmd_write, "check": cmd_check, "ping": cmd_ping}[a.cmd](a)

    me = os.path.abspath(__file__)
    w = tempfile.mkdtemp(prefix="hop-migrate-demo.", dir="/dev/shm")
    procs = []
    runc_roots = {s: os.path.join(w, f"runc-{s}") for s in "ab"}
    results = []
    try:
        run(["bash", os.path.join(ROOT, "scripts/netns.sh"), "up", a.prefix, a.rate, f"{a.rtt:g}"])
        criu_conf = os.path.join(w, "criu.conf")
        with open(criu_conf, "w") as f:
            f.write("tcp-close\nskip-in-flight\n")
        bundle = make_bundle(w, criu_conf)
        # Identities: the operator's, and one per host (each host is a target once).
        client = os.path.join(w, "id-client")
        fp = run([HOP, "keygen", "--out", client], capture_output=True, text=True).stdout.strip()
        ak = os.path.join(w, "authorized_keys")
        open(ak, "w").write(fp + "\n")
        for s in "ab":
            run([HOP, "keygen", "--out", os.path.join(w, f"id-{s}")], capture_output=True)
            root = os.path.join(w, f"root-{s}")
            os.makedirs(root)
            log = open(os.path.join(w, f"serve-{s}.log"), "w")
            procs.append(subprocess.Popen(
                enter(a.prefix, s) + [HOP, "serve", "--listen", f"{ADDR[s]}:7420", "--root", root,
                                      "--identity", os.path.join(w, f"id-{s}"), "--authorized-keys", ak,
                                      "--runc-root", runc_roots[s]],
                stdout=subprocess.DEVNULL, stderr=log))
        # Start redis at a.
        out = os.path.join(w, "redis.out")
        run(["setsid", "sh", "-c",
             f"true | {' '.join(enter(a.prefix, 'a'))} runc --root {runc_roots['a']} run -d "
             f"--bundle {bundle} redis 2>&1 | cat > {out} &"])
        run(enter(a.prefix, "a") + [sys.executable, me, "ping", "--host", ADDR["a"]])
        t = time.time()
        loader = subprocess.Popen(enter(a.prefix, "a") + [sys.executable, me, "load", "--keys", str(a.keys)],
                                  stdout=subprocess.PIPE)
        run(enter(a.prefix, "a") + ["redis-cli", "-h", ADDR["a"], "--pipe"], stdin=loader.stdout,
            stdout=subprocess.DEVNULL)
        loader.wait()
        print(f"loaded {a.keys} keys in {time.time() - t:.1f} s")
        here = "a"
        logs = []
        for move in range(a.moves):
            there = "b" if here == "a" else "a"
            log = os.path.join(w, f"writes-{move}.log")
            logs.append(log)
            writer = None if a.writes_per_s <= 0 else subprocess.Popen(
                enter(a.prefix, here) + [sys.executable, me, "write", "--host", ADDR[here], "--keys", str(a.keys),
                                         "--per-s", str(a.writes_per_s), "--out", log, "--seed", str(move + 1),
                                         "--seq-start", str(move * 10_000_000)])
            time.sleep(3)
            report = os.path.join(w, f"timeline-{move}.json")
            variant = a.variants[move % len(a.variants)]
            print(f"== migrate redis: {here} -> {there} under {a.writes_per_s:.0f} writes/s"
                  + (f" (hop migrate {variant})" if variant else ""))
            mig = subprocess.run(
                enter(a.prefix, here) + [HOP, "migrate", "--runc", "redis", "--runc-root", runc_roots[here],
                                         "--identity", client, "--known-hosts", os.path.join(w, "known_hosts"),
                                         "--accept-new", "--max-downtime", a.max_downtime,
                                         "--report-json", report, *variant.split(), f"quic://{ADDR[there]}:7420"])
            if writer is None:
                open(log, "w").close()
            else:
                try:
                    writer.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    writer.send_signal(signal.SIGTERM)
                    writer.wait()
            if mig.returncode != 0:
                sys.exit("migration failed")
            here = there
            chk = subprocess.run(
                enter(a.prefix, here) + [sys.executable, me, "check", "--host", ADDR[here],
                                         "--keys", str(a.keys), "--logs", *logs],
                capture_output=True, text=True)
            print(chk.stdout.strip() or chk.stderr.strip())
            if chk.returncode != 0:
                sys.exit("data check failed at the target")
            tl = json.load(open(report))
            check = json.loads(chk.stdout)
            results.append({"move": f"{'ab'[move % 2]}->{'ba'[move % 2]}", "variant": variant,
                            "timeline": tl, "check": check})
            print(f"all {check['keys_written']} keys written ({check['acked_writes']} acknowledged writes) and "
                  f"{check['untouched_sampled']} sampled untouched keys read back right at {ADDR[here]}")
        def summary(key, get, rs):
            v = [get(r["timeline"]) for r in rs]
            return f"{key} median {statistics.median(v):.0f} ms (min {min(v):.0f}, max {max(v):.0f})"
        final = lambda tl: tl["rounds"][-1]
        for variant in a.variants:
            rs = [r for r in results if r["variant"] == variant]
            if not rs:
                continue
            label = f" with '{variant}'" if len(a.variants) > 1 else ""
            print(f"over {len(rs)} moves{label}: " + "; ".join([
                summary("downtime", lambda tl: tl["downtime_ms"], rs),
                summary("final dump", lambda tl: final(tl)["dump_ms"], rs),
                summary("final sync", lambda tl: final(tl)["sync_ms"], rs),
                summary("restore", lambda tl: tl["restore_ms"], rs),
                summary("total", lambda tl: tl["total_ms"], rs),
            ]))
        if a.json:
            json.dump(results, open(a.json, "w"), indent=1)
    finally:
        if a.logs:
            os.makedirs(a.logs, exist_ok=True)
            for s in "ab":
                log = os.path.join(w, f"serve-{s}.log")
                if os.path.exists(log):
                    shutil.copy(log, os.path.join(a.logs, f"serve-{s}.log"))
        for s in "ab":
            subprocess.run(["runc", "--root", runc_roots[s], "delete", "-f", "redis"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pr in procs:
            pr.kill()
            pr.wait()
        subprocess.run(["bash", os.path.join(ROOT, "scripts/netns.sh"), "down", a.prefix])
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
