"""The terminal table: one row per result, grouped so that backends and policies of one case sit together."""

from __future__ import annotations

from ._terminal import clip, safe_text
from .report import Report, Result

__all__ = ["format_table", "format_report", "format_serving", "format_batch_invariance", "floor_summary",
           "POLICY_ORDER"]

MESSAGE_CHARS = 60  # of a status message in the table (the report keeps it whole): one row stays one line
POLICY_ORDER = ("fp64", "fp32", "bf16-mixed", "fp16-mixed", "fp16-mixed-ls", "bf16", "fp16", "fp8-mixed",
                "torch-bf16", "bf16-sr", "bf16-kahan", "torch-amp-fp16")


def _num(x, fmt: str, missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def _sort_key(r: Result):
    s = r.spec
    policy = s["policy_name"]
    rank = POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)
    return (s["problem"], s["data"], s["optimizer"]["name"], rank, policy, s.get("accum_steps", 1), s["backend"],
            s["device"])


def _status(r: Result) -> str:
    if not r.message:
        return r.status
    # Escaped before it is cut (an escape lengthens the text); the ellipsis says the message goes on.
    return f"{r.status}: {clip(safe_text(r.message), MESSAGE_CHARS)}"


def format_table(report: Report) -> str:
    """The report as a text table. Report text is escaped (precision/_terminal.py): a report can come from
    anyone, and no control character of it reaches the terminal."""
    with_floors = any(r.floors is not None for r in report.results)
    with_accum = any(r.spec.get("accum_steps", 1) > 1 for r in report.results)
    headers = ("problem", "optimizer", "policy", "backend", "us/step", "bits", "rel_l2", "max_ulp",
               "loss", "loss_gap", "flips", "diverged") + (("accum", "bits vs 1 batch") if with_accum else ()) + (
        ("verdict",) if with_floors else ()) + ("status",)
    rows = []
    for r in sorted(report.results, key=_sort_key):
        s = r.spec
        us = None if r.time_per_step_s is None else r.time_per_step_s * 1e6
        verdict = (safe_text(r.verdict["label"]) if r.verdict else "-",) if with_floors else ()
        accum = (str(s.get("accum_steps", 1)), _num((r.accumulation or {}).get("bits_of_agreement"), ".1f")
                 ) if with_accum else ()
        rows.append((safe_text(f"{s['problem']}:{s['data']}"), safe_text(s["optimizer"]["name"]),
                     safe_text(s["policy_name"]), safe_text(f"{s['backend']}-{s['device']}"), _num(us, ".1f"),
                     _num(r.bits_of_agreement, ".1f"),
                     _num(r.rel_l2, ".2e", "inf" if r.status == "diverged" else "-"), _num(r.max_ulp, ".3g"),
                     _num(r.final_loss, ".4g"), _num(r.loss_gap, ".2e"), _num(r.flip_rate, ".3f"),
                     _num(r.diverged_at, "d"), *accum, *verdict, _status(r)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    ordered = sorted(report.results, key=_sort_key)
    previous, floors_shown = None, []
    for r, row in zip(ordered, rows):
        group = row[:2]
        if previous is not None and group != previous:
            lines += [*floors_shown, ""]
            floors_shown = []
        previous = group
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if r.floors is not None and (line := "  " + floor_summary(r.floors)) not in floors_shown:
            floors_shown.append(line)
    return "\n".join(lines + floors_shown)


def floor_summary(floors: dict) -> str:
    """One line: what reseeding and reordering alone do to the float64 reference of a group of results."""
    def spread(values, fmt):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        values.sort()
        return f"{format(values[0], fmt)}..{format(values[-1], fmt)}"

    seeds = floors["seeds"]
    if floors.get("seed_flip_rate") is not None:
        seed_part = f"flips {spread(floors['seed_flip_rate'], '.3f')}"
        order_part = f"flips {_num(floors['order_flip_rate'], '.3f')}"
    else:
        seed_part = f"loss_gap {spread(floors['seed_loss_gap'], '.2e')}"
        order_part = f"loss_gap {_num(floors['order_loss_gap'], '.2e')}"
    return (f"noise floor (fp64, {seeds} seeds, {seeds * (seeds - 1) // 2} pairs): {seed_part}, rel_l2 "
            f"{spread(floors['seed_rel_l2'], '.2g')}; reordered sums: rel_l2 {_num(floors['order_rel_l2'], '.2e', 'inf')}, "
            f"{order_part}")


def _grid(headers, rows) -> list[str]:
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    return ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths),
            *("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)]


def _case(r: Result) -> tuple[str, ...]:
    s = r.spec
    return (safe_text(f"{s['problem']}:{s['data']}"), safe_text(s["optimizer"]["name"]), safe_text(s["policy_name"]),
            safe_text(f"{s['backend']}-{s['device']}"))


def format_serving(report: Report) -> str:
    """Inference parity: each trained model served in other formats against fp64 on its backend. Per format the
    flip rate of the test predictions (regression: the largest change of a prediction, 'd=...'); then the
    worst mean KL divergence over the formats and the format it comes from."""
    served = [r for r in sorted(report.results, key=_sort_key) if r.inference]
    if not served:
        return ""
    formats = list(dict.fromkeys(row["format"] for r in served for row in r.inference))
    rows = []
    for r in served:
        by_format = {row["format"]: row for row in r.inference}
        cells = []
        for name in formats:
            row = by_format.get(name)
            if row is None:
                cells.append("")
            elif row.get("flip_rate") is not None:
                cells.append(format(row["flip_rate"], ".3f"))
            else:
                cells.append("d=" + _num(row.get("max_abs_diff"), ".1e"))
        kls = [(row["kl_mean"], row["format"]) for row in r.inference if row.get("kl_mean") is not None]
        worst = max(kls) if kls else None
        rows.append((*_case(r), *cells, f"{worst[0]:.1e} ({safe_text(worst[1])})" if worst else "-"))
    headers = ("problem", "optimizer", "trained", "backend", *(f"flips@{safe_text(f)}" for f in formats),
               "worst kl_mean")
    return "\n".join(["Served in other formats (flip rate of test predictions vs fp64 on the same backend):",
                      *_grid(headers, rows)])


def format_batch_invariance(report: Report) -> str:
    """Batch invariance: per trained model, the share of test samples whose logits (in the policy's compute
    format) differ bitwise from the sample served alone, per batch size and by position in a batch."""
    checked = [r for r in sorted(report.results, key=_sort_key) if r.batch_invariance]
    if not checked:
        return ""
    labels = list(dict.fromkeys(k for r in checked for bi in r.batch_invariance for k in bi["differ_share"]))
    rows = []
    for r in checked:
        bi = r.batch_invariance[0]
        rows.append((*_case(r), safe_text(bi["format"]),
                     *(_num(bi["differ_share"].get(label), ".3f") for label in labels),
                     _num(bi.get("position_differ_share"), ".3f"), "yes" if bi["invariant"] else "no"))
    headers = ("problem", "optimizer", "policy", "backend", "format", *(f"bs={safe_text(x)}" for x in labels),
               "position", "invariant")
    return "\n".join(["Batch invariance (share of test samples whose logits differ from serving each alone):",
                      *_grid(headers, rows)])


def format_report(report: Report) -> str:
    """The table, then the serving and batch-invariance tables when the report has them."""
    return "\n\n".join(part for part in (format_table(report), format_serving(report),
                                         format_batch_invariance(report)) if part)
