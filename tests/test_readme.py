"""README.md's code blocks work as shown. Each fenced block is either run here (on a CPU, from an
empty directory, as a user who installed the wheel would) or excluded by name below, with the
reason; a block that is neither fails the test, so a new block gets one or the other."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import kvtier
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Block:
    heading: str  # the "## " section it is in
    lang: str
    text: str
    line: int  # of the opening fence, 1-based

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0] if self.text.strip() else ""

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.heading!r}, starts {self.first_line!r})"


def readme_blocks(text: str) -> list[Block]:
    blocks, heading, fence, body, start = [], "", None, [], 0
    for i, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            if line.startswith("## "):
                heading = line[3:].strip()
            m = re.match(r"^(```+)\s*([\w+-]*)\s*$", line)
            if m:
                fence, lang, body, start = m.group(1), m.group(2), [], i
        elif line.strip() == fence:
            blocks.append(Block(heading, lang, "\n".join(body) + "\n", start))
            fence = None
        else:
            body.append(line)
    if fence is not None:
        raise AssertionError(f"README.md:{start}: a code block is never closed")
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))

# Blocks run by the tests below, by their first line.
RUN = {
    "python snippet": "import torch, kvtier",
    "kvtier --version and info": "kvtier --version",
    "kvtier sim": "kvtier sim --trace synthetic",
}

# Blocks not run, by their first line, and why.
EXCLUDED = {
    "from vllm import LLM": "needs vLLM, a GPU and Llama-3.1-8B's weights (tests/test_vllm_connector.py runs the "
    "connector on vLLM's CPU build)",
    "CMakeLists.txt": "the repository's layout, not a command",
}


def install_command(b: Block) -> bool:
    """The install and CI commands ("Two commands"): they change the machine, so never run here."""
    return b.text.startswith("bash") or any(s in b.text for s in ("apt-get", ".ci/run", "pip install"))


def run_marker(b: Block) -> str | None:
    return next((name for name, first in RUN.items() if b.first_line.startswith(first)), None)


def the_block(name: str) -> Block:
    found = [b for b in BLOCKS if run_marker(b) == name]
    assert len(found) == 1, f"README.md has {len(found)} blocks starting {RUN[name]!r}, expected 1"
    return found[0]


def sh(script: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``script`` in bash -e, this interpreter's environment first on PATH (its `kvtier`)."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_block_is_run_or_excluded():
    assert BLOCKS, "no code blocks found in README.md"
    unclaimed = [
        str(b)
        for b in BLOCKS
        if run_marker(b) is None and not install_command(b) and not any(b.first_line.startswith(k) for k in EXCLUDED)
    ]
    assert not unclaimed, "README blocks neither run by tests/test_readme.py nor listed in its EXCLUDED: " + "; ".join(
        unclaimed
    )
    for first in EXCLUDED:  # a stale exclusion hides nothing, but says something untrue
        assert any(b.first_line.startswith(first) for b in BLOCKS), f"EXCLUDED names {first!r}, not in README.md"
    for name in RUN:
        the_block(name)


def test_python_snippet(tmp_path):
    pytest.importorskip("torch", reason="SKIPPED: the README's Python snippet needs torch (pip install torch)")
    b = the_block("python snippet")
    proc = subprocess.run(
        [sys.executable, "-c", b.text], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"{b} failed:\n{proc.stderr}"
    shown = re.search(r"print\(.*\)\s+#\s*(\S+)\s*$", b.text, re.M)  # the output the README shows
    assert shown and proc.stdout.strip() == shown.group(1), (proc.stdout, shown)


def test_version_and_info(tmp_path):
    b = the_block("kvtier --version and info")
    proc = sh(b.text, tmp_path)
    assert proc.returncode == 0, f"{b} failed:\n{proc.stderr}"
    assert proc.stdout.startswith(f"kvtier {kvtier.__version__}\n")
    assert f"kvtier {kvtier.__version__} (Python " in proc.stdout and "I/O backend built:" in proc.stdout
    shown = re.search(r"^kvtier --version\s+#\s*(.+)$", b.text, re.M)
    assert shown is None or shown.group(1).strip() == f"kvtier {kvtier.__version__}", "README shows another version"


def test_sim_example(tmp_path):
    b = the_block("kvtier sim")
    proc = sh(b.text, tmp_path)
    assert proc.returncode == 0, f"{b} failed:\n{proc.stderr}"
    requests = re.search(r"synthetic:(\d+)", b.text)
    assert f"trace: {requests.group(1) if requests else 4000} requests" in proc.stdout
    assert "all tiers" in proc.stdout and "no cache" in proc.stdout and "SSD writes" in proc.stdout


def test_blocks_are_found_with_their_sections():
    blocks = readme_blocks("# t\n## A\n```bash\nx\n```\ntext\n## B\n````python\ny\n```\nz\n````\n")
    assert [(b.heading, b.lang, b.text, b.line) for b in blocks] == [
        ("A", "bash", "x\n", 3),
        ("B", "python", "y\n```\nz\n", 8),
    ]
    with pytest.raises(AssertionError, match="never closed"):
        readme_blocks("```bash\nx\n")
