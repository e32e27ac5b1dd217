#!/usr/bin/env python3
"""Two successive full CRIU dumps of a memory-heavy redis, synced with hop and rsync.

Run through scripts/bench-criu.sh. Loads redis with --keys 1 KB values (~500 MiB at 500k),
dumps it with --leave-running, overwrites random existing keys for --seconds under a bounded
rate, dumps it again (killing dump), then syncs the second dump onto a copy of the first with:
hop (page chunks + deltas, the default), hop --no-delta, hop --no-page-chunks, hop with zstd,
hop --sender-basis (the sender still has dump 1, as in a migration), and rsync -a --no-whole-file. Counts "pages with new content" (4 KiB pages of dump 2 whose content
is nowhere in dump 1) and restores redis from hop's copy to check every key.
"""
import argparse, hashlib, json, os, random, shutil, socket, subprocess, sys, time


def sh(*a, **kw):
    return subprocess.run(a, check=True, **kw)


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout.strip()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def value(i):
    return hashlib.blake2b(str(i).encode(), digest_size=64).hexdigest() * 8  # 1 KiB, text


def pages(path):
    out = []
    with open(path, "rb") as f:
        while True:
            b = f.read(4096)
            if not b:
                return out
            out.append(hashlib.blake2b(b, digest_size=16).digest())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--keys", type=int, default=500_000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rate", type=int, default=2000, help="overwrites per second")
    ap.add_argument("--dumps-only", action="store_true",
                    help="only make the two dumps (WORK/dump1, WORK/dump2) and WORK/limit.json")
    a = ap.parse_args()
    hop = os.path.join(a.repo, "target/release/hop")
    w = a.work
    port = free_port()
    redis = subprocess.Popen(["setsid", "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", w],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while cli(port, "PING") != "PONG":
        time.sleep(0.05)
    t = time.time()
    load = subprocess.Popen(["redis-cli", "-p", str(port), "--pipe"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    for i in range(a.keys):
        load.stdin.write(f"SET key:{i:012} {value(i)}\r\n".encode())
    load.stdin.close()
    load.wait()
    print(f"loaded {cli(port, 'DBSIZE')} keys in {time.time() - t:.1f} s; "
          f"used_memory {int(cli(port, 'INFO', 'memory').split('used_memory:')[1].split()[0]) >> 20} MiB")

    def dump(d, leave):
        args = [hop, "checkpoint", "--pid", str(redis.pid), "--dir", d, "--json"]
        if leave:
            args.append("--leave-running")
        return json.loads(subprocess.check_output(args))

    d1, d2 = f"{w}/dump1", f"{w}/dump2"
    s1 = dump(d1, True)
    # Bounded write load: overwrite random existing keys.
    rng = random.Random(1)
    t0 = time.time()
    n = 0
    changed = {}
    with subprocess.Popen(["redis-cli", "-p", str(port), "--pipe"], stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL) as p:
        while time.time() - t0 < a.seconds:
            for _ in range(a.rate // 10):
                i = rng.randrange(a.keys)
                v = value(i + 10_000_000 * (n + 1))
                changed[i] = v
                p.stdin.write(f"SET key:{i:012} {v}\r\n".encode())
                n += 1
            p.stdin.flush()
            time.sleep(0.1)
    time.sleep(0.3)
    s2 = dump(d2, False)
    redis.wait()
    print(f"dump 1: frozen {s1['frozen_ms']:.0f} ms, {s1['pages_written']} pages; "
          f"{n} overwrites in {a.seconds} s; dump 2: frozen {s2['frozen_ms']:.0f} ms, {s2['pages_written']} pages")

    p1, p2 = pages(f"{d1}/pages-1.img"), pages(f"{d2}/pages-1.img")
    have = set(p1)
    new_pages = sum(1 for h in p2 if h not in have)
    same_offset = sum(1 for i, h in enumerate(p2) if i < len(p1) and p1[i] == h)
    new_bytes = new_pages * 4096
    total = os.path.getsize(f"{d2}/pages-1.img")
    print(f"pages-1.img: {len(p2)} pages; same at the same offset {same_offset} "
          f"({100 * same_offset / len(p2):.1f} %); new content {new_pages} pages = {new_bytes / 1e6:.1f} MB "
          f"({100 * new_pages / len(p2):.1f} %)")

    if a.dumps_only:
        # The physical limit of a delta sync: the pages with new content, compressed (zlib level
        # 6, close to zstd's low levels on this data).
        import zlib
        z = zlib.compressobj(6)
        comp = 0
        with open(f"{d2}/pages-1.img", "rb") as f:
            for h in p2:
                b = f.read(4096)
                if h not in have:
                    comp += len(z.compress(b))
        comp += len(z.flush())
        json.dump({"new_bytes": new_bytes, "new_bytes_compressed": comp, "keys": a.keys,
                   "overwrites": n}, open(f"{w}/limit.json", "w"))
        print(f"new-content pages compressed: {comp / 1e6:.1f} MB; dumps in {d1} and {d2}")
        return

    rows = []
    for name, extra in [("hop (page chunks + deltas)", []), ("hop --no-delta", ["--no-delta"]),
                        ("hop --no-page-chunks", ["--no-page-chunks"]),
                        ("hop --compress zstd:1", ["--compress", "zstd:1"]),
                        ("hop --sender-basis DUMP1 (sender keeps round 1)", ["--sender-basis", d1])]:
        dst = f"{w}/dst-{len(rows)}"
        shutil.copytree(d1, dst, symlinks=True)
        t = time.time()
        st = json.loads(subprocess.check_output([hop, "sync", "-q", "--no-index-cache", "--stats-json", "-",
                                                 *extra, f"{d2}/", dst]))
        dt = time.time() - t
        sh("diff", "-r", d2, dst)
        rows.append((name, st["bytes_wire"], dt))
        if len(rows) == 1:
            hop_dst = dst
    rs = f"{w}/dst-rsync"
    shutil.copytree(d1, rs, symlinks=True)
    t = time.time()
    out = subprocess.check_output(["rsync", "-a", "--no-whole-file", "--stats", f"{d2}/", rs], text=True)
    dt = time.time() - t
    sent = int(out.split("Total bytes sent:")[1].split()[0].replace(",", ""))
    recv = int(out.split("Total bytes received:")[1].split()[0].replace(",", ""))
    rows.append(("rsync -a --no-whole-file", sent + recv, dt))
    sh("diff", "-r", d2, rs)

    print(f"\n| tool | bytes between the two halves | x new-content pages | wall s (local) |")
    print("| --- | --- | --- | --- |")
    for name, b, dt in rows:
        print(f"| {name} | {b / 1e6:.1f} MB | {b / new_bytes:.2f} | {dt:.2f} |")

    # The copy hop made restores into a redis with every key.
    restored = subprocess.check_output([hop, "restore", "--dir", hop_dst, "-q"], text=True).strip()
    ok = cli(port, "DBSIZE") == str(a.keys)
    for i in list(changed)[:200] + [0, a.keys - 1]:
        want = changed.get(i, value(i))
        ok = ok and cli(port, "GET", f"key:{i:012}") == want
    print(f"\nrestored redis (PID {restored}) from hop's copy: {'all keys intact' if ok else 'DATA WRONG'}")
    cli(port, "SHUTDOWN", "NOSAVE")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
