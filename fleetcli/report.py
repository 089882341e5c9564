"""`fleetctl report`: one mission as Markdown and as a single self-contained HTML file.

Everything comes from the store over the bus (the read-only `report` control verb), so it works from
any host that reaches the fleet's NATS. Both files are rendered from one list of blocks, so they say
the same thing; the Markdown's figures are SVG files beside it, the HTML's are inlined as base64
data URIs (no external asset, no link to fetch). A gate's numbers are printed exactly as stored:
`repr` of the float, the shortest text that reads back to the same double.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.client import FleetClient
from schemas import messages as m
from workers.worker import git_state

OUTCOME_COLOURS = {"pass": "#2a9d4a", "fail": "#c0392b"}
OTHER_COLOUR = "#d68910"

# ---- numbers and commands ---------------------------------------------------------------------------


def exact(x: Any) -> str:
    """A stored value as text: floats by `repr` (reads back to the same double), None as empty."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    return repr(x) if isinstance(x, float) else str(x)


def interval(low: float | None, high: float | None) -> str:
    """`[low, high]` exactly as stored; an open side (NULL) is -inf or +inf, no bound at all is empty."""
    if low is None and high is None:
        return ""
    return f"[{'-inf' if low is None else exact(low)}, {'+inf' if high is None else exact(high)}]"


def toml_value(v: Any) -> str:
    """A value as `fleetctl submit --set KEY=VALUE` reads it back (a TOML value)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML value for {v!r}")


def submit_command(mission: dict[str, Any]) -> str:
    """The `fleetctl submit` that makes the same mission, from its missions row (name, profile, overrides)."""
    words = ["fleetctl", "submit", mission["name"], "--profile", mission["profile"]]
    for key, value in (mission.get("overrides") or {}).items():
        words += ["--set", f"{key}={toml_value(value)}"]
    return shlex.join(words)


def when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def stamp() -> str:
    """The code that made the report: this checkout's commit (with "dirty" for local changes)."""
    commit, dirty = git_state()
    if commit is None:
        return "not a git checkout"
    return commit + (" (dirty)" if dirty else "")


# ---- blocks: one document, two renderings -----------------------------------------------------------


@dataclass
class H:
    level: int
    text: str


@dataclass
class P:
    text: str
    strong: str = ""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    key: str  # forest, curves
    alt: str


@dataclass
class Code:
    text: str


@dataclass
class Doc:
    title: str
    blocks: list[H | P | Table | Figure | Code] = field(default_factory=list)


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Doc, figures: dict[str, str]) -> str:
    """`figures`: key -> the file name of the SVG beside the Markdown."""
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, H):
            out += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, P):
            out += [(f"**{b.strong}** " if b.strong else "") + b.text, ""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.headers)) + " |")
            out.append("|" + "---|" * len(b.headers))
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Figure):
            if b.key in figures:
                out += [f"![{b.alt}]({figures[b.key]})", ""]
        else:
            out += ["```", b.text, "```", ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; display: block;
        overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
pre { background: #f6f6f6; padding: 0.75em; overflow-x: auto; }
img { max-width: 100%; }
"""


def to_html(doc: Doc, figures: dict[str, str]) -> str:
    """`figures`: key -> SVG text, inlined as a base64 data URI (one file, nothing to fetch)."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(doc.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(doc.title)}</h1>",
    ]
    for b in doc.blocks:
        if isinstance(b, H):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, P):
            out.append("<p>" + (f"<strong>{e(b.strong)}</strong> " if b.strong else "") + e(b.text) + "</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Figure):
            if b.key in figures:
                data = base64.b64encode(figures[b.key].encode()).decode()
                out.append(f'<p><img alt="{e(b.alt)}" src="data:image/svg+xml;base64,{data}"></p>')
        else:
            out.append(f"<pre>{e(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---- figures ----------------------------------------------------------------------------------------


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    # Text stays text (searchable, small); a fixed salt and no date make the same data the same file.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bem-fleet"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buf.getvalue()


def _references(spec: dict[str, Any]) -> dict[str, list[float]]:
    """Per gate, the lines its outcome is judged against: 0 and the minimum effect for a claim, a
    guard's low and high (from the gates as frozen at submit)."""
    gates = spec.get("gates") or {}
    refs: dict[str, list[float]] = {}
    for claim in gates.get("claims", []):
        refs[claim["name"]] = sorted({0.0, float(claim.get("min_effect", 0.0))})
    for guard in gates.get("guards", []):
        refs[guard["name"]] = [float(guard[k]) for k in ("low", "high") if guard.get(k) is not None]
    return refs


def forest_plot(decisions: Sequence[dict[str, Any]], spec: dict[str, Any]) -> str | None:
    """Each gate's estimate and interval on its own axis (claims are deltas, guards may be levels or
    ratios), with the lines it is judged against dashed; None when no gate has a number."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    gates = [d for d in decisions if d["kind"] != "verdict" and d["estimate"] is not None]
    if not gates:
        return None
    refs = _references(spec)
    fig = MplFigure(figsize=(8, 0.7 * len(gates) + 0.8))
    axes = fig.subplots(len(gates), 1, squeeze=False)[:, 0]
    for ax, d in zip(axes, gates, strict=True):
        lines = refs.get(d["gate"], [])
        known = [v for v in (d["estimate"], d["ci_low"], d["ci_high"], *lines) if v is not None]
        lo, hi = min(known), max(known)
        pad = (hi - lo) * 0.15 or abs(hi) * 0.1 or 1.0
        xmin, xmax = lo - pad, hi + pad
        colour = OUTCOME_COLOURS.get(d["outcome"], OTHER_COLOUR)
        left = xmin if d["ci_low"] is None else d["ci_low"]
        right = xmax if d["ci_high"] is None else d["ci_high"]
        ax.plot([left, right], [0, 0], color=colour, linewidth=2.5, solid_capstyle="butt")
        for side, open_ in ((left, d["ci_low"] is None), (right, d["ci_high"] is None)):
            ax.plot([side], [0], marker=("<" if side == left else ">") if open_ else "|", color=colour, ms=9)
        ax.plot([d["estimate"]], [0], marker="o", color=colour, ms=7)
        for x in lines:
            ax.axvline(x, color="#555", linestyle="--", linewidth=0.8)
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(-1, 1)
        ax.set_yticks([0], [d["gate"]])
        ax.tick_params(axis="x", labelsize=8)
        ax.text(1.03, 0.5, d["outcome"], transform=ax.transAxes, va="center", color=colour, fontsize=9)
        for s in ("top", "right", "left"):
            ax.spines[s].set_visible(False)
    level = gates[0].get("level")
    axes[0].set_title(
        f"gates: estimate and {exact(level)} interval (dashed: what each is judged against)", fontsize=10
    )
    fig.tight_layout()
    return _svg(fig)


def curves_plot(curves: Sequence[dict[str, Any]]) -> str | None:
    """One panel per metric, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    metrics = list(dict.fromkeys(c["metric"] for c in curves))
    if not metrics:
        return None
    cols = min(2, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = MplFigure(figsize=(5 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for c in curves:
            if c["metric"] == metric:
                ax.plot(c["steps"], c["values"], linewidth=1.2, label=c["task"])
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _svg(fig)


# ---- the document -----------------------------------------------------------------------------------

GATE_HEADERS = [
    "gate", "kind", "metric", "comparison", "estimate", "interval", "level", "p", "p_adj", "n",
    "seeds +", "outcome", "reason",
]  # fmt: skip


def gate_row(d: dict[str, Any]) -> list[str]:
    return [
        d["gate"], d["kind"], d["metric"] or "", d["comparison"] or "", exact(d["estimate"]),
        interval(d["ci_low"], d["ci_high"]), exact(d["level"]), exact(d["p"]), exact(d["p_adj"]),
        exact(d["n"]), d["seeds_positive"] or "", d["outcome"], d["reason"] or "",
    ]  # fmt: skip


def _environment_rows(tasks: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Tasks grouped by the environment their worker recorded (commit, versions, host, GPU)."""
    from workers.worker import PACKAGES

    groups: dict[str, list[str]] = {}
    envs: dict[str, dict[str, Any]] = {}
    for t in tasks:
        env = t.get("environment")
        if env is None:  # failed or cancelled: only where it was meant to run is known
            env = {"host": t.get("host"), "gpu": t.get("gpu_name"), "recorded": False}
        key = json.dumps(env, sort_keys=True)
        envs[key] = env
        groups.setdefault(key, []).append(t["name"])
    headers = ["tasks", "host", "GPU", "git commit", "python", *PACKAGES]
    rows = []
    for key, names in groups.items():
        env = envs[key]
        if env.get("recorded") is False:
            commit = "(not recorded: the task did not succeed)"
        else:
            commit = (env.get("git_commit") or "not a git checkout") + (
                " (dirty)" if env.get("git_dirty") else ""
            )
        versions = env.get("packages") or {}
        rows.append(
            [", ".join(names), env.get("host") or "", env.get("gpu") or "", commit, env.get("python") or "",
             *(versions.get(p) or "" for p in PACKAGES)]
        )  # fmt: skip
    return headers, rows


def document(data: dict[str, Any]) -> Doc:
    mission = data["mission"]
    spec = mission.get("spec") or {}
    mid = mission["mission_id"]
    doc = Doc(f"Mission report: {mid}")
    b = doc.blocks
    took = (
        f", {mission['finished_at'] - mission['submitted_at']:.0f} s"
        if mission.get("finished_at") and mission.get("submitted_at")
        else ""
    )
    b.append(P(f"{mission['name']}: {spec.get('description', '')}".rstrip(": "), "Mission"))
    b.append(
        P(
            f"profile {mission['profile']}, state {mission['state']}, "
            f"submitted {when(mission['submitted_at'])}, "
            f"finished {when(mission['finished_at']) or '-'}{took}",
            "Run",
        )
    )
    b.append(P(f"{when(time.time())} by fleetctl at commit {stamp()}", "Generated"))

    b.append(H(2, "Verdict"))
    if mission.get("verdict"):
        b.append(P(mission.get("reason") or "", f"{mission['verdict']}:"))
    else:
        b.append(P("no verdict (the mission has no gates, or it has not been judged)"))

    b.append(H(2, "Gates"))
    decisions = [d for d in data["decisions"] if d["kind"] != "verdict"]
    if decisions:
        b.append(
            P("Each gate's numbers exactly as the decisions table holds them (each float's exact repr).")
        )
        b.append(Table(GATE_HEADERS, [gate_row(d) for d in decisions]))
        b.append(Figure("forest", "forest plot of the gates"))
    else:
        b.append(P("No decisions are stored for this mission."))

    b.append(H(2, "Per-arm means"))
    # A corpus metric's per-example statistics (`chrf#0` ...) are inputs to its gate, not metrics.
    means = [r for r in data["arm_means"] if "#" not in r["metric"]]
    if means:
        b.append(P("Mean of each metric per arm over every example and seed (each task's current attempt)."))
        b.append(
            Table(
                ["metric", "arm", "mean", "rows", "seeds"],
                [[r["metric"], r["arm"], exact(r["mean"]), exact(r["n"]), exact(r["seeds"])] for r in means],
            )
        )
    else:
        b.append(P("No per-example scores are stored for this mission."))

    b.append(H(2, "Training curves"))
    curves, total = data["curves"], data["curves_total"]
    if curves:
        shown = f"all {total} lines" if len(curves) == total else f"the first {len(curves)} of {total} lines"
        b.append(
            P(
                f"The metrics named like 'loss' (every metric where none is) by step, per task: {shown}, "
                f"each thinned to at most {data['curve_points_max']} points."
            )
        )
        b.append(Figure("curves", "training curves"))
        b.append(
            Table(
                ["task", "metric", "points", "first", "last", "min"],
                [
                    [
                        c["task"],
                        c["metric"],
                        exact(c["n"]),
                        exact(c["values"][0]),
                        exact(c["values"][-1]),
                        exact(min(c["values"])),
                    ]
                    for c in curves
                ],
            )
        )
    else:
        b.append(P("No metrics are stored for this mission."))

    b.append(H(2, "Service decisions"))
    if data["service_counts"]:
        per: dict[str, list[int]] = {}
        for c in data["service_counts"]:
            row = per.setdefault(c["task_id"].removeprefix(mid + "/"), [0, 0, 0, 0])
            row[0 if c["decision"] == "promote" else 1 if c["service"] == "drift" else 2] += c["n"]
            row[3] += c["n"] - c["acked"]
        headers = ["task", "promotions", "rollbacks (drift)", "rollbacks (canary)", "not acked"]
        b.append(Table(headers, [[t, *map(str, r)] for t, r in sorted(per.items())]))
        rows = [
            [d["task_id"].removeprefix(mid + "/"), exact(d["attempt"]), d["service"], exact(d["step"]),
             d["decision"], "pending" if d["acked"] is None else "yes" if d["acked"] else "no",
             d["reason"] + (f"; {d['detail']}" if d["detail"] else "")]
            for d in data["service_decisions"]
        ]  # fmt: skip
        total = sum(c["n"] for c in data["service_counts"])
        some = f"All {total}" if len(rows) == total else f"The first {len(rows)} of {total}"
        b.append(P(f"{some} decisions, by task and step:"))
        b.append(Table(["task", "attempt", "service", "step", "decision", "acked", "reason / reply"], rows))
    else:
        b.append(P("No reactive service decided anything for this mission."))

    b.append(H(2, "Tasks"))
    b.append(
        Table(
            ["task", "stage", "state", "attempt", "worker", "host", "error"],
            [
                [
                    t["name"],
                    t["stage"],
                    t["state"],
                    exact(t["attempt"]),
                    t["worker"] or "",
                    (t["environment"] or {}).get("host") or t["host"] or "",
                    (t["error"] or "")[:300],
                ]
                for t in data["tasks"]
            ],
        )
    )

    b.append(H(2, "Who asked"))
    b.append(
        Table(
            ["time", "action", "target", "role", "credential", "detail"],
            [
                [
                    when(a["asked_at"]),
                    a["action"],
                    a["target"].removeprefix(mid + "/"),
                    a["role"],
                    a["credential"],
                    a["detail"] or "",
                ]
                for a in data["audit"]
            ],
        )
    )
    if data["audit_service_rows"]:
        n = data["audit_service_rows"]
        b.append(P(f"Besides these, {n} audit rows record the services' own decisions (Service decisions)."))

    b.append(H(2, "Environment"))
    headers, rows = _environment_rows(data["tasks"])
    b.append(P("What each task's worker recorded when it ran (git commit, package versions, host, GPU)."))
    b.append(Table(headers, rows))

    b.append(H(2, "Reproduce"))
    b.append(
        P("The submit that makes this mission again (its profile and overrides, from the missions row):")
    )
    b.append(Code(submit_command(mission)))
    return doc


# ---- writing ----------------------------------------------------------------------------------------


async def fetch(client: FleetClient, mission_id: str) -> dict[str, Any]:
    out: dict[str, Any] = await client.call("report", m.IdRequest(id=mission_id), timeout=60)
    return out


def write(data: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """DIR/<id>.md with its figures beside it (<id>.forest.svg, <id>.curves.svg), and DIR/<id>.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mid = data["mission"]["mission_id"]
    svgs: dict[str, str] = {}
    forest = forest_plot(data["decisions"], data["mission"].get("spec") or {})
    if forest is not None:
        svgs["forest"] = forest
    curves = curves_plot(data["curves"])
    if curves is not None:
        svgs["curves"] = curves
    written: dict[str, Path] = {}
    names = {}
    for key, svg in svgs.items():
        path = out_dir / f"{mid}.{key}.svg"
        path.write_text(svg)
        written[key] = path
        names[key] = path.name
    doc = document(data)
    written["markdown"] = out_dir / f"{mid}.md"
    written["markdown"].write_text(to_markdown(doc, names))
    written["html"] = out_dir / f"{mid}.html"
    written["html"].write_text(to_html(doc, svgs))
    return written
