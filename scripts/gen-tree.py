#!/usr/bin/env python3
"""Generate a deterministic test tree, or edit one in place.

  gen-tree.py make DIR [--size-mib N] [--seed S]
      big/: files of 4 KiB pages (incompressible, like memory images), plus small/: many small
      text-like files in nested directories, plus a few symlinks and an empty file.
  gen-tree.py edit DIR [--pages-pct P] [--insertions K] [--seed S]
      rewrite P% of the 4 KiB pages of big/ files at random page offsets and insert K short runs
      of bytes at random offsets (shifting the rest of those files).
"""
import argparse, os, random, sys

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
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--pages-pct", type=float, default=1.0)
    ap.add_argument("--insertions", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    (make(a.dir, a.size_mib, a.seed) if a.mode == "make" else edit(a.dir, a.pages_pct, a.insertions, a.seed + 1000))

main()
