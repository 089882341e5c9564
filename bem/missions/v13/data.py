"""The suite's tasks and its smoke base's corpus (issue 20).

Text tasks, each another mission's generator at its own cue, so the base learnt the skill in plain text
and the adapters learn to answer at the cue (as in those missions):
- `qa`: Mission A's table lookups (`question: … answer:`), EM and F1;
- `translate`: Mission D's language into its verb-final pseudo-language (` translate:`), corpus chrF
  and BLEU: the translation-like task, V3's target;
- `json`: the validation experiment's records as JSON (`JSON:`), validity and field accuracy: V4's;
- `summary`: the validation experiment's news leads (`Summary:`), EM and F1.

VQA: MM-mini's scenes (`scenes`), a caption and a question at `answer:`; the answer follows the image.
Splits are a partition of the layout (a hash of the scene's objects), so no test image is a training one.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from bem.missions.mission_a import data as a_data
from bem.missions.mission_d import data as d_data
from bem.missions.v13 import scenes
from bem.missions.v13.arms import SMOKE
from bem.missions.validation import data as v_data

TASKS = ("qa", "translate", "json", "summary")
VQA_CUE = "\nanswer:"


@dataclass(frozen=True)
class Example:
    example_id: str
    task: str
    prompt: str
    target: str  # with its leading space
    fields: dict[str, Any] | None = None  # json's gold values


def text_examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` examples of one task; `split` is train or test (each source's own held-out partition)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; splits: train, test")
    if task == "qa":
        return [
            Example(f"qa-{e.example_id}", task, e.prompt, e.target)
            for e in a_data.make_examples("lookup", split, n, seed)
        ]
    if task == "translate":
        return [
            Example(f"translate-{e.example_id}", task, d_data.translation_prompt(e.source), f" {e.target}")
            for e in d_data.make_examples(split, n, seed)
        ]
    if task in ("json", "summary"):
        return [
            Example(e.example_id, task, e.prompt, e.target, e.fields)
            for e in v_data.make_split(task, split, n, seed)
        ]
    raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")


def _layout_bucket(scene: scenes.Scene) -> int:
    key = ";".join(
        f"{t.position}:{t.colour}:{t.shape}" for t in sorted(scene.things, key=lambda t: t.position)
    )
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10


SCENE_SPLITS = {"train": range(0, 8), "test": range(8, 10)}


def vqa_scenes(split: str, n: int, seed: int = 0, conflict: bool = False) -> list[scenes.Scene]:
    """`n` scenes of a split (their layouts' hash bucket), conflicting captions on the conflict split."""
    if split not in SCENE_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {list(SCENE_SPLITS)}")
    rng = random.Random(f"v13/vqa/{split}/{seed}/{conflict}")
    out: list[scenes.Scene] = []
    while len(out) < n:
        s = scenes.scene(rng, len(out), conflict)
        if _layout_bucket(s) in SCENE_SPLITS[split]:
            out.append(s)
    return out


def vqa_prompt(scene: scenes.Scene) -> str:
    return f"caption: {scene.caption}\nquestion: {scene.question}{VQA_CUE}"


def describe(things: tuple[scenes.Thing, ...]) -> str:
    """A scene in the captions' own sentences, one per object."""
    return " ".join(f"the {t.shape} in the {t.position} is {t.colour}." for t in things)


def smoke_mixture() -> Any:
    """The suite's base corpus, a quarter each: Mission A's lookups (its tables, recall and questions,
    not its sums and formats), Mission D's sentences and translations (not the shadow language or the
    role questions), the validation experiment's sources, and scenes described in the captions'
    sentences with their questions answered after Mission A's cues. No source uses a task's cue
    except as its own mission's corpus already does. 1,300 steps: the whole smoke, base included,
    must fit 30 minutes on 2 CPU workers (at 1,600 it took 32; the anchor then scored .997 QA EM,
    99.7 chrF and .993 JSON validity, far above its preconditions)."""
    from bem.core.smoke_base import Mixture, Recipe, Source

    def scene_text(rng: random.Random) -> tuple[str, str]:
        while True:
            s = scenes.scene(rng, 0)
            if _layout_bucket(s) in SCENE_SPLITS["train"]:
                break
        return f"{describe(s.things)}\n{s.question}\n{rng.choice(a_data.CONNECTORS)}:", f" {s.answer}."

    def only(sources: tuple[Source, ...], names: set[str]) -> tuple[Source, ...]:
        return tuple(s for s in sources if s.name in names)

    groups = [
        only(a_data.smoke_mixture().sources, {"statements", "recall", "questions"}),
        only(d_data.smoke_mixture().sources, {"sentences", "translation"}),
        v_data.smoke_mixture().sources,
        (Source("scenes", 1.0, scene_text),),
    ]
    sources = tuple(
        Source(f"{i}/{s.name}", s.weight / sum(x.weight for x in group), s.make)
        for i, group in enumerate(groups)
        for s in group
    )
    recipe = Recipe(
        vocab_size=2048,
        hidden_size=SMOKE.d_model,
        intermediate_size=SMOKE.d_ff,
        num_hidden_layers=SMOKE.layers,
        num_attention_heads=SMOKE.heads,
        seq_len=128,
        batch_size=64,
        steps=1300,
        warmup=300,
        corpus_docs=30_000,
    )
    return Mixture(name="v13", sources=sources, recipe=recipe)
