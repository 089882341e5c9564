"""The synthetic tasks: determinism, split hygiene, well-formed targets, and the byte-model budgets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import pytest

from bem.missions.validation.data import (
    JSON_CUE,
    MAX_PROMPT_CHARS,
    MAX_TARGET_CHARS,
    SCHEMAS,
    SPLITS,
    SUMMARY_CUE,
    SUMMARY_PREFIX,
    TASKS,
    Example,
    make_dataset,
    make_split,
)

SMOKE = {"train": 200, "val": 50, "test": 100}


@pytest.fixture(scope="module")
def dataset() -> dict[str, list[Example]]:
    return make_dataset(0, SMOKE)


@pytest.fixture(scope="module")
def many_seeds() -> list[Example]:
    return [
        ex
        for seed in range(20)
        for split in SPLITS
        for task in TASKS
        for ex in make_split(task, split, 60, seed)
    ]


def _of(examples: list[Example], task: str) -> list[Example]:
    return [ex for ex in examples if ex.task == task]


def _paragraph(ex: Example) -> str:
    assert ex.prompt.startswith(SUMMARY_PREFIX) and ex.prompt.endswith(SUMMARY_CUE)
    return ex.prompt[len(SUMMARY_PREFIX) : -len(SUMMARY_CUE)]


def test_same_seed_gives_identical_examples(dataset: dict[str, list[Example]]) -> None:
    assert make_dataset(0, SMOKE) == dataset


def test_different_seeds_give_different_examples(dataset: dict[str, list[Example]]) -> None:
    other = make_dataset(1, SMOKE)
    for split in SMOKE:
        for task in TASKS:
            shared = {ex.prompt for ex in _of(dataset[split], task)} & {
                ex.prompt for ex in _of(other[split], task)
            }
            assert len(shared) < SMOKE[split] // 10


def test_ids_do_not_depend_on_the_interpreter_hash_seed() -> None:
    code = (
        "from bem.missions.validation.data import make_split; "
        "print([e.example_id for e in make_split('json', 'val', 5, 3)])"
    )
    here = [ex.example_id for ex in make_split("json", "val", 5, 3)]
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == repr(here)


def test_ids_are_unique_and_carry_task_split_index_and_digest(dataset: dict[str, list[Example]]) -> None:
    examples = [ex for split in dataset.values() for ex in split]
    assert len({ex.example_id for ex in examples}) == len(examples)
    for split, exs in dataset.items():
        for task in TASKS:
            for index, ex in enumerate(_of(exs, task)):
                digest = hashlib.sha1(f"{ex.prompt}\x00{ex.target}".encode()).hexdigest()[:8]
                assert ex.example_id == f"{task}-{split}-{index:05d}-{digest}"
                assert (ex.task, ex.split) == (task, split)


def test_splits_share_no_prompts(many_seeds: list[Example]) -> None:
    # Across seeds too: the split partition is by content, so no seed's test prompt is another's train prompt.
    by_split = {split: {ex.prompt for ex in many_seeds if ex.split == split} for split in SPLITS}
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["val"]
    assert not by_split["val"] & by_split["test"]


def test_prompts_are_unique_within_a_split(dataset: dict[str, list[Example]]) -> None:
    for exs in dataset.values():
        assert len({ex.prompt for ex in exs}) == len(exs)


def test_sizes_and_order(dataset: dict[str, list[Example]]) -> None:
    for split, n in SMOKE.items():
        assert [ex.task for ex in dataset[split]] == ["json"] * n + ["summary"] * n
    assert make_split("summary", "test", 0, 0) == []
    assert set(make_dataset(0, {"val": 3})) == {"val"}


def test_json_fields_count_and_canonical_order(many_seeds: list[Example]) -> None:
    counts: Counter[int] = Counter()
    for ex in _of(many_seeds, "json"):
        assert ex.fields is not None
        counts[len(ex.fields)] += 1
        schemas = [fields for fields in SCHEMAS.values() if set(ex.fields) <= {f.key for f in fields}]
        canonical = [[f.key for f in fields if f.key in ex.fields] for fields in schemas]
        assert list(ex.fields) in canonical
    assert set(counts) == set(range(3, 9))


def test_json_target_is_compact_json_of_exactly_the_fields(many_seeds: list[Example]) -> None:
    for ex in _of(many_seeds, "json"):
        assert ex.fields is not None
        parsed = json.loads(ex.target)
        assert parsed == ex.fields and list(parsed) == list(ex.fields)
        assert ex.target == json.dumps(ex.fields, separators=(",", ":"))
        assert all(type(v) in (int, str) for v in parsed.values())


def test_json_values_are_stated_in_the_prose(many_seeds: list[Example]) -> None:
    for ex in _of(many_seeds, "json"):
        assert ex.fields is not None and ex.prompt.endswith(JSON_CUE)
        prose = ex.prompt[: -len(JSON_CUE)]
        assert "\n" not in prose
        for value in ex.fields.values():
            assert str(value) in prose


def test_summary_target_is_the_lead_sentence(many_seeds: list[Example]) -> None:
    for ex in _of(many_seeds, "summary"):
        assert ex.fields is None
        paragraph = _paragraph(ex)
        sentences = [s if s.endswith(".") else s + "." for s in paragraph.split(". ")]
        assert 3 <= len(sentences) <= 5
        assert ex.target == sentences[0] and paragraph.startswith(ex.target)


def test_summary_leads_vary(dataset: dict[str, list[Example]]) -> None:
    leads = {ex.target.split()[0] for ex in _of(dataset["train"], "summary")}
    assert len(leads) > 10  # a degenerate generator would repeat one template


def test_examples_fit_the_byte_model_budget(many_seeds: list[Example]) -> None:
    for ex in many_seeds:
        assert len(ex.prompt) <= MAX_PROMPT_CHARS and len(ex.target) <= MAX_TARGET_CHARS
        assert ex.prompt.isascii() and ex.target.isascii()
    assert MAX_PROMPT_CHARS <= 220 and MAX_TARGET_CHARS <= 110


def test_longest_possible_json_target_fits() -> None:
    for fields in SCHEMAS.values():
        longest = {f.key: max(f.pool, key=lambda v: len(json.dumps(v))) for f in fields}
        assert len(json.dumps(longest, separators=(",", ":"))) <= MAX_TARGET_CHARS


@pytest.mark.parametrize(
    ("call", "bad"),
    [
        (lambda: make_split("xml", "train", 1, 0), "xml"),
        (lambda: make_split("json", "dev", 1, 0), "dev"),
        (lambda: make_dataset(0, {"holdout": 1}), "holdout"),
    ],
)
def test_bad_names_raise_with_the_name(call: Callable[[], object], bad: str) -> None:
    with pytest.raises(ValueError, match=bad) as info:
        call()
    assert "json" in str(info.value) or "train" in str(info.value)


def test_negative_size_raises() -> None:
    with pytest.raises(ValueError, match="-1"):
        make_split("json", "train", -1, 0)
