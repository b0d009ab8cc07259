#!/usr/bin/env python3
"""Why relsync makes a release durable with one syncfs instead of an fsync per file and directory.

Usage: benches/durability.py RELEASE_DIR [FILES]
RELEASE_DIR should be a release on the file system you care about (ext4 here). FILES (default 601,
the changed files of the generated release pair) files are rewritten into fresh inodes before each
timed run, then made durable either by fsync of each file and each directory, or by one syncfs.
Prints the median of 5 runs of each, measured alternately in the same run.
"""
import ctypes
import os
import statistics
import sys
import time

root = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 601
files, dirs = [], []
for d, _, fs in os.walk(root):
    dirs.append(d)
    files.extend(os.path.join(d, f) for f in fs)
files = files[:: max(1, len(files) // count)][:count]
libc = ctypes.CDLL(None, use_errno=True)


def rewrite():
    for p in files:
        data = open(p, "rb").read()
        with open(p + ".tmp", "wb") as f:
            f.write(data)
        os.replace(p + ".tmp", p)


def fsync_each():
    for p in files + dirs:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def syncfs():
    fd = os.open(root, os.O_RDONLY)
    if libc.syncfs(fd) != 0:
        raise OSError(ctypes.get_errno(), "syncfs")
    os.close(fd)


results = {"fsync each file and directory": [], "one syncfs": []}
for _ in range(5):
    for name, fn in zip(results, (fsync_each, syncfs)):
        os.sync()
        rewrite()
        t = time.perf_counter()
        fn()
        results[name].append(time.perf_counter() - t)
print(f"{len(files)} rewritten files, {len(dirs)} directories under {root}")
for name, v in results.items():
    print(f"{name}: median {statistics.median(v) * 1000:.1f} ms (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})")
