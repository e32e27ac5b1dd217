#!/usr/bin/env python3
"""How the pages of a CRIU memory image moved between two dumps.

    python3 benchmarks/harness/page_moves.py DUMP1/pages-1.img DUMP2/pages-1.img

For every 4 KiB page of the second image: the same content at the same offset of the first
(`same`), at a lower offset of the first (`up`: the page moved towards the end of the file),
at a higher one (`down`), or nowhere (`new`); then the longest runs of pages that moved
together, as (first page in image 2, pages, shift in pages). This is what decides how an
in-place update must order its copies (`engine/src/inplace.rs`).
"""
import sys, hashlib, collections
P=4096
def pages(p):
    d=open(p,'rb').read()
    return [hashlib.md5(d[i:i+P]).digest() for i in range(0,len(d),P)]
a=pages(sys.argv[1]); b=pages(sys.argv[2])
where={}
for i,h in enumerate(a): where.setdefault(h,i)
runs=[]  # (start new page, len, shift or None)
cur=None
for j,h in enumerate(b):
    i=where.get(h)
    s=None if i is None else j-i
    if cur and cur[2]==s: cur[1]+=1
    else:
        if cur: runs.append(tuple(cur))
        cur=[j,1,s]
runs.append(tuple(cur))
by=collections.Counter()
for st,l,s in runs: by['new' if s is None else ('same' if s==0 else ('up' if s>0 else 'down'))]+=l
print("pages", len(b), dict(by), "runs", len(runs))
big=[r for r in runs if r[1]>=256]
print("runs >= 1 MiB:", len(big), "covering", sum(r[1] for r in big))
for r in sorted(runs,key=lambda r:-r[1])[:15]: print(r)
