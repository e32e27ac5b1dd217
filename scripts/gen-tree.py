#!/usr/bin/env python3
"""Generate a deterministic benchmark workload, or edit one in place.

  gen-tree.py make DIR [--kind KIND] [--size-mib N] [--seed S]
  gen-tree.py edit DIR [--kind KIND] [--pages-pct P] [--insertions K] [--seed S]

Kinds:
  tree     big/: 8 files of 4 KiB pages (incompressible, like memory images), small/: many small
           text-like files in nested directories, a few symlinks and an empty file. Edit:
           rewrite P% of the pages of big/ files at random page offsets and insert K short runs
           of bytes at random offsets (shifting the rest of those files).
  bigfile  one file big/disk.img of random pages (a VM disk or a memory image). Edit: as tree.
  rootfs   a container root filesystem: files copied from this host's /etc, /usr/share, /usr/bin,
           /usr/sbin, /usr/libexec and /usr/lib, in that order, until the size is reached (tens of thousands of files). Edit, like a package
           upgrade: 3% of the files get a new version (a byte changed every ~300 bytes, as a
           rebuilt binary differs all over), 1% new files, 0.5% removed.
  mixed    text/: compressible text (logs, JSON, source-like) in 1-8 MiB files, half the size;
           big/: random pages, the other half. Edit: as tree on big/, and appends to text/.
"""
import argparse, os, random, shutil, sys

PAGE = 4096

def rand_bytes(rng, n):
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""

def make(d, size_mib, seed):
    rng = random.Random(seed)
    big = os.path.join(d, "big"); small = os.path.join(d, "small")
    os.makedirs(big, exist_ok=True); os.makedirs(small, exist_ok=True)
    total = size_mib << 20
    small_budget = total // 20
    big_budget = total - small_budget
    n_big = 8
    per = (big_budget // n_big) // PAGE * PAGE
    for i in range(n_big):
        with open(os.path.join(big, f"blob-{i}.bin"), "wb") as f:
            left = per
            while left:
                n = min(left, 1 << 20)
                f.write(rand_bytes(rng, n)); left -= n
    words = [b"alpha", b"beta", b"gamma", b"delta", b"config", b"value", b"true", b"false", b"\n"]
    used = 0; i = 0
    while used < small_budget:
        sub = os.path.join(small, f"d{i % 37:02d}", f"e{i % 11}")
        os.makedirs(sub, exist_ok=True)
        n = rng.randint(200, 60000)
        body = b" ".join(rng.choice(words) for _ in range(n // 6))
        with open(os.path.join(sub, f"f{i:05d}.txt"), "wb") as f:
            f.write(body)
        used += len(body); i += 1
    open(os.path.join(d, "empty"), "wb").close()
    for name, target in [("link-rel", "small/d00"), ("link-abs", "/etc/hostname"), ("link-dangling", "nowhere")]:
        p = os.path.join(d, name)
        if not os.path.lexists(p):
            os.symlink(target, p)
    os.chmod(os.path.join(big, "blob-0.bin"), 0o600)
    print(f"made {d}: {n_big} big files of {per >> 20} MiB, {i} small files", file=sys.stderr)

def make_bigfile(d, size_mib, seed):
    rng = random.Random(seed)
    big = os.path.join(d, "big")
    os.makedirs(big, exist_ok=True)
    left = (size_mib << 20) // PAGE * PAGE
    with open(os.path.join(big, "disk.img"), "wb") as f:
        while left:
            n = min(left, 1 << 20)
            f.write(rand_bytes(rng, n)); left -= n
    print(f"made {d}: one file of {size_mib} MiB", file=sys.stderr)

ROOTFS_FROM = ["/etc", "/usr/share", "/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib"]

def make_rootfs(d, size_mib, seed):
    budget = size_mib << 20
    used = files = 0
    for top in ROOTFS_FROM:
        for root, dirs, names in os.walk(top):
            dirs.sort(); names.sort()
            rel = os.path.relpath(root, "/")
            os.makedirs(os.path.join(d, rel), exist_ok=True)
            for n in names:
                if used >= budget:
                    print(f"made {d}: rootfs of {files} files, {used >> 20} MiB", file=sys.stderr)
                    return
                src = os.path.join(root, n); dst = os.path.join(d, rel, n)
                try:
                    if os.path.islink(src):
                        os.symlink(os.readlink(src), dst)
                    elif os.path.isfile(src):
                        shutil.copy2(src, dst)
                        used += os.path.getsize(dst); files += 1
                except OSError:
                    pass  # unreadable or vanished: not part of the workload
    print(f"made {d}: rootfs of {files} files, {used >> 20} MiB", file=sys.stderr)

def regular_files(d):
    out = []
    for root, dirs, names in os.walk(d):
        dirs.sort()
        out += [os.path.join(root, n) for n in sorted(names) if os.path.isfile(os.path.join(root, n))
                and not os.path.islink(os.path.join(root, n))]
    return out

def edit_rootfs(d, seed):
    rng = random.Random(seed)
    files = regular_files(d)
    upgraded = rng.sample(files, max(1, len(files) * 3 // 100))
    for p in upgraded:
        data = bytearray(open(p, "rb").read())
        for at in range(rng.randrange(300), len(data), 300):
            data[at] = (data[at] + 1) % 256
        os.chmod(p, 0o644)
        open(p, "wb").write(data)
    added = rng.sample(files, max(1, len(files) // 100))
    for i, p in enumerate(added):
        open(f"{p}.new{seed}-{i}", "wb").write(open(p, "rb").read() + f"version {seed}\n".encode())
    removed = [p for p in rng.sample(files, max(1, len(files) // 200)) if p not in upgraded and p not in added]
    for p in removed:
        os.unlink(p)
    print(f"edited {d}: {len(upgraded)} files upgraded, {len(added)} added, {len(removed)} removed", file=sys.stderr)

def make_mixed(d, size_mib, seed):
    rng = random.Random(seed)
    text = os.path.join(d, "text")
    os.makedirs(text, exist_ok=True)
    budget = (size_mib << 20) // 2
    words = ("GET POST /api/v1/items user_id session ok error timeout retry 200 404 500 "
             "fn let mut match return struct impl pub use self None Some true false "
             "\"name\": \"value\", \"count\": ").split(" ")
    used = i = 0
    while used < budget:
        n = min(rng.randint(1, 8) << 20, budget - used)
        with open(os.path.join(text, f"t{i:03d}.log"), "w") as f:
            written = 0
            while written < n:
                line = f"{1700000000 + written} " + " ".join(rng.choice(words) for _ in range(12)) + f" {rng.randrange(10**6)}\n"
                f.write(line); written += len(line)
        used += n; i += 1
    make_bigfile(d, size_mib - (used >> 20), seed + 1)
    print(f"made {d}: {i} text files ({used >> 20} MiB) and random pages", file=sys.stderr)

def append_text(d, seed):
    rng = random.Random(seed)
    text = os.path.join(d, "text")
    for p in sorted(os.listdir(text))[::3]:
        with open(os.path.join(text, p), "a") as f:
            for _ in range(2000):
                f.write(f"{seed} appended {rng.randrange(10**9)} ok\n")

def edit(d, pct, insertions, seed):
    rng = random.Random(seed)
    big = os.path.join(d, "big")
    files = sorted(os.path.join(big, f) for f in os.listdir(big))
    pages = 0
    for p in files:
        size = os.path.getsize(p)
        n = int(size // PAGE * pct / 100)
        with open(p, "r+b") as f:
            for off in rng.sample(range(size // PAGE), n):
                f.seek(off * PAGE); f.write(rand_bytes(rng, PAGE))
        pages += n
    for k in range(insertions):
        p = files[rng.randrange(len(files))]
        data = open(p, "rb").read()
        at = rng.randrange(len(data))
        ins = rand_bytes(rng, rng.randint(1, 3000))
        with open(p, "wb") as f:
            f.write(data[:at]); f.write(ins); f.write(data[at:])
    print(f"edited {d}: {pages} pages rewritten, {insertions} insertions", file=sys.stderr)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make", "edit"]); ap.add_argument("dir")
    ap.add_argument("--kind", choices=["tree", "bigfile", "rootfs", "mixed"], default="tree")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--pages-pct", type=float, default=1.0)
    ap.add_argument("--insertions", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.mode == "make":
        {"tree": make, "bigfile": make_bigfile, "rootfs": make_rootfs, "mixed": make_mixed}[a.kind](
            a.dir, a.size_mib, a.seed)
    elif a.kind == "rootfs":
        edit_rootfs(a.dir, a.seed + 1000)
    else:
        edit(a.dir, a.pages_pct, a.insertions, a.seed + 1000)
        if a.kind == "mixed":
            append_text(a.dir, a.seed + 1000)

main()
