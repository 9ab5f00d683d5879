"""The ablation report: report.md, results.json and the figures a person looks at first.

Figures (matplotlib, PNG): Dice per arm, model and class with error bars over folds and seeds; query
overlays (ground truth against prediction) per arm; the synthetic pair grids are copied in beside them.
The text states the verdict of every paired test (Holm-adjusted, unit named) and says plainly when
augmentation did not help. results.json is strict JSON (undefined values are null, never NaN) and records
how Dice was scored (`dice_grid`, `postprocess`); `rebuild` remakes a report from it and refuses a file of
an older format, naming the missing field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.config import ROLES, is_dice_gain  # noqa: E402
from pipelines.stats import ALL, arm_roles, gap_closed, paired_tests, summarise, target_checks  # noqa: E402
from segment.config import GRIDS, SCORE_ON  # noqa: E402
from segment.data.volumes import DataError  # noqa: E402

REQUIRED_ROW_FIELDS = ("protocol", "model", "arm", "role", "class", "fold", "seed", "query", "dice")


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


def oriented(image: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    """A slice `(H, W)` flipped for display (rows, columns); see `segment.data.volumes.radiological_flips`."""
    image = np.asarray(image)
    return image[::-1 if flips[0] else 1, ::-1 if flips[1] else 1]


def overlay_figure(panels: list[dict], path: Path, *, cols: int, flips: tuple[bool, bool] = (False, False)) -> None:
    """A grid of query slices (a row per arm, a column per class): truth outlined green, prediction red;
    `flips` turns the stored slices to radiological orientation for display only."""
    n = len(panels)
    if not n:
        return
    cols = max(1, min(n, cols))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), panels):
        ax.imshow(oriented(p["image"], flips), cmap="gray")
        if p["truth"].any():
            ax.contour(oriented(p["truth"], flips), levels=[0.5], colors="lime", linewidths=0.8)
        if p["pred"].any():
            ax.contour(oriented(p["pred"], flips), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(p["title"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    """A score or difference in Dice points; n/a where undefined."""
    return "n/a" if x is None or x != x else f"{100 * x:.1f}"


def _p(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.3g}"


def _ci(t: dict) -> str:
    return "n/a" if t["ci_low"] is None else f"[{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}]"


def _summary_table(summary: list[dict], protocol: str) -> list[str]:
    """Classes as columns (headline `dice`); a last column with post-processed Dice where rows have it."""
    rows = [r for r in summary if r["protocol"] == protocol]
    classes = [c for c in dict.fromkeys(r["class"] for r in rows) if c != ALL] + [ALL]
    post = any("mean_post" in r for r in rows)
    extra = [f"{ALL}, post-processed"] if post else []
    lines = [f"| model | arm | {' | '.join(classes + extra)} |", "|---|---|" + "---|" * (len(classes) + len(extra))]
    for (model, arm) in dict.fromkeys((r["model"], r["arm"]) for r in rows):
        cell = {r["class"]: r for r in rows if r["model"] == model and r["arm"] == arm}
        vals = [f"{_fmt(cell[c]['mean'])} ± {_fmt(cell[c]['std'])}" if c in cell else "-" for c in classes]
        if post:
            vals.append(f"{_fmt(cell[ALL]['mean_post'])} ± {_fmt(cell[ALL]['std_post'])}" if "mean_post" in cell[ALL]
                        else "-")
        lines.append(f"| {model} | {arm} | {' | '.join(vals)} |")
    return lines


def _tests_table(tests: list[dict], protocol: str) -> list[str]:
    lines = ["| model | arm | vs | class | n | dropped zeros | mean diff | 95 % CI | wins/losses | p (Wilcoxon) "
             "| p (Holm) | p (t) | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in (t for t in tests if t["protocol"] == protocol):
        arm = f"**{t['arm']}** ({PRIMARY_KIND[t['family']]})" if t["primary"] else t["arm"]
        lines.append(f"| {t['model']} | {arm} | {t['vs']} | {t['class']} | {t['n']} | {t['dropped_zeros']} | "
                     f"{_fmt(t['mean_diff'])} | {_ci(t)} | {t['wins']}/{t['losses']} | {_p(t['p_wilcoxon'])} | "
                     f"{_p(t['p_holm'])} | {_p(t['p_ttest'])} | {t['verdict']} |")
    return lines


# how each family's p was adjusted (`stats.paired_tests`)
ADJUSTED = {"all": "Holm-adjusted p", "primary": "Holm-adjusted p (primary family)",
            "secondary": "gated Holm-adjusted p"}


# what a test marked `primary` is, by its Holm family: declared in the config, or the best arm after the run
PRIMARY_KIND = {"primary": "primary, declared before the run", "all": "best arm, picked after the run"}


def _primary_first(test: dict) -> tuple[bool, bool]:
    return not test["primary"], test["family"] != "primary"


def verdict_lines(tests: list[dict]) -> list[str]:
    """One sentence per (protocol, model, arm, reference) over all classes, primary first; adjusted p.
    A run without a control or augmented arm (a baseline and a ceiling, say) says so instead of staying silent."""
    if not tests:
        return ["- No control or augmented arm was compared with the baseline in this run, so nothing was tested "
                "and there is no verdict. Diagnostic arms are ceilings: read them in the mean Dice table."]
    out = []
    for t in sorted((t for t in tests if t["class"] == ALL), key=_primary_first):
        kind = f" ({PRIMARY_KIND[t['family']]})" if t["primary"] else ""
        head = f"- {t['protocol']} {t['model']}{kind}: **{t['arm']}**"
        stats_ = (f"95 % CI {_ci(t)}; Wilcoxon p = {_p(t['p_wilcoxon'])}, "
                  f"{ADJUSTED[t['family']]} = {_p(t['p_holm'])}, "
                  f"n = {t['n']} units, {t['dropped_zeros']} zero differences dropped")
        what = {"gain": "beats", "loss": "is worse than"}.get(t["verdict"])
        if what:
            out.append(f"{head} {what} {t['vs']} by {_fmt(abs(t['mean_diff']))} Dice points ({stats_}).")
            continue
        tail = ("Augmentation did not help here." if t["vs_role"] == "baseline"
                else f"It did not beat the {t['vs']} control here.")
        out.append(f"{head} is not significantly different from {t['vs']} after the "
                   f"{'gated ' if t['family'] == 'secondary' else ''}Holm adjustment ({t['verdict']}; "
                   f"mean difference {_fmt(t['mean_diff'])} points, {stats_}). {tail}")
    return out


def _ceiling_lines(ceiling: list[dict]) -> list[str]:
    """Diagnostic arms as a ceiling, and each method arm's share of the gap to it (never a verdict)."""
    if not ceiling:
        return []
    lines = ["## Ceiling: diagnostic arms (not a method; never tested, never a verdict)", "",
             "Share of the gap closed = (arm - baseline) / (ceiling - baseline), on the all-classes mean Dice; "
             "n/a where the ceiling is not above the baseline.", "",
             "| protocol | model | arm | mean | baseline | ceiling | gap | share of the gap closed |",
             "|---|---|---|---|---|---|---|---|"]
    for g in ceiling:
        share = "n/a" if g["share_of_gap_closed"] is None else f"{100 * g['share_of_gap_closed']:.0f} %"
        lines.append(f"| {g['protocol']} | {g['model']} | {g['arm']} | {_fmt(g['mean'])} | {g['baseline']} "
                     f"{_fmt(g['baseline_mean'])} | {g['ceiling']} {_fmt(g['ceiling_mean'])} | {_fmt(g['gap'])} | "
                     f"{share} |")
    return lines + [""]


def _signed(points: float | None) -> str:
    return "n/a" if points is None else f"{points:+.1f}"


def _target_lines(targets: list[dict]) -> list[str]:
    """Whether the primary arm reached the gains asked of it, how far it fell short, and the ceilings' own gains."""
    if not targets:
        return []
    lines = ["## Targets", "", "The gains in Dice points over all classes asked of the primary arm ([protocol] "
             "target_over_baseline, target_over_control). A target is met only by a claimed gain (adjusted p < 0.05, "
             "CI above 0) of at least that size.", "",
             "| protocol | model | arm | vs | asked | gain (95 % CI) | adjusted p | met |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for t in targets:
        if t["met"]:
            met = "yes"
        elif t["short_by"]:
            met = f"no: {t['short_by']:.1f} short"
        else:
            met = f"no: the size holds, the gain is not claimed ({t['verdict']})"
        ci = "n/a" if t["ci_low"] is None else f"[{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}]"
        lines.append(f"| {t['protocol']} | {t['model']} | {t['arm']} | {t['vs']} | {_signed(t['target'])} | "
                     f"{_signed(t['gain'])} {ci} | {_p(t['p_holm'])} | {met} |")
        for ceiling, gain in t["ceiling_gain"].items():
            above = (f"; the {_signed(t['target'])} asked lies above it, more than true labels gave"
                     if gain < t["target"] else "")
            notes.append(f"- {t['protocol']} {t['model']}: the ceiling arm {ceiling} gains {_signed(gain)} over "
                         f"{t['vs']}{above}.")
    return lines + [""] + notes + ([""] if notes else [])


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


def _source_settings(generators: dict, quality: list[dict]) -> list[str]:
    """The config's `[generators.NAME]` settings of the sources in the quality table, whose rows name the source
    only: restyled propagated pairs (`appearance = true`) would read there as plain ones."""
    named = [f"{source}: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in generators[source].items())
             for source in dict.fromkeys(q["source"] for q in quality) if generators.get(source)]
    return [f"Source settings (the run's `[generators.*]`): {'; '.join(named)}.", ""] if named else []


@dataclass(frozen=True)
class DiceScoring:
    """How the headline `dice` of the rows was scored."""

    grid: str  # "native" (the label file's in-plane grid) or "working" (the resized slices)
    postprocess: bool  # whether the largest-3D-component step ran before scoring
    score_on: str = "queries"  # "training": a validation run, scored on the folds' training volumes

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"dice_grid = {self.grid!r}; expected one of {list(GRIDS)}")
        if self.score_on not in SCORE_ON:
            raise ValueError(f"score_on = {self.score_on!r}; expected one of {list(SCORE_ON)}")

    def line(self, has_post: bool) -> str:
        step = "with" if self.postprocess else "without"
        post = (" A second column gives Dice with the largest-3D-component step per query volume."
                if has_post else "")
        validation = ("**Validation run:** the folds' training volumes are scored, not their query volumes (their "
                      "test-class labels only score; no model reads them). Use it to choose settings; it is never "
                      "the verdict, and 'query' below means a training volume.\n\n" if self.score_on == "training"
                      else "")
        return f"{validation}Dice is scored on the {self.grid} label grid, {step} post-processing (headline).{post}"


def _unit_paragraph(tests: list[dict]) -> list[str]:
    primary = [t for t in tests if t["family"] == "primary"]
    if primary:
        arm = primary[0]["arm"]
        families = (f"The primary arm, {arm}, was declared in the config before the run ([protocol] primary): its "
                    f"{len(primary)} all-classes comparisons with the baseline and the controls are Holm-adjusted "
                    f"among themselves. The other {len(tests) - len(primary)} p-values are Holm-adjusted among "
                    "themselves and gated by the primary family (serial gatekeeping: each is raised to the largest "
                    "primary p, so nothing secondary is claimed unless every primary p is below 0.05); the family-wise "
                    "error stays at 0.05 over all of them. A gain is claimed only at adjusted p < 0.05 with a "
                    "positive mean difference and a CI above 0.")
    else:
        families = (f"The {len(tests)} p-values are Holm-adjusted over the whole family of comparisons of each "
                    "(protocol, model); a gain is claimed only at adjusted p < 0.05 with a positive mean difference "
                    "and a CI above 0. No primary arm was declared ([protocol] primary), so the arm marked as the best "
                    "is the augmented arm with the highest mean Dice over all classes, picked after seeing the means: "
                    "the family-wide adjustment covers that choice, but it is not a pre-declared comparison.")
    return ["Unit of every paired test: the query volume of a fold (n = distinct (fold, query)). Each unit's Dice is "
            "averaged over seeds (per-class tests) or over classes and seeds (all classes) before arms are paired: "
            "rows that share a query volume or a fine-tune are not independent. n counts the units with a non-zero "
            "difference, as the Wilcoxon signed-rank test drops zero differences ('dropped zeros' says how many); "
            "the mean difference, its 95 % bootstrap CI (seeded) and the paired t-test use every unit. " + families, ""]


def _failed_units(failed: list[dict]) -> list[str]:
    """The units that failed for good: a gap in every table below, never averaged over."""
    if not failed:
        return []
    lines = ["## Failed units: the tables below have no rows for them", ""]
    for f in failed:
        tail = f.get("log_tail", "").strip().splitlines()[-1:] or ["(no log)"]
        lines.append(f"- fold {f['fold']}, seed {f['seed']}: failed after {f['attempts']} attempt(s); "
                     f"last log line: `{tail[0]}`")
    return lines + [""]


def json_safe(obj):
    """`obj` with NaN and infinities replaced by None (JSON has no NaN) and numpy scalars made plain."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_report(out: Path, *, title: str, summary: list[dict], tests: list[dict], notes: list[str],
                 rows: list[dict], context: dict, figures: dict[str, str], quality: list[dict],
                 scoring: DiceScoring, filter_dice: float = 0.5, ceiling: list[dict] = (),
                 targets: list[dict] = ()) -> None:
    """report.md + results.json in `out`; `figures` maps a caption to a PNG file name already in `out`;
    `ceiling` holds the shares of the gap to the diagnostic arms (`stats.gap_closed`), `targets` the checks of
    the gains asked of the primary arm (`stats.target_checks`)."""
    protocols = list(dict.fromkeys(r["protocol"] for r in summary))
    has_post = any("mean_post" in r for r in summary)
    lines = [f"# {title}", "", scoring.line(has_post), "", "## Verdict", ""]
    lines += verdict_lines(tests) + [""] + (_unit_paragraph(tests) if tests else [])
    lines += _failed_units(context.get("failed_units", []))
    lines += _target_lines(list(targets))
    lines += _ceiling_lines(list(ceiling))
    if notes:
        lines += ["## Arms not tested as augmented", ""] + [f"- {n}" for n in notes] + [""]
    for protocol in protocols:
        lines += [f"## {protocol}: mean Dice (%) ± std over folds and seeds", ""] + _summary_table(summary, protocol)
        lines += ["", f"### {protocol}: paired differences (unit: query volume of a fold, n = distinct (fold, query))",
                  ""] + _tests_table(tests, protocol) + [""]
    if quality:
        lines += ["## Synthetic pair quality", "", "Mask consistency: Dice between each pair's intended mask and what "
                  "the base segmenter, given only the real supports, finds on the synthetic image (low: the image does "
                  "not follow its mask). Histogram distance: total variation between organ intensities of the real "
                  "supports and of the pairs (0 same, 1 disjoint). Nearest-support distance: near 0 means copies.", ""]
        lines += _quality_table(quality, filter_dice) + [""]
        lines += _source_settings((context.get("config") or {}).get("generators") or {}, quality)
    lines += ["## Figures", ""] + [f"![{cap}]({name})" for cap, name in figures.items()] + [""]
    lines += ["## Run", "", "```json", json.dumps(json_safe(context), indent=2, default=str), "```", ""]
    results = {"title": title, "dice_grid": scoring.grid, "postprocess": scoring.postprocess,
               "score_on": scoring.score_on, "quality_filter_dice": filter_dice,
               "context": context, "summary": summary, "tests": tests, "ceiling": list(ceiling),
               "targets": list(targets), "notes": notes,
               "quality": quality, "rows": rows}
    text = json.dumps(json_safe(results), indent=2, default=str, allow_nan=False)
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(text)


def build_report(out: Path, *, title: str, rows: list[dict], arms: list[str], context: dict, quality: list[dict],
                 scoring: DiceScoring, figures: dict[str, str], filter_dice: float, seed: int = 0,
                 primary: str | None = None, target_over_baseline: float | None = None,
                 target_over_control: float | None = None) -> None:
    """Statistics, Dice charts and the report of `rows` in `out`; `figures` (already in `out`) follow the charts.

    `arms` gives the display order; `seed` seeds the bootstrap; `primary` is the arm declared as the primary
    comparison before the run (`stats.paired_tests`); the targets are the gains in Dice points asked of the
    primary arm (`stats.target_checks`; None: none asked).
    """
    order = {a: i for i, a in enumerate(dict.fromkeys([*arms, *(r["arm"] for r in rows)]))}
    baseline = arm_roles(rows).baseline
    summary = sorted(summarise(rows), key=lambda r: (r["protocol"], r["model"], order[r["arm"]]))
    tests, notes = paired_tests(rows, seed=seed, primary=primary)
    tests.sort(key=lambda t: (t["protocol"], t["model"], t["vs"] != baseline, order[t["arm"]]))
    charts = {}
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        name = f"dice_{protocol}.png"
        dice_chart(summary, protocol, out / name, arms=list(order))
        charts[f"Dice per arm, model and class ({protocol})"] = name
    role = {r["arm"]: r["role"] for r in rows}
    ceiling = gap_closed([s | {"role": role[s["arm"]]} for s in summary])
    targets = target_checks(tests, ceiling, over_baseline=target_over_baseline, over_control=target_over_control)
    write_report(out, title=title, summary=summary, tests=tests, notes=notes, rows=rows, context=context,
                 figures=charts | figures, quality=quality, scoring=scoring, filter_dice=filter_dice, ceiling=ceiling,
                 targets=targets)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def load_results(path: Path) -> dict:
    """A results.json checked for what a report is rebuilt from; `DataError` names the missing or bad field."""
    try:
        results = json.loads(path.read_text(), parse_constant=_no_constant)
    except OSError as err:
        raise DataError(f"{path}: cannot read the results file ({err.strerror or err})") from None
    except ValueError as err:  # bad JSON, NaN, or bytes that are not UTF-8
        raise DataError(f"{path}: not a valid results JSON ({err})") from None
    if not isinstance(results, dict):
        raise DataError(f"{path}: a results JSON is an object with 'rows', 'dice_grid' and 'postprocess'")
    if "dice_grid" not in results:
        raise DataError(f"{path}: no field 'dice_grid' (an older results format?); expected one of {list(GRIDS)}")
    if results["dice_grid"] not in GRIDS:
        raise DataError(f"{path}: dice_grid = {results['dice_grid']!r}; expected one of {list(GRIDS)}")
    if results.get("score_on", "queries") not in SCORE_ON:
        raise DataError(f"{path}: score_on = {results['score_on']!r}; expected one of {list(SCORE_ON)}")
    if not isinstance(results.get("postprocess"), bool):
        raise DataError(f"{path}: postprocess = {results.get('postprocess')!r}; expected true or false "
                        "(an older results format?)")
    rows = results.get("rows")
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: rows = {rows!r:.40}; expected a non-empty list of Dice rows")
    for i, row in enumerate(rows):
        missing = [f for f in REQUIRED_ROW_FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise DataError(f"{path}: row {i} has no field {missing[0]!r} (an older results format?); every row "
                            f"needs {', '.join(REQUIRED_ROW_FIELDS)}")
        if row["role"] not in ROLES:
            raise DataError(f"{path}: row {i} has role = {row['role']!r}; expected one of {list(ROLES)}")
        if isinstance(row["dice"], bool) or not isinstance(row["dice"], (int, float)) or not 0 <= row["dice"] <= 1:
            raise DataError(f"{path}: row {i} has dice = {row['dice']!r}; expected a number in [0, 1]")
    return results


def figure_caption(name: str) -> str:
    """The caption of a run's figure from its file name (`overlays_{model}_{protocol}.png`, `pairs_{class}.png`),
    so that a rebuilt report captions the figures as the run did."""
    stem = Path(name).stem
    if stem.startswith("overlays_"):
        model, protocol = stem.removeprefix("overlays_").rsplit("_", 1)
        return f"Query overlays, {model}, {protocol}: truth green, prediction red"
    return f"Synthetic pairs, {stem.removeprefix('pairs_')}"


def rebuild(results_path: Path, out: Path, *, seed: int = 0) -> Path:
    """Rebuild report.md, results.json and the Dice charts in `out` from a results.json.

    Statistics are recomputed from the rows. Overlays and pair grids need the stage cache: those already in
    `out` are linked, none are drawn. Nothing is written unless the file passes `load_results`.
    """
    results = load_results(results_path)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    context = results.get("context") or {}
    config_arms = [a.get("name") for a in (context.get("config") or {}).get("arms", []) if isinstance(a, dict)]
    protocol = (context.get("config") or {}).get("protocol") or {}
    primary = protocol.get("primary")
    augmented = arm_roles(results["rows"]).augmented
    if primary is not None and primary not in augmented:
        raise DataError(f"{results_path}: the config's [protocol] primary = {primary!r} is not an augmented arm of "
                        f"its rows; augmented arms: {sorted(augmented)}")
    for key in ("target_over_baseline", "target_over_control"):
        value = protocol.get(key)
        if value is not None and not is_dice_gain(value):
            raise DataError(f"{results_path}: the config's [protocol] {key} = {value!r} is not a gain in Dice "
                            f"points in [0, 100]")
    out.mkdir(parents=True, exist_ok=True)
    figures = {figure_caption(f.name): f.name for pattern in ("overlays_*.png", "pairs_*.png")
               for f in sorted(out.glob(pattern))}
    title = results.get("title") or f"SupportForge ablation: {context.get('experiment', results_path.parent.name)}"
    build_report(out, title=str(title),
                 rows=results["rows"], arms=[a for a in config_arms if a], context=context,
                 quality=results.get("quality") or [], figures=figures, seed=seed,
                 scoring=DiceScoring(results["dice_grid"], results["postprocess"],
                                     results.get("score_on", "queries")),
                 filter_dice=results.get("quality_filter_dice", 0.5), primary=primary,
                 target_over_baseline=protocol.get("target_over_baseline"),
                 target_over_control=protocol.get("target_over_control"))
    return out / "report.md"
