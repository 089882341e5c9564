"""The README's library examples run as written (the blocks marked `<!-- tested -->`), in one namespace,
on the tiny test model, so the documented use of the spec's API stays true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- tested -->\n```python\n(.*?)```", re.DOTALL)


def test_the_tested_readme_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = BLOCK.findall(README.read_text())
    assert len(blocks) >= 2, "the README lost its tested examples"
    code = "\n".join(blocks)
    # What they are there to show: the API of BEM_SPEC sections 2-4 that the recipes do not use.
    for name in ("ChunkStickyRouter", "TokenController", "chunked_forward", "export_peft", "load_bem"):
        assert f"{name}(" in code, name
    monkeypatch.chdir(tmp_path)  # the blocks write relative folders
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    # The examples show real results, not just that they ran.
    k = namespace["out"].chunk_codes.shape[1]
    assert namespace["out"].logits.shape[:2] == namespace["ids"].shape and k == 4
    assert namespace["routes"].experts.shape == (1, k)
    assert namespace["codes"].shape[:2] == namespace["ids"].shape  # a code per token
    assert (tmp_path / "bem-lora" / "adapter_config.json").is_file()
    assert set(namespace["again"].sites) == set(namespace["att"].sites)
