"""The examples of the docs run as written: every block that builds its own tiny model, and the
plugin page's example with its plugin registered as an entry point would register it."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

import kvpolicy
from kvpolicy.core import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PLUGIN_PAGE = "adding-a-policy.md"


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def self_contained_blocks() -> list:
    found = []
    for path in sorted(DOCS.rglob("*.md")):
        if path.name == PLUGIN_PAGE:
            continue
        for i, block in enumerate(blocks(path)):
            if "LlamaConfig(" in block:  # builds its own tiny model: runnable anywhere
                found.append(pytest.param(block, id=f"{path.relative_to(DOCS)}#{i}"))
    return found


@pytest.mark.parametrize("code", self_contained_blocks())
def test_example_runs(code):
    exec(compile(code, "<doc example>", "exec"), {})


def test_the_compiled_decoding_page_has_a_runnable_example():
    assert any("static-decode.md" in p.id for p in self_contained_blocks())


def test_the_plugin_page_example_runs_with_its_plugin_registered(capsys):
    plugin_code, usage = blocks(DOCS / PLUGIN_PAGE)[:2]
    plugin = types.ModuleType("doc_example_plugin")
    exec(compile(plugin_code, "<doc plugin>", "exec"), plugin.__dict__)
    manager = registry.plugin_manager()
    manager.register(plugin, name="doc_example_plugin")
    try:
        exec(compile(usage, "<doc usage>", "exec"), {})
    finally:
        manager.unregister(plugin)
        kvpolicy.reload_plugins()
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "[64, 64, 64, 64]"
    assert printed[2].endswith(", 64, 64, 64]") and not printed[2].startswith("[64,"), printed[2]
