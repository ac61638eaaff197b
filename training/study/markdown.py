"""study.md (one study) and suite.md (the suite's table), from the study documents alone."""

from __future__ import annotations

from typing import Any

from training.study.strategies import LABELS, STRATEGIES

DIGITS = {"points": 2, "%": 1, "nats": 3}
RULES = ("rule", "rule-grid")


def number(value: float | None, unit: str) -> str:
    return "–" if value is None else f"{value:.{DIGITS.get(unit, 3)}f}"


def mean_sd(stats: dict[str, Any], unit: str) -> str:
    if not stats["n"]:
        return "–"
    return f"{number(stats['mean'], unit)} ± {number(stats['std'], unit)}"


def value_text(value: float | None, metric: dict[str, Any]) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}%" if metric["unit"] == "points" else f"{value:.4g}"


def rule_text(rule: dict[str, Any]) -> str:
    return f"window {rule['decline_window']}, tolerance {rule['tolerance']:g}, strategy {rule['strategy']}"


def yardstick(doc: dict[str, Any]) -> str:
    """What one test example is worth in the primary metric's gap unit."""
    primary = doc["metrics"][0]
    worth = doc["one_example"].get(primary["name"])
    if primary["unit"] == "points":
        return f"one test example is {worth:.2f} points of accuracy"
    return f"one test example is 1/{doc['n_test']} = {worth:.2f}% of the set (a crude yardstick for {primary['label']})"


def study_markdown(doc: dict[str, Any]) -> str:
    primary = doc["metrics"][0]
    seeds = doc["seeds"]
    several = len({v["scoring"] for v in doc["variants"]}) > 1
    lines = [
        f"# Study: {doc['label']} ({doc['config']})", "",
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}), {doc['epochs']} epochs each, trained once with early "
        f"stopping off; *early stopping on* is the same runs cut where patience {doc['patience']} (min_delta "
        f"{doc['min_delta']:g}) would have stopped them: the schedule spans the configured epochs either way, so the "
        f"cut run is the early-stopped run. Configured rule: {rule_text(doc['rule'])}, loss ratio "
        f"{doc['rule']['loss_ratio']:g}. Test split: {doc['n_test']} examples; {yardstick(doc)}.", "",
        "The **oracle is hindsight**: each run's checkpoint with the best test metric, which no trainer can know; "
        "gaps are measured to it (to each metric's own best checkpoint), so 0 is the best any strategy can do. "
        "Gap units: " + ", ".join(f"{m['label']} in {m['unit']}" for m in doc["metrics"]) + ". "
        "The grid point is picked on the validation split only: the lowest mean validation loss of its choices, "
        "among the settings under which the rule was satisfied in at least half the runs.", "",
    ]
    for variant in doc["variants"]:
        lines += variant_section(doc, variant, several)
    lines += stopping_section(doc, primary, several)
    return "\n".join(lines) + "\n"


def variant_section(doc: dict[str, Any], variant: dict[str, Any], several: bool) -> list[str]:
    metrics, primary, agg = doc["metrics"], doc["metrics"][0], variant["aggregate"]
    title = variant_title(variant, several)
    lines = [f"## {title}", "", f"Grid point picked on validation: {rule_text(variant['grid_rule'])}.", "",
             "| strategy | " + " | ".join(f"gap {m['label']} ({m['unit']})" for m in metrics)
             + f" | {primary['label']} | evaluations after the peak | rule satisfied |",
             "|---|" + "---:|" * (len(metrics) + 3)]
    for s in STRATEGIES:
        a = agg[s]
        gaps = " | ".join(mean_sd(a["gap"][m["name"]], m["unit"]) for m in metrics)
        after = a["evals_after_peak"]
        after_text = f"{after['mean']:.1f} [{after['min']:.0f}, {after['max']:.0f}]" if after["n"] else "–"
        satisfied = f"{a['rule_satisfied']}/{len(variant['runs'])}" if "rule_satisfied" in a else ""
        lines.append(f"| {LABELS[s]} | {gaps} | {value_text(a['value'][primary['name']]['mean'], primary)} | "
                     f"{after_text} | {satisfied} |")
    lines.append("")
    for s in RULES:
        vs = agg[s]["versus"]
        lines.append(f"- {LABELS[s]}, seed by seed on {primary['label']}: "
                     + "; ".join(f"vs {LABELS[o]} better in {v['better']}, same in {v['same']}, worse in {v['worse']}"
                                 for o, v in vs.items()))
    lines += ["", f"Per seed: gap in {primary['label']} ({primary['unit']}), and the step chosen.", "",
              "| seed | records (last step) | peak step | " + " | ".join(LABELS[s] for s in STRATEGIES) + " |",
              "|---:|---:|---:|" + "---:|" * len(STRATEGIES)]
    for run in variant["runs"]:
        cells = " | ".join(f"{number(run['strategies'][s]['gap'][primary['name']], primary['unit'])} "
                           f"({run['strategies'][s]['step']})" for s in STRATEGIES)
        lines.append(f"| {run['seed']} | {run['records']} ({run['last_step']}) | {run['peak_step']} | {cells} |")
    return [*lines, ""]


def variant_title(variant: dict[str, Any], several: bool) -> str:
    stopping = f"Early stopping on (patience {variant['patience']})" if variant["patience"] else "Early stopping off"
    return f"{stopping}, records scored by {variant['scoring']}" if several else stopping


def stopping_section(doc: dict[str, Any], primary: dict[str, Any], several: bool) -> list[str]:
    """Early stopping on vs off, strategy by strategy: the primary metric and its gap to each variant's oracle."""
    lines = ["## Early stopping on vs off", "",
             f"Mean {primary['label']} and mean gap to that variant's oracle ({primary['unit']}); with early stopping "
             "the oracle can only pick among the checkpoints the shorter run saved.", ""]
    by_scoring: dict[str, list[dict[str, Any]]] = {}
    for v in doc["variants"]:
        by_scoring.setdefault(v["scoring"], []).append(v)
    for scoring, pair in by_scoring.items():
        if several:
            lines += [f"Scored by {scoring}:", ""]
        lines += ["| strategy | " + " | ".join(variant_title(v, False) for v in pair) + " |",
                  "|---|" + "---:|" * len(pair)]
        for s in STRATEGIES:
            cells = [f"{value_text(v['aggregate'][s]['value'][primary['name']]['mean'], primary)} (gap "
                     f"{number(v['aggregate'][s]['gap'][primary['name']]['mean'], primary['unit'])})" for v in pair]
            lines.append(f"| {LABELS[s]} | " + " | ".join(cells) + " |")
        records = [f"{sum(r['records'] for r in v['runs']) / len(v['runs']):.1f}" for v in pair]
        lines += [f"| mean records per run | {' | '.join(records)} |", ""]
    return lines


def suite_markdown(docs: list[dict[str, Any]], minutes: float) -> str:
    """One row per study and variant: the primary metric's mean gap ± sd to the oracle, per strategy."""
    runs = sum(len(doc["seeds"]) for doc in docs)
    training = sum(sum(doc["timing"]["training_s"]) for doc in docs) / 60
    lines = [f"Gap to the hindsight oracle on the test split, mean ± sd over seeds (accuracy: points; regression: % of "
             f"the oracle's MSE; lower is better, 0 is the oracle). {runs} runs, {training:.1f} min of training "
             f"when they were trained; this call took {minutes:.1f} min (finished runs are reused).", "",
             "| data set | test n (one example) | seeds | early stopping | scoring | rule | rule (grid on val) | "
             "best val | last | rule satisfied | oracle |", "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for doc in docs:
        primary = doc["metrics"][0]
        worth = doc["one_example"][primary["name"]]
        unit = "pt" if primary["unit"] == "points" else "%"
        for v in doc["variants"]:
            a = v["aggregate"]
            gaps = " | ".join(mean_sd(a[s]["gap"][primary["name"]], primary["unit"])
                              for s in ("rule", "rule-grid", "best-val", "last"))
            stopping = f"on ({v['patience']})" if v["patience"] else "off"
            lines.append(f"| {doc['label']} ({primary['label']}) | {doc['n_test']} ({worth:.2f} {unit}) | "
                         f"{len(doc['seeds'])} | {stopping} | {v['scoring']} | {gaps} | "
                         f"{a['rule']['rule_satisfied']}/{len(v['runs'])} | "
                         f"{value_text(a['oracle']['value'][primary['name']]['mean'], primary)} |")
    return "\n".join(lines) + "\n"
