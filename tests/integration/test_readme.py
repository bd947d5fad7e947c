"""Every README snippet runs as written: each fenced ``python``, ``sh``/``bash`` block, and any block that calls
``curl``, in README order, against a live ``ferry serve`` of the example repository started here.

A block that only illustrates (it starts ``make run``, runs a long benchmark, needs a GPU) is preceded by
``<!-- snippet: skip (why) -->``, and the reason is required. Snippets use the README's addresses (gRPC
127.0.0.1:8001, HTTP 127.0.0.1:8000); the harness points them at the test server's free ports. They run in a
scratch directory that looks like the root of the clone (``.venv``, ``examples/models``), with the ``.venv``
Python, bash with ``-euo pipefail``, and a time limit each.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serving import ferry_serve, grpc_address

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUNS = ("python", "sh", "bash")
MARKER = re.compile(r"<!-- snippet: skip \((?P<why>.+)\) -->")
TOOL = re.compile(r"(?<![\w/.-])(\.venv/bin/[\w.-]+|curl|jq)\b")
BLOCK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Block:
    line: int
    """Line of the opening fence (1-based)."""
    lang: str
    text: str
    skip: str | None
    """Why the block is an illustration only, or None: it runs."""


def extract(markdown: str) -> list[Block]:
    """The blocks that run, in order: fenced ``python``/``sh``/``bash``, and any other fenced block calling curl.
    A skip marker must be the last non-blank line before its fence and give a reason."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang = lines[i][3:].strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"line {i + 1}: the fence is never closed")
        text = "\n".join(lines[i + 1 : end]) + "\n"
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        marker = MARKER.fullmatch(before)
        if before.startswith("<!-- snippet") and marker is None:
            raise ValueError(f"line {i + 1}: a marker reads <!-- snippet: skip (why) -->, not {before!r}")
        if lang in RUNS or re.search(r"\bcurl\b", text):
            blocks.append(Block(i + 1, lang, text, marker["why"] if marker else None))
        elif marker is not None:
            raise ValueError(f"line {i + 1}: a skip marker on a {lang or 'plain'} block, which never runs")
        i = end + 1
    return blocks


def check(block: Block, cwd: Path, addresses: dict[str, str], timeout_s: float = BLOCK_TIMEOUT_S) -> None:
    """Run one block (the README's addresses replaced by ``addresses``); fail with its output unless it exits 0
    within ``timeout_s``."""
    text = block.text
    for readme, actual in addresses.items():
        text = text.replace(readme, actual)
    command = [sys.executable, "-"] if block.lang == "python" else ["bash", "-euo", "pipefail", "-s"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as if run from the root of the clone
    try:
        proc = subprocess.run(command, input=text, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{block.line}: still running after {timeout_s:g} s:\n{text}")
    if proc.returncode != 0:
        pytest.fail(
            f"README.md:{block.line}: exit status {proc.returncode}\n{text}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )


def missing_tools(block: Block, cwd: Path) -> list[str]:
    """Tools a shell block calls that are not installed here."""
    if block.lang == "python":
        return []
    tools = sorted(set(TOOL.findall(block.text)))
    return [t for t in tools if not ((cwd / t).exists() if t.startswith(".venv/") else shutil.which(t))]


BLOCKS = extract(README.read_text())


@pytest.fixture(scope="module")
def scratch(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory that looks like the root of the clone to the snippets."""
    root = tmp_path_factory.mktemp("readme")
    (root / ".venv").symlink_to(ROOT / ".venv")
    (root / "examples").mkdir()
    (root / "examples" / "models").symlink_to(example_repo.resolve())
    return root


@pytest.fixture(scope="module")
def addresses(example_repo: Path, scratch: Path) -> Iterator[dict[str, str]]:
    """A live ``ferry serve`` of the example repository on free loopback ports, writing the prediction log the
    README's prediction-log section reads."""
    args = ("--model-repository", str(example_repo), "--grpc-port", "0", "--http-port", "0")
    args += ("--model-control-mode", "explicit", "--load-model", "*")  # the REST and lifecycle examples load models
    with ferry_serve(*args, "--prediction-log", str(scratch / "predictions.jsonl")) as (_, line):
        assert line.startswith("ferry ready:"), line
        http = line.split(" http=")[1].split()[0]
        yield {"127.0.0.1:8001": grpc_address(line), "127.0.0.1:8000": http}


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}-{b.lang or 'curl'}" for b in BLOCKS])
def test_readme_block(block: Block, scratch: Path, addresses: dict[str, str]) -> None:
    if block.skip is not None:
        pytest.skip(block.skip)
    if missing := missing_tools(block, scratch):
        if os.environ.get("CI") == "true":
            pytest.fail(f"README.md:{block.line} needs {missing}, which CI must have")
        pytest.skip(f"{missing} not installed here (make setup installs the .venv tools)")
    check(block, scratch, addresses)


# ---- the harness itself --------------------------------------------------------------------------------------

SAMPLE = """Text.

```python
print("ok")
```

<!-- snippet: skip (needs a GPU) -->
```sh
nvidia-smi
```

```
config only: never runs
```

```
curl -s 127.0.0.1:8000/v2/health/live
```
"""


def test_extract_finds_the_blocks_in_order_with_their_markers() -> None:
    blocks = extract(SAMPLE)
    assert [(b.line, b.lang, b.skip) for b in blocks] == [(3, "python", None), (8, "sh", "needs a GPU"), (16, "", None)]
    assert blocks[0].text == 'print("ok")\n'


@pytest.mark.parametrize(
    ("markdown", "message"),
    [
        ("<!-- snippet: skip -->\n```sh\ntrue\n```\n", "a marker reads"),
        ("<!-- snippet: skip (why) -->\n```\nplain\n```\n", "never runs"),
        ("```python\nprint(1)\n", "never closed"),
    ],
)
def test_extract_refuses_markers_without_a_reason_or_a_block(markdown: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extract(markdown)


@pytest.mark.parametrize(
    ("lang", "text", "message"),
    [
        ("python", "raise SystemExit('broken on purpose')\n", "broken on purpose"),
        ("sh", "echo fine\nfalse\necho never\n", "exit status 1"),
        ("sh", "false | cat\n", "exit status 1"),  # pipefail
        ("sh", "echo $UNSET_README_VARIABLE\n", "unbound variable"),
        ("sh", "sleep 5\n", "still running after 0.5 s"),
    ],
)
def test_a_broken_block_fails_the_harness(tmp_path: Path, lang: str, text: str, message: str) -> None:
    with pytest.raises(pytest.fail.Exception, match=message):
        check(Block(1, lang, text, None), tmp_path, {}, timeout_s=0.5 if "sleep" in text else 30)


def test_a_working_block_passes_with_the_addresses_replaced(tmp_path: Path) -> None:
    check(
        Block(1, "sh", 'test "127.0.0.1:8001" = "127.0.0.1:1234"\n', None),
        tmp_path,
        {"127.0.0.1:8001": "127.0.0.1:1234"},
    )
