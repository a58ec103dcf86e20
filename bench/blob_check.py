"""The local store's check on a cold load: a blob linked into the blob cache, checked against
its BLAKE3 file (``registry/blobs.py``) vs read again for its sha256 (the fallback), and the
BLAKE3 on one core (what ``link`` did before large blobs were hashed on every core).

For each adapter size, stores one random blob in a ``LocalBlobStore`` in a scratch folder,
then links it into a fresh destination ``--repeats`` times in each way, alternating (against
drift), with the file in the page cache as after a push. The sha256 way is a hard link and
the sha256 of the linked file: what ``link`` did before, and does where the BLAKE3 file is
missing or wrong.
Prints the medians and their ratios, writes ``bench/results/blob_check.json`` and the table in
``bench/README.md``. Takes seconds; run it alone.

    .venv/bin/python -m bench.blob_check
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import blake3

from bench._common import SCRATCH, machine_line, ratio, update_readme, write_result
from loraplex.registry.blobs import LocalBlobStore, blob_key, sha256_file

#: (label, bytes): the bench adapters (rank 8 on q/v of the bundled model), the demo
#: adapters, and a rank-16 all-linear adapter of an 8B model in bf16.
SIZES = [
    ("rank 8 q/v, bundled model (bench adapters)", 1_859_016),
    ("demo adapter, bundled model", 19_593_064),
    ("rank 16 all-linear, 8B model, bf16", 83_886_080),
]


def _link_ms(store: LocalBlobStore, digest: str, into: Path, check: str) -> float:
    """One cold load's link and check: ``blake3`` (``link``), ``blake3 one core`` (a link
    and the BLAKE3 on one core: ``link`` before large blobs used every core) or ``sha256``
    (what ``link`` did before it kept BLAKE3 files, and still does where one is missing or
    wrong)."""
    dest = into / "blob"
    dest.unlink(missing_ok=True)
    stored = store.root / blob_key(digest)
    began = time.perf_counter()
    if check == "blake3":
        store.link(digest, dest)
    elif check == "blake3 one core":
        os.link(stored, dest)
        recorded = stored.with_name(f"{stored.name}.blake3").read_text().strip()
        assert blake3.blake3(max_threads=1).update_mmap(dest).hexdigest() == recorded
    else:
        os.link(stored, dest)
        assert sha256_file(dest) == digest
    return (time.perf_counter() - began) * 1e3


def measure_size(size: int, repeats: int, scratch: Path) -> dict[str, float | int]:
    """Median link times (ms) of one ``size``-byte blob, each way, and sha256 / BLAKE3."""
    store = LocalBlobStore(scratch / "blobs")
    source = scratch / "source"
    source.write_bytes(os.urandom(size))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    store.put(digest, source)
    (scratch / "cache").mkdir()
    samples: dict[str, list[float]] = {"blake3": [], "blake3 one core": [], "sha256": []}
    for _ in range(repeats):
        for check, times in samples.items():
            times.append(_link_ms(store, digest, scratch / "cache", check))
    blake3_ms = statistics.median(samples["blake3"])
    one_core_ms = statistics.median(samples["blake3 one core"])
    sha256_ms = statistics.median(samples["sha256"])
    return {
        "bytes": size,
        "blake3_ms": round(blake3_ms, 2),
        "blake3_one_core_ms": round(one_core_ms, 2),
        "sha256_ms": round(sha256_ms, 2),
        "one_core_over_blake3": ratio(one_core_ms, blake3_ms),
        "sha256_over_blake3": ratio(sha256_ms, blake3_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    started = datetime.now(UTC)
    rows = {}
    SCRATCH.mkdir(parents=True, exist_ok=True)
    for label, size in SIZES:
        scratch = Path(tempfile.mkdtemp(dir=SCRATCH))  # one file system: the link is a link
        try:
            rows[label] = measure_size(size, args.repeats, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"{label}: {rows[label]}", flush=True)
    write_result("blob_check", {"repeats": args.repeats, "sizes": rows})
    lines = [
        f"Machine: {machine_line()}; load average after the run "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}. "
        f"Run {started:%Y-%m-%d %H:%M} UTC, medians of {args.repeats} links each way.",
        "",
        "| adapter | MiB | BLAKE3 file ms | BLAKE3 on one core ms | sha256 ms "
        "| one core / BLAKE3 | sha256 / BLAKE3 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {label} | {row['bytes'] / 2**20:.1f} | {row['blake3_ms']} "
            f"| {row['blake3_one_core_ms']} | {row['sha256_ms']} "
            f"| {row['one_core_over_blake3']} | {row['sha256_over_blake3']} |"
            for label, row in rows.items()
        ),
    ]
    update_readme("blob_check", "\n".join(lines))


if __name__ == "__main__":
    main()
