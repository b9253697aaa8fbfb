"""Evaluation reports: ``report.json`` for scripts, ``report.md`` and a terminal table for people."""

from __future__ import annotations

import os
from pathlib import Path

from genret._io import atomic_path, write_json, write_text
from genret._swap import atomic_dir
from genret.eval.evaluator import DIRECTIONS

LABELS = {**DIRECTIONS, "cir": "composed (reference + modification → target)", "dialog": "interactive (rounds)"}


def metrics_table(report: dict) -> str:
    """A Markdown table of every stage's metrics in each direction (percentages)."""
    stages = report["stages"]
    directions = [d for d in LABELS if any(d in m for m in stages.values())]
    # Every metric any stage has, in first-seen order: a shallower stage (a rerank of the top 20) lacks R@50.
    keys = list(dict.fromkeys(k for m in stages.values() if directions[0] in m for k in m[directions[0]]))
    head = ["stage"] + [f"{d} {k}" for d in directions for k in keys]
    has_rsum = any("RSUM" in m for m in stages.values())
    if has_rsum:
        head.append("RSUM")
    rows = []
    for name, m in stages.items():
        row = [name] + [f"{m[d][k]:.1f}" if k in m.get(d, {}) else "-" for d in directions for k in keys]
        if has_rsum:
            row.append(f"{m['RSUM']:.1f}" if "RSUM" in m else "-")
        rows.append(row)
    return _markdown([head] + rows)


def twins_table(report: dict) -> str:
    """A Markdown table of twin accuracy per stage, or ``""`` when the split has no twins."""
    twins = report.get("twins")
    if not twins:
        return ""
    directions = [d for d in DIRECTIONS if any(d in m for m in twins.values())]
    head = ["stage", "pairs"] + [f"{d} own-over-twin %" for d in directions]
    rows = [[name, str(m["pairs"])] + [f"{m[d]:.1f}" for d in directions] for name, m in twins.items()]
    return _markdown([head] + rows)


def kinds_table(report: dict) -> str:
    """A Markdown table of composed R@K per edit kind and stage, or ``""`` when the triplets carry no kinds."""
    stages = {name: m["by_kind"] for name, m in report["stages"].items() if m.get("by_kind")}
    if not stages:
        return ""
    keys = list(dict.fromkeys(k for kinds in stages.values() for m in kinds.values() for k in m if k != "queries"))
    head = ["stage", "edit kind", "queries"] + keys
    rows = [[name, kind, str(m["queries"])] + [f"{m[k]:.1f}" if k in m else "-" for k in keys]
            for name, kinds in stages.items() for kind, m in kinds.items()]
    return _markdown([head] + rows)


REWRITES_SHOWN = 12


def rewrites_table(report: dict, n: int = REWRITES_SHOWN) -> str:
    """A Markdown table of the first ``n`` rewritten queries: input, caption, what retrieval used, hit or not."""
    head = ["id", "modification", "caption of the reference", "query used", "fallback", "target in top 5"]
    rows = [[str(w["id"]), w["modification"], w.get("caption", ""), w["query"] or "", w.get("fallback") or "",
             "yes" if set(w["targets"]) & set(w["top5"]) else "no"] for w in report["rewrites"][:n]]
    return _markdown([head] + [[c.replace("|", "/") for c in r] for r in rows])


def _markdown(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]])


def rounds_table(report: dict) -> str:
    """A Markdown table of an interactive report: per rank stage and round, R@K and cumulative Hits@K."""
    k = report.get("k", 10)
    head = ["stage", "round", "R@1", "R@5", "R@10", f"Hits@{k} (cumulative)"]
    rows = []
    for name, m in report["stages"].items():
        for r, hits in zip(m["rounds"], m[f"hits@{k}"]):
            rows.append([name, str(r["round"]), f"{r['R@1']:.1f}", f"{r['R@5']:.1f}", f"{r['R@10']:.1f}", f"{hits:.1f}"])
    return _markdown([head] + rows)


def dialogs_table(report: dict, n: int = REWRITES_SHOWN) -> str:
    """The first ``n`` interactive queries: where they started, what they ended as, the target's rank per round."""
    head = ["id", "initial query", "last query", "target rank per round", "stopped"]
    rows = [[str(d["id"]), d.get("initial") or "", d.get("query") or "",
             " ".join("-" if r is None else str(r) for r in d["ranks"]), str(d.get("stopped") or "")]
            for d in report["dialogs"][:n]]
    return _markdown([head] + [[c.replace("|", "/") for c in r] for r in rows])


def sections(report: dict, shown: int = REWRITES_SHOWN) -> tuple[str, str, list[tuple[str, str]]]:
    """The report as its title, a sentence on the data, and ``(heading, table)`` sections: what both renderers show
    (:func:`render_markdown` for ``report.md``, :func:`render_text` for the terminal)."""
    if report.get("task") == "dialog":
        return _dialog_sections(report, shown)
    ds = report["dataset"]
    queries = ", ".join(f"{LABELS[d]} {n}" for d, n in ds["queries"].items())
    about = (f"Dataset `{ds['name']}` split `{ds['split']}`: {ds['images']} images; queries: {queries}. "
             "Metrics in percent.")
    parts = [("Retrieval", metrics_table(report))]
    kinds = kinds_table(report)
    if kinds:
        parts.append(("Composed retrieval by edit kind", kinds))
    if report.get("twins"):
        parts.append(("Twins (how often the image beats its swapped twin, and back: the binding twins)", twins_table(report)))
    if report.get("rewrites"):
        parts.append((f"Rewritten queries (first {min(shown, len(report['rewrites']))} of {len(report['rewrites'])}; "
                      f"all in report.json; {report.get('fallbacks', 0)} fell back to the modification text)",
                      rewrites_table(report, shown)))
    if report.get("rewriting"):
        parts.append(("Query rewriting (genret demo)", rewriting_tables(report["rewriting"])))
    timing = report["timings"]
    lines = [f"- indexing: {timing['index_seconds']:.2f} s"]
    lines += [f"- {name}: {t['seconds']:.2f} s ({t['ms_per_query']:.2f} ms per query)" for name, t in timing["stages"].items()]
    lines += [f"  - {name}: {t['seconds']:.2f} s ({t['ms_per_query']:.2f} ms per query)"
              for name, t in timing.get("parts", {}).items()]
    parts.append(("Timings", "\n".join(lines)))
    return f"genret evaluation: {report['pipeline']}", about, parts


def render_markdown(report: dict) -> str:
    """The whole report as Markdown (``report.md``)."""
    title, about, parts = sections(report)
    body = [f"# {title}", about] + [x for heading, table in parts for x in (f"## {heading}", table)]
    return "\n\n".join(body + [f"genret {report['genret']}, {report['created']}"]) + "\n"


def render_text(report: dict, shown: int = 5) -> str:
    """The report for a terminal: the same sections as :func:`render_markdown`, fewer example rows."""
    title, about, parts = sections(report, shown)
    body = [f"{title}\n{about.replace('`', '')}"] + [f"{heading}:\n{table}" for heading, table in parts]
    return "\n\n".join(body)


CIR_DEMO_KEYS = ("R@1", "R@5", "R@10", "R_subset@1", "mAP@5")


def rewriting_tables(summary: dict) -> str:
    """The demo's query-rewriting tables (composed, interactive) as Markdown."""
    c, d = summary["composed"], summary["interactive"]
    lines = [f"composed retrieval ({c['triplets']} test triplets, {c['gallery']}-image gallery), %:",
             "| variant | " + " | ".join(CIR_DEMO_KEYS) + " |", "|---|" + "---|" * len(CIR_DEMO_KEYS)]
    lines += [f"| {r['variant']} | " + " | ".join(f"{r[k]:.1f}" for k in CIR_DEMO_KEYS) + " |" for r in c["rows"]]
    if c.get("rewriter"):
        w = c["rewriter"]
        lines.append(f"(rewriter LoRA: {'shipped' if w['shipped'] else 'trained here'}, {w['steps']} steps, {w['adapter']})")
    lines += ["", f"interactive retrieval ({d['queries']} test images, round 0 → {d['rounds']}), %:",
              "| variant | R@10 per round | Hits@10 (cumulative) |", "|---|---|---|"]
    fmt = lambda xs: " → ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    lines += [f"| {r['variant']} | {fmt(r['R@10'])} | {fmt(r['hits@10'])} |" for r in d["rows"]]
    return "\n".join(lines)


def _dialog_sections(report: dict, shown: int) -> tuple[str, str, list[tuple[str, str]]]:
    ds, stage = report["dataset"], report["round_stage"]
    settings = ", ".join(f"{k} {v}" for k, v in stage.items() if k not in ("stage",) and v not in ("", None))
    about = (f"Dataset `{ds['name']}` split `{ds['split']}`: {ds['images']} images; {ds['queries']['dialog']} queries, "
             f"{report['rounds']} rounds after round 0. Round stage: {settings}. Metrics in percent.")
    parts = [("Per round", rounds_table(report)),
             (f"Queries (first {min(shown, len(report['dialogs']))} of {len(report['dialogs'])}; all in report.json; "
              f"fallbacks {report.get('fallbacks')}, stopped {report.get('stopped', 0)})", dialogs_table(report, shown))]
    timing = report["timings"]
    lines = [f"- indexing: {timing['index_seconds']:.2f} s"]
    lines += [f"- {name}: {t['seconds']:.2f} s ({t['ms_per_query_round']:.2f} ms per query and round)"
              for name, t in timing["parts"].items()]
    parts.append(("Timings", "\n".join(lines)))
    return f"genret evaluation: {report['pipeline']}", about, parts


def plot_recall_curves(report: dict, path: str | os.PathLike) -> None:
    """Recall@K against K, one line per stage, one panel per direction, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report.get("recall_curves", {})
    directions = [d for d in DIRECTIONS if any(d in c for c in curves.values())]
    if not directions:
        return
    fig, axes = plt.subplots(1, len(directions), figsize=(5 * len(directions), 3.6), squeeze=False)
    for ax, direction in zip(axes[0], directions):
        for stage, by_dir in curves.items():
            if direction in by_dir:
                ks = [int(k) for k in by_dir[direction]]
                ax.plot(ks, list(by_dir[direction].values()), marker="o", label=stage)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("R@K (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{DIRECTIONS[direction]} ({report['dataset']['name']}/{report['dataset']['split']})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


FORMAT = "genret.eval_report"


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``report.json``, ``report.md`` and ``recall.png`` as the folder ``out_dir``, atomically; returns it.

    The folder is an artefact like any other (:func:`genret._swap.atomic_dir`): a folder of the user's files, or of
    another artefact, is refused unless ``--overwrite`` (and the user's files are kept then).
    """
    out = Path(out_dir)
    with atomic_dir(out, (FORMAT,)) as tmp:
        write_json(tmp / "report.json", report)
        curves = bool(report.get("recall_curves"))
        write_text(tmp / "report.md", render_markdown(report) + ("\n![recall@K](recall.png)\n" if curves else ""))
        if curves:
            plot_recall_curves(report, tmp / "recall.png")
        write_json(tmp / "manifest.json", {"format": FORMAT, "version": 1})
    return out
