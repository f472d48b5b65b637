"""bench/results, which `kvtier sim --calibrate bench/results` reads: its README indexes every file
(one line each) and names no file that is not there, and it holds one run per bench x machine
(the files of a bench on one machine share their date and commit; earlier runs live in git)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
NAME = re.compile(r"^(?P<bench>[a-z0-9_]+)-(?P<workload>[^-]+)-(?P<machine>[a-z0-9]+)-(?P<date>\d{4}-\d\d-\d\d)\.json$")


def index_rows() -> dict[str, list[str]]:
    """README.md's table: {file: its cells after the file name}."""
    rows = {}
    for line in (RESULTS / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("file", "") and not set(cells[0]) <= set("-: "):
            assert cells[0] not in rows, f"bench/results/README.md lists {cells[0]} twice"
            rows[cells[0]] = cells[1:]
    return rows


def results_files() -> list[str]:
    return sorted(p.name for p in RESULTS.iterdir() if p.name != "README.md")


def test_the_index_lists_every_file_and_only_those():
    rows, files = index_rows(), results_files()
    assert sorted(rows) == files, {
        "not in the index": sorted(set(files) - set(rows)),
        "indexed but absent": sorted(set(rows) - set(files)),
    }
    for name, cells in rows.items():
        assert len(cells) == 5 and all(cells), f"{name}: bench, machine, date, what, headline ratio: {cells}"


def test_each_file_is_a_bench_document_named_as_it_says():
    rows = index_rows()
    for name in results_files():
        m = NAME.match(name)
        assert m, f"{name}: not <bench>-<workload>-<machine>-<date>.json"
        doc = json.loads((RESULTS / name).read_text())
        assert (doc["bench"], doc["workload"], doc["date"]) == (m["bench"], m["workload"], m["date"]), name
        bench, _, date = rows[name][:3]
        assert (bench, date) == (doc["bench"], doc["date"]), f"{name}: the index says {bench}, {date}"
        assert doc["results"], name


def test_one_run_per_bench_and_machine():
    runs = defaultdict(set)
    for name in results_files():
        m = NAME.match(name)
        doc = json.loads((RESULTS / name).read_text())
        runs[(m["bench"], m["machine"])].add((doc["date"], doc.get("commit")))
    several = {k: sorted(v) for k, v in runs.items() if len(v) > 1}
    assert not several, f"several runs of one bench on one machine (keep the current one): {several}"
