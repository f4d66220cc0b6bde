"""Every example on the documentation site (docs/**/*.md) runs, as the README's do
(tests/test_readme.py): ```python blocks are executed, ```bash blocks' command lines are run with
the installed package in a temporary folder (dataset fixtures and budgets as for the README). A block
that is also in README.md is run there, not twice. ```text blocks are output or commands that are
not run here: `make docs` (CI runs it) and `mkdocs serve` (a server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_readme import README, _blocks, _command_blocks, _run

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = {p.relative_to(DOCS).as_posix(): p.read_text() for p in sorted(DOCS.rglob("*.md"))}
RUN_ELSEWHERE = {"make test"}  # the test suite itself


def _python() -> list[tuple[str, int, str]]:
    readme = set(_blocks("python"))
    return [(page, i, code) for page, text in PAGES.items() for i, code in enumerate(_blocks("python", text))
            if code not in readme]


def _bash() -> list[tuple[str, int, list[str]]]:
    """Each block's commands (a block's commands may use each other's output, so a block runs whole
    unless every command of it is run by the README's test)."""
    readme = {c for block in _command_blocks() for c in block} | RUN_ELSEWHERE
    return [(page, i, [] if set(cmds) <= readme else [c for c in cmds if c not in RUN_ELSEWHERE])
            for page, text in PAGES.items() for i, cmds in enumerate(_command_blocks(text))]


def test_docs_have_examples():
    assert len(_python()) >= 10, "the docs lost their examples"
    assert any(c.startswith("cggm train") for _, _, cmds in _bash() for c in cmds)
    assert README  # (the README's own examples run in tests/test_readme.py)


@pytest.mark.parametrize("page,index,code", _python(), ids=[f"{p}#{i}" for p, i, _ in _python()])
def test_docs_python_example(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/{page} python block {index}", "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("page,index,commands", [b for b in _bash() if b[2]],
                         ids=[f"{p}#{i}" for p, i, c in _bash() if c])
def test_docs_shell_examples(page, index, commands, tmp_path):
    for command in commands:
        _run(command, tmp_path)
