"""What the content manifest costs: sealing a saved artefact, checking it on load (sampled), verifying it (whole).

Writes an artefact with one large file (weights or a faiss index stand-in) and a handful of small ones through
genret's artefact layer, then times:

- seal (at save: every file hashed whole once, SHA-256),
- the load check (size + sampled blocks for files over 8 MiB, whole hash below: constant time per large file),
- ``genret verify`` (every file hashed whole),
- reading the large file once (the floor any full check pays), for the ratio.

    python scripts/bench_manifest.py --gib 2 [--json] [--dir /tmp]

Best of 3 for the check and verify; seal is timed once (it is the save). Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import best_of  # noqa: E402

from genret._io import _parse, check_files, verify  # noqa: E402
from genret._swap import atomic_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of the large file in GiB (default: 2)")
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        path = Path(root) / "artefact"
        start = time.perf_counter()
        with atomic_dir(path, ("genret.bench",)) as tmp:
            block = os.urandom(1 << 24)
            with open(tmp / "weights.safetensors", "wb") as fh:
                for _ in range(size // len(block)):
                    fh.write(block)
                fh.write(block[: size % len(block)])
            for i in range(20):
                (tmp / f"small-{i}.json").write_text(json.dumps({"i": i, "pad": "x" * 10_000}))
            write_seconds = time.perf_counter() - start
            (tmp / "manifest.json").write_text(json.dumps({"format": "genret.bench", "version": 1}))
            seal_start = time.perf_counter()
        total = time.perf_counter() - start
        seal_seconds = total - (seal_start - start)
        manifest = _parse(path / "manifest.json")
        check = best_of(lambda: _fresh_check(path, manifest))
        full = best_of(lambda: verify(path))
        read = best_of(lambda: _read(path / "weights.safetensors"))
    out = {"gib": args.gib, "files": 21, "write_s": round(write_seconds, 2), "seal_s": round(seal_seconds, 2),
           "load_check_ms": round(check * 1000, 2), "verify_s": round(full, 2), "read_once_s": round(read, 2),
           "verify_over_read": round(full / read, 2), "load_check_over_verify": round(check / full, 5)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.gib} GiB file + 20 small: write {out['write_s']} s, seal {out['seal_s']} s; load check "
          f"{out['load_check_ms']} ms; verify {out['verify_s']} s (reading the file once: {out['read_once_s']} s, "
          f"ratio {out['verify_over_read']})")


def _fresh_check(path: Path, manifest: dict) -> int:
    """The load check without the process's memo of hashes (as a fresh process pays it)."""
    import genret._io as io

    io._HASHES.clear()
    return check_files(path, manifest)


def _read(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


if __name__ == "__main__":
    main()
