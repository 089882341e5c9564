"""Scoring one trained arm of Mission D, per example, on every view the gates read.

Task rows (greedy decoding under the arm's codes; a translation is cut after its sentences' stops):
- `chrf#k`, `bleu#k` (sacrebleu's per-segment statistics, so the bootstrap re-scores corpus chrF and
  BLEU) and `em` (the role answer's first word) on the plain test source;
- `chrf_<rung>#k`, `em_<rung>` on its S1-S4 views (the same target: the views keep the meaning);
- OOD: `chrf_pi_prime#k`, `em_pi_prime` (S1 through the held-out π′), `chrf_ood_template#k`,
  `em_ood_template` (held-out template combinations), `chrf_long2#k`, `chrf_long4#k` (2 and 4
  sentences joined, translated at once).

Representation rows, per test sentence and rung, at the headline layers (the top half, averaged):
`rrs_<rung>` (RRS's jackknife pseudo-value, `metrics.rrs_pseudo_values`, its chance term pairing
sentences of one length), `ret1_<rung>`,
`align_<rung>`, `ldc_<rung>` (view id: the probe's and the control's correctness on the sentence and
its view, as selectivity over 1 − the majority rate, so their mean is the unfloored LDC; the control
labels each sentence template at random), and `eqe`
(S1). Every layer's corpus values go to the summary. States are the mean over the sentence's own tokens
in its translation prompt; the probes fit on views of other training-split sentences (`EvalSet.probe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bem.core.generate import greedy_generate
from bem.core.metrics import bleu_stats, chrf_stats
from bem.core.reporter import ScoreRow
from bem.core.train import Pair, encode
from bem.missions.mission_d import data, metrics, scramble
from bem.missions.mission_d.train import (
    ArmModel,
    encode_prompts,
    hardest_views,
    items_of,
    predicting,
    target_positions,
)

EVAL_SEED = 1  # the views the evaluation reads; training draws its own per epoch
RUNGS = ("S1", "S2", "S3", "S4")
LONG = (2, 4)
PI_PRIME = scramble.Shadow(1)


@dataclass(frozen=True)
class EvalSet:
    test: list[data.Example]
    ood: list[data.Example]  # held-out template combinations
    probe: list[data.Example]  # training-split sentences the LDC probes fit on


def make_eval(n_test: int, n_ood: int, n_probe: int) -> EvalSet:
    return EvalSet(
        data.make_examples("test", n_test, 0),
        data.make_examples("ood_template", n_ood, 0),
        data.make_examples("train", n_probe, 1),
    )


def first_sentences(text: str, k: int) -> str:
    """The decoded text up to and including its k-th stop (all of it when it has fewer)."""
    text = text.split("\n")[0].strip()
    at = -1
    for _ in range(k):
        at = text.find(".", at + 1)
        if at < 0:
            return text
    return text[: at + 1]


class Scorer:
    def __init__(
        self,
        model: ArmModel,
        tokenizer: PreTrainedTokenizerBase,
        inverse: torch.Tensor | None,
        max_new_tokens: int,
    ) -> None:
        self.model, self.tok, self.inverse, self.max_new = model, tokenizer, inverse, max_new_tokens

    @torch.no_grad()
    def codes(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for lo in range(0, len(prompts), 64):
            batch = encode_prompts(self.tok, prompts[lo : lo + 64]).to(self.model.device)
            out.append(self.model.codes(batch))
        return torch.cat(out)

    def decode(self, prompts: Sequence[str], max_new: int) -> list[str]:
        self.model.eval()
        return greedy_generate(
            self.model.lm, self.tok, list(prompts), max_new_tokens=max_new,
            attachment=self.model.attachment, codes=self.codes(prompts),
        )  # fmt: skip

    def translate(self, sources: Sequence[str], k: int = 1) -> list[str]:
        out = self.decode([data.translation_prompt(s) for s in sources], self.max_new * k)
        return [first_sentences(o, k) for o in out]

    def answer(self, sources: Sequence[str], examples: Sequence[data.Example]) -> list[float]:
        prompts = [data.qa_prompt(s, e.question) for s, e in zip(sources, examples, strict=True)]
        out = self.decode(prompts, 4)
        return [
            float(bool(o.split()) and o.split()[0] == e.answer) for o, e in zip(out, examples, strict=True)
        ]

    @torch.no_grad()
    def states(self, sources: Sequence[str]) -> list[np.ndarray]:
        """Per layer (0 = embeddings), [n, d]: each sentence's mean state over its own tokens, read in
        its translation prompt under the prompt's code (the cue after it cannot change them otherwise:
        the model is causal)."""
        self.model.eval()
        chunks: list[list[np.ndarray]] = []
        for lo in range(0, len(sources), 64):
            chunk = sources[lo : lo + 64]
            batch = encode_prompts(self.tok, [data.translation_prompt(s) for s in chunk]).to(
                self.model.device
            )
            mask = torch.zeros_like(batch.prompt_mask)
            for row, s in enumerate(chunk):
                ids = self.tok(f" {s}", add_special_tokens=False)["input_ids"]
                if batch.input_ids[row, : len(ids)].tolist() != ids:
                    raise ValueError(f"the prompt does not start with the sentence's own tokens: {s!r}")
                mask[row, : len(ids)] = 1
            _, _, hidden = self.model(batch, hidden_states=True)
            chunks.append([metrics.pooled(h, mask).float().cpu().numpy() for h in hidden])
        return [np.concatenate(layer) for layer in zip(*chunks, strict=True)]

    @torch.no_grad()
    def eqe(self, examples: Sequence[data.Example]) -> np.ndarray:
        """Per example, EqE between the translation (prompt and target) and its S1 view; NaN (dropped by
        the stats engine, counted) when S1 is not a token bijection under this tokenizer."""
        if self.inverse is None:
            return np.full(len(examples), np.nan)
        self.model.eval()
        out = []
        for lo in range(0, len(examples), 64):
            chunk = examples[lo : lo + 64]
            x = encode(self.tok, [Pair(data.translation_prompt(e.source), f" {e.target}") for e in chunk])
            v = encode(self.tok, [Pair(data.translation_prompt(scramble.view(e.source, "S1", EVAL_SEED)),
                                        f" {e.target}") for e in chunk])  # fmt: skip
            if x.input_ids.shape != v.input_ids.shape:
                raise ValueError("S1 changed a sequence's length: a word or shadow word is not one token")
            x, v = x.to(self.model.device), v.to(self.model.device)
            logits, _, _ = self.model(x)
            v_logits, _, _ = self.model(v)
            inverse = self.inverse.to(logits.device)
            per = metrics.eqe(logits, v_logits, inverse, predicting(x), target_positions(x))
            out.append(per.cpu().numpy())
        return np.concatenate(out)


def views(scorer: Scorer, examples: Sequence[data.Example]) -> dict[str, list[str]]:
    """Each rung's view of each example's source (S4 under this model: its hardest of S1-S3)."""
    out = {r: [scramble.view(e.source, r, EVAL_SEED) for e in examples] for r in scramble.RUNGS}
    translations = [i for i in items_of(examples) if i.task == "translate"]
    out["S4"] = hardest_views(scorer.model, scorer.tok, translations, EVAL_SEED)
    return out


def stat_rows(ex_id: str, arm: str, seed: int, metric: str, values: Sequence[float]) -> list[ScoreRow]:
    return [ScoreRow(ex_id, arm, seed, f"{metric}#{k}", v) for k, v in enumerate(values)]


def task_rows(
    scorer: Scorer, ev: EvalSet, test_views: dict[str, list[str]], arm: str, seed: int
) -> list[ScoreRow]:
    rows: list[ScoreRow] = []
    test = ev.test
    sets: list[tuple[str, Sequence[data.Example], list[str]]] = [("", test, [e.source for e in test])]
    sets += [(f"_{r.lower()}", test, test_views[r]) for r in RUNGS]
    sets += [("_pi_prime", test, [PI_PRIME(e.source) for e in test])]
    sets += [("_ood_template", ev.ood, [e.source for e in ev.ood])]
    for suffix, examples, sources in sets:
        hyps = scorer.translate(sources)
        ems = scorer.answer(sources, examples)
        for e, hyp, em in zip(examples, hyps, ems, strict=True):
            rows += stat_rows(e.example_id, arm, seed, f"chrf{suffix}", chrf_stats(hyp, e.target))
            rows.append(ScoreRow(e.example_id, arm, seed, f"em{suffix}", em))
            if not suffix:
                rows += stat_rows(e.example_id, arm, seed, "bleu", bleu_stats(hyp, e.target))
    for k in LONG:
        joined = data.longer(test, k)
        hyps = scorer.translate([s for s, _ in joined], k)
        for g, ((_, target), hyp) in enumerate(zip(joined, hyps, strict=True)):
            rows += stat_rows(f"long{k}-{g:04d}", arm, seed, f"chrf_long{k}", chrf_stats(hyp, target))
    return rows


def headline_layers(n_layers: int) -> list[int]:
    """The top half of the decoder's layers (hidden_states indices 1..L)."""
    return list(range(n_layers // 2 + 1, n_layers + 1))


def representation(
    scorer: Scorer, ev: EvalSet, test_views: dict[str, list[str]], arm: str, seed: int
) -> tuple[list[ScoreRow], dict[str, dict[str, dict[str, float]]]]:
    """Per rung: the headline rows per test sentence, and every layer's corpus values."""
    test_x = scorer.states([e.source for e in ev.test])
    probe_x = scorer.states([e.source for e in ev.probe])
    lengths = [len(e.source.split()) for e in ev.test]
    # The control task's types: each sentence's template (its shape), which recurs across the two
    # splits, so the control probe can memorise a label per type as Hewitt and Liang's does per word.
    probe_types = [str(data.template_of(e.frame)) for e in ev.probe]
    test_types = [str(data.template_of(e.frame)) for e in ev.test]
    probe_views = views(scorer, ev.probe)
    n, m = len(ev.test), len(ev.probe)
    top = headline_layers(scorer.model.n_layers)
    rows: list[ScoreRow] = []
    layers: dict[str, dict[str, dict[str, float]]] = {}
    for rung in RUNGS:
        test_v = scorer.states(test_views[rung])
        probe_v = scorer.states(probe_views[rung])
        per: dict[str, list[np.ndarray]] = {"rrs": [], "ret1": [], "align": [], "ldc": []}
        layers[rung] = {}
        for i in range(len(test_x)):
            z, zv = test_x[i], test_v[i]
            dec = metrics.decodability(
                np.vstack([probe_x[i], probe_v[i]]), [0] * m + [1] * m, probe_types * 2,
                np.vstack([z, zv]), [0] * n + [1] * n, test_types * 2, seed=seed,
            )  # fmt: skip
            selectivity = (dec.cue_correct - dec.control_correct) / (1.0 - dec.majority)
            values = {
                "rrs": metrics.rrs_pseudo_values(z, zv, strata=lengths),
                "ret1": metrics.retrieval_at_1(z, zv),
                "align": metrics.alignment(z, zv),
                "ldc": (selectivity[:n] + selectivity[n:]) / 2,
            }
            layers[rung][f"layer{i}"] = {
                "rrs": metrics.rrs(z, zv, strata=lengths), "ret1": float(values["ret1"].mean()),
                "align": float(values["align"].mean()), "ldc": dec.ldc,
            }  # fmt: skip
            if i in top:
                for k, v in values.items():
                    per[k].append(v)
        for k, vs in per.items():
            headline = np.mean(vs, axis=0)
            rows += [ScoreRow(e.example_id, arm, seed, f"{k}_{rung.lower()}", float(v))
                     for e, v in zip(ev.test, headline, strict=True)]  # fmt: skip
    eqe = scorer.eqe(ev.test)
    rows += [ScoreRow(e.example_id, arm, seed, "eqe", float(v)) for e, v in zip(ev.test, eqe, strict=True)]
    return rows, layers


def score_arm(
    scorer: Scorer, ev: EvalSet, arm: str, seed: int, phase0_only: bool = False
) -> tuple[list[ScoreRow], dict[str, object]]:
    """Every row of one arm, and its summary (means of the per-example rows, per-layer values). A
    Phase-0 arm is scored on the plain test set only: its gate reads clean chrF and BLEU."""
    if phase0_only:
        test = ev.test
        hyps = scorer.translate([e.source for e in test])
        ems = scorer.answer([e.source for e in test], test)
        rows: list[ScoreRow] = []
        for e, hyp, em in zip(test, hyps, ems, strict=True):
            rows += stat_rows(e.example_id, arm, seed, "chrf", chrf_stats(hyp, e.target))
            rows += stat_rows(e.example_id, arm, seed, "bleu", bleu_stats(hyp, e.target))
            rows.append(ScoreRow(e.example_id, arm, seed, "em", em))
        return rows, {}
    test_views = views(scorer, ev.test)
    rows = task_rows(scorer, ev, test_views, arm, seed)
    rep_rows, layers = representation(scorer, ev, test_views, arm, seed)
    return rows + rep_rows, {"layers": layers}
