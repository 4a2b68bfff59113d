#!/usr/bin/env python3
"""Writes a deterministic sparse raw disk image for benchmarks, laid out like a used filesystem:
runs of incompressible data (random bytes), compressible data (log-like text) and holes, with run
lengths from 64 KiB to 64 MiB.

usage: gen_image.py OUT SIZE [--holes F] [--compressible F] [--seed N]
       gen_image.py OUT SIZE --spread DATA   DATA bytes of random data in 16 runs spread over SIZE

SIZE and DATA accept K/M/G/T suffixes (powers of 1024). Defaults: 40% holes, 20% compressible,
the rest (40%) incompressible. The same arguments always give the same bytes.
"""
import argparse
import random

ALIGN = 64 << 10
BLOCK = 4 << 20


def parse_size(s):
    units = {"k": 10, "m": 20, "g": 30, "t": 40}
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    if s and s[-1] in units:
        return int(float(s[:-1]) * (1 << units[s[-1]]))
    return int(s)


def text_pool(rng, size):
    """Log-like lines: compress well (zlib ~5x) but are not all one byte."""
    words = [b"kernel:", b"systemd[1]:", b"Started", b"session", b"eth0", b"link", b"up",
             b"audit:", b"type=1400", b"apparmor=ALLOWED", b"operation=open", b"INFO", b"WARN"]
    out = bytearray()
    while len(out) < size:
        out += b"Nov 24 %02d:%02d:%02d host " % (rng.randrange(24), rng.randrange(60), rng.randrange(60))
        out += b" ".join(rng.choice(words) for _ in range(rng.randrange(4, 12)))
        out += b" id=%d\n" % rng.randrange(1 << 20)
    return bytes(out[:size])


def write_run(f, rng, pool, offset, length, kind):
    f.seek(offset)
    while length > 0:
        n = min(length, BLOCK)
        if kind == "random":
            f.write(rng.randbytes(n))
        else:
            start = rng.randrange(len(pool) - n + 1) if n < len(pool) else 0
            f.write(pool[start:start + n])
        length -= n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("size", type=parse_size)
    ap.add_argument("--holes", type=float, default=0.4)
    ap.add_argument("--compressible", type=float, default=0.2)
    ap.add_argument("--spread", type=parse_size, help="write only this much random data, in 16 runs")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    pool = text_pool(rng, 2 * BLOCK)
    with open(a.out, "wb") as f:
        f.truncate(a.size)
        if a.spread is not None:
            runs = 16
            run = a.spread // runs // ALIGN * ALIGN
            for i in range(runs):
                write_run(f, rng, pool, i * (a.size // runs) // ALIGN * ALIGN, run, "random")
            return
        # Each run goes to the kind furthest behind its share so far, so the image has the
        # requested shares at any size (a coin per run drifts a lot with few, long runs).
        shares = {"hole": a.holes, "text": a.compressible, "random": 1 - a.holes - a.compressible}
        written = dict.fromkeys(shares, 0)
        offset = 0
        while offset < a.size:
            length = min(int(2 ** rng.uniform(16, 26)) // ALIGN * ALIGN or ALIGN, a.size - offset)
            end = offset + length
            kind = max(shares, key=lambda k: shares[k] * end - written[k] + rng.random())
            if kind != "hole":
                write_run(f, rng, pool, offset, length, kind)
            written[kind] += length
            offset = end

if __name__ == "__main__":
    main()
