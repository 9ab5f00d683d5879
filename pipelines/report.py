"""The ablation report: report.md, results.json and the figures a person looks at first.

Figures (matplotlib, PNG): Dice per arm, model and class with error bars over folds and seeds; query
overlays (ground truth against prediction) per arm; the synthetic pair grids are copied in beside them.
The text states the verdict of every paired test and says plainly when augmentation did not help.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.stats import ALL  # noqa: E402


def dice_chart(summary: list[dict], protocol: str, path: Path, *, arms: list[str]) -> None:
    """Grouped bars: one panel per model, classes on the x axis, one bar per arm (config order) with its spread."""
    rows = [r for r in summary if r["protocol"] == protocol]
    models = sorted({r["model"] for r in rows})
    classes = [c for c in dict.fromkeys(r["class"] for r in rows) if c != ALL] + [ALL]
    fig, axes = plt.subplots(1, len(models), figsize=(1.2 + 1.1 * len(classes) * len(models) + 2, 3.6), squeeze=False)
    width = 0.8 / max(len(arms), 1)
    for ax, model in zip(axes[0], models):
        for i, arm in enumerate(arms):
            cell = {r["class"]: r for r in rows if r["model"] == model and r["arm"] == arm}
            means = [100 * cell[c]["mean"] if c in cell else np.nan for c in classes]
            stds = [100 * cell[c]["std"] if c in cell else 0 for c in classes]
            ax.bar(np.arange(len(classes)) + i * width, means, width, yerr=stds, capsize=2, label=arm)
        ax.set_xticks(np.arange(len(classes)) + width * (len(arms) - 1) / 2, classes, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_title(f"{model} ({protocol})")
        ax.set_ylabel("Dice (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlay_figure(panels: list[dict], path: Path, *, cols: int) -> None:
    """A grid of query slices (a row per arm, a column per class): truth outlined green, prediction red."""
    n = len(panels)
    if not n:
        return
    cols = max(1, min(n, cols))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), panels):
        ax.imshow(p["image"], cmap="gray")
        if p["truth"].any():
            ax.contour(p["truth"], levels=[0.5], colors="lime", linewidths=0.8)
        if p["pred"].any():
            ax.contour(p["pred"], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(p["title"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def _summary_table(summary: list[dict], protocol: str) -> list[str]:
    rows = [r for r in summary if r["protocol"] == protocol]
    classes = [c for c in dict.fromkeys(r["class"] for r in rows) if c != ALL] + [ALL]
    lines = [f"| model | arm | {' | '.join(classes)} |", "|---|---|" + "---|" * len(classes)]
    for (model, arm) in dict.fromkeys((r["model"], r["arm"]) for r in rows):
        cell = {r["class"]: r for r in rows if r["model"] == model and r["arm"] == arm}
        vals = [f"{_fmt(cell[c]['mean'])} ± {_fmt(cell[c]['std'])}" if c in cell else "-" for c in classes]
        lines.append(f"| {model} | {arm} | {' | '.join(vals)} |")
    return lines


def _tests_table(tests: list[dict], protocol: str) -> list[str]:
    lines = ["| model | arm | vs | class | n | mean diff | wins/losses | p (Wilcoxon) | p (t) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in (t for t in tests if t["protocol"] == protocol):
        lines.append(f"| {t['model']} | {t['arm']} | {t['baseline']} | {t['class']} | {t['n']} | "
                     f"{_fmt(t['mean_diff'])} | {t['wins']}/{t['losses']} | {t['p_wilcoxon']:.3g} | "
                     f"{t['p_ttest']:.3g} | {t['verdict']} |")
    return lines


def verdict_lines(tests: list[dict]) -> list[str]:
    """One sentence per (protocol, model, arm) pooled over classes: gain, loss or no evidence."""
    out = []
    for t in (t for t in tests if t["class"] == ALL):
        what = {"gain": "beats", "loss": "is worse than"}.get(t["verdict"])
        if what:
            out.append(f"- {t['protocol']} {t['model']}: **{t['arm']}** {what} {t['baseline']} by "
                       f"{_fmt(abs(t['mean_diff']))} Dice points (Wilcoxon p = {t['p_wilcoxon']:.3g}, n = {t['n']}).")
        else:
            out.append(f"- {t['protocol']} {t['model']}: **{t['arm']}** shows no evidence of a difference from "
                       f"{t['baseline']} ({t['verdict']}; mean difference {_fmt(t['mean_diff'])} points, "
                       f"p = {t['p_wilcoxon']:.3g}, n = {t['n']}). Augmentation did not help here.")
    return out


def _quality_table(quality: list[dict], filter_dice: float) -> list[str]:
    """Synthetic-pair quality per source and class, averaged over (fold, seed) units."""
    lines = [f"| source | class | mask consistency (Dice %) | pairs with Dice >= {filter_dice:g} | intensity histogram "
             "distance | RMS distance to nearest support |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for q in quality:
        groups.setdefault((q["source"], q["class"]), []).append(q)
    for (source, cls), qs in groups.items():
        mean = {k: float(np.mean([q[k] for q in qs])) for k in ("mask_consistency", "histogram_distance",
                                                              "nn_distance_to_supports")}
        mean["kept_at_filter"] = float(np.mean([d >= filter_dice for q in qs for d in q["per_pair"]]))
        lines.append(f"| {source} | {cls} | {100 * mean['mask_consistency']:.1f} | {100 * mean['kept_at_filter']:.0f} % "
                     f"| {mean['histogram_distance']:.3f} | {mean['nn_distance_to_supports']:.3f} |")
    return lines


def write_report(out: Path, *, title: str, summary: list[dict], tests: list[dict], rows: list[dict],
                 context: dict, figures: dict[str, str], quality: list[dict], filter_dice: float = 0.5) -> None:
    """report.md + results.json in `out`; `figures` maps a caption to a PNG file name already in `out`."""
    protocols = list(dict.fromkeys(r["protocol"] for r in summary))
    lines = [f"# {title}", "", "## Verdict", ""]
    for baseline in dict.fromkeys(t["baseline"] for t in tests):
        lines += verdict_lines([t for t in tests if t["baseline"] == baseline])
    lines += ["", "A gain is claimed only where the mean paired difference is positive and the two-sided "
              "Wilcoxon signed-rank test over query volumes gives p < 0.05. Every arm used the same folds, "
              f"seeds and query volumes. The {len(tests)} p-values are not corrected for multiple comparisons: "
              "a single gain or loss near p = 0.05 among many arms is weak evidence.", ""]
    for protocol in protocols:
        lines += [f"## {protocol}: mean Dice (%) ± std over folds and seeds", ""] + _summary_table(summary, protocol)
        lines += ["", f"### {protocol}: paired differences over query volumes", ""] + _tests_table(tests, protocol) + [""]
    if quality:
        lines += ["## Synthetic pair quality", "", "Mask consistency: Dice between each pair's intended mask and what "
                  "the base segmenter, given only the real supports, finds on the synthetic image (low: the image does "
                  "not follow its mask). Histogram distance: total variation between organ intensities of the real "
                  "supports and of the pairs (0 same, 1 disjoint). Nearest-support distance: near 0 means copies.", ""]
        lines += _quality_table(quality, filter_dice) + [""]
    lines += ["## Figures", ""] + [f"![{cap}]({name})" for cap, name in figures.items()] + [""]
    lines += ["## Run", "", "```json", json.dumps(context, indent=2, default=str), "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"context": context, "summary": summary, "tests": tests,
                                                  "quality": quality, "rows": rows}, indent=2, default=str))
