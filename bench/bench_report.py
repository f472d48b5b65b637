"""Facts every Python bench records in its result document (format in BENCH.md): the machine and
the commit. The Python counterpart of bench/bench_json.h; benches import it from their folder."""

from __future__ import annotations

import os

from kvtier.bench_info import cpu_model, git_commit, machine  # noqa: F401  (benches import them from here)


def publish(
    bench: str,
    workload: str,
    tag: str,
    results: list[dict],
    out_dir: str | None,
    *,
    machine_name: str | None = None,
    indent: int = 2,
    **extra,
) -> dict:
    """Build the result document (BENCH.md), print it, and write it to
    ``out_dir/<bench>-<workload>-<tag>-<date>.json`` when ``out_dir`` is set. ``tag`` is the GPU
    ("h100") or "cpu"; ``extra`` keys are added to the document. Returns the document."""
    import datetime
    import json
    import sys

    doc = {
        "bench": bench,
        "workload": workload,
        "machine": machine_name or machine(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "results": results,
        **extra,
    }
    text = json.dumps(doc, indent=indent)
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{bench}-{workload}-{tag}-{doc['date']}.json")
        with open(path, "w") as f:
            f.write(text + "\n")
        print("wrote", path, file=sys.stderr)
    return doc
