"""The report on the terminal: a table with one row per number, one column per runner and their ratio
(:func:`format_table`), then what could not be matched, how far a stopped runner got, the stage's comparison
and the machine's matmul peak (:func:`print_report`)."""

from __future__ import annotations

import math
from typing import Any

from alignlab.bench.registry import PAIRS


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{100 * value:.2f} %"
    if kind == "ratio":
        return f"{value:.2f}x"
    return f"{value:,.{kind}f}"


TABLE_ROWS = (  # (label, key, format); TOKENS and UNIT are replaced by the stage's words
    ("TOKENS/s", "tokens_per_s", "1"),
    ("TOKENS per CPU-second", "tokens_per_cpu_s", "1"),
    ("CPU utilisation (cores)", "cpu_utilisation", "2"),
    ("TOKENS/s, uncontended UNITs", "tokens_per_s_uncontended", "1"),
    ("uncontended UNITs", "uncontended_steps", "int"),
    ("s/UNIT", "s_per_step", "2"),
    ("TOKENS/UNIT", "tokens_per_step", "1"),
    ("peak RSS (MiB)", "peak_rss_mib", "0"),
    ("final loss", "final_loss", "4"),
    ("MFU (measured peak)", "mfu", "pct"),
    ("precision", "precision", "str"),
    ("trainable params", "trainable_params", "int"),
    ("timed UNITs", "timed_steps", "int"),
)
STOPPED_ROWS = (  # shown when a worker was stopped at --time-limit
    ("stopped at the time limit (s)", "time_limit_s", "0"),
    ("UNITs finished before the stop", "steps_done", "int"),
    ("s spent in the unfinished UNIT", "unfinished_step_s", "1"),
    ("TOKENS/s, upper bound", "tokens_per_s_upper_bound", "2"),
)


def format_table(report: dict[str, Any]) -> Any:
    """A rich Table of the report: one row per number, one column per runner, and first / second."""
    from rich.table import Table

    cfg = report["config"]
    results = report["results"]
    pair = PAIRS[report["stage"]]
    names = report.get("names") or list(pair.names)
    labels = dict(zip(names, report.get("labels") or pair.labels))
    unit, tokens = report.get("unit", pair.unit), report.get("tokens", pair.tokens)
    title = (f"alignlab bench {report['stage']} ({report['settings']}): {cfg['model']}, batch {cfg['batch_size']}, "
             f"max_length {cfg['max_length']}, {cfg['warmup_steps']}+{cfg['steps']} {unit}s")
    table = Table(title=title)
    table.add_column("")
    for lib in results:
        table.add_column(labels.get(lib, lib), justify="right")
    if "ratios" in report:
        table.add_column(" / ".join(labels[name] for name in names), justify="right")
    stopped = any(result.get("timed_out") for result in results.values())
    for label, key, kind in TABLE_ROWS + pair.rows + (STOPPED_ROWS if stopped else ()):
        cells = [str(results[lib].get(key) or "-") if kind == "str" else _fmt(results[lib].get(key), kind)
                 for lib in results]
        if "ratios" in report:
            ratio, ratios_ = _fmt(report["ratios"].get(key), "ratio"), report["ratios"]
            if key == "tokens_per_s" and "tokens_per_s_at_least" in ratios_:
                ratio = f">= {_fmt(ratios_['tokens_per_s_at_least'], 'ratio')}"
            elif key == "tokens_per_s" and "tokens_per_s_at_most" in ratios_:
                ratio = f"<= {_fmt(ratios_['tokens_per_s_at_most'], 'ratio')}"
            cells.append(ratio)
        table.add_row(label.replace("TOKENS", tokens).replace("UNIT", unit), *cells)
    return table


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    console.print(format_table(report))
    labels = dict(zip(report.get("names") or [], report.get("labels") or []))
    for lib, result in report["results"].items():
        for line in (result.get("notes") or {}).get("unmatched") or []:
            console.print(f"not matched ({labels.get(lib, lib)}): {escape(line)}")
    unit = report.get("unit", "step")
    for lib, result in report["results"].items():
        if not result.get("timed_out"):
            continue
        label = labels.get(lib, lib)
        if not result.get("loop_started"):
            console.print(f"{label}: stopped at the time limit ({result['time_limit_s']:.0f} s) before its first "
                          f"{unit} began (loading took all of it); no speed measured")
            continue
        line = (f"{label}: stopped at the time limit ({result['time_limit_s']:.0f} s): {result['steps_done']} "
                f"{unit}(s) finished after {result['load_s']:.0f} s of loading, then "
                f"{result['unfinished_step_s']:.0f} s in the next without finishing it")
        if result.get("tokens_per_s_upper_bound"):
            stretch = f"its warmup {unit}" if result.get("bound_from_warmup") else f"its timed {unit}s so far"
            line += (f"; a {unit} holds at most {result['max_step_tokens']:,} tokens, so {stretch} ran at under "
                     f"{result['tokens_per_s_upper_bound']:.2f} tokens/s")
        console.print(line + " (its peak RSS is the peak up to the stop, a lower bound)")
    comparison = report.get("comparison")
    if comparison and report["stage"] == "rm-kwise":
        tokens, epoch = comparison["encoded_tokens_per_epoch"], comparison["epoch_s_estimate"]
        console.print(
            f"one epoch = {comparison['comparisons_per_epoch']:,} comparisons: K-wise encodes {tokens['kwise']:,} "
            f"tokens, pairs {tokens['pairs']:,} (token factor {comparison['token_factor']:.2f}x); estimated epoch "
            f"{epoch['kwise']:.1f} s vs {epoch['pairs']:.1f} s: speed factor {comparison['speed_factor']:.2f}x "
            f"(target >= token factor: {'met' if comparison['target_met'] else 'NOT met'})")
        run = comparison.get("run_tokens_per_epoch") or {}
        if run.get("kwise"):
            console.print(f"tokens with each example's prompt encoded once: K-wise {run['kwise']:,}, "
                          f"pairs {run['pairs']:,} (factor {comparison['run_token_factor']:.2f}x)")
    peaks = report.get("matmul_peak_flops")
    if peaks:
        console.print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
                      f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; machine: {report['machine']['cpu']}, "
                      f"{report['machine']['nproc']} CPUs")
