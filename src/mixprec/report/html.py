"""Self-contained HTML: inline CSS, images as base64 data URIs, no scripts, every text escaped."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape

import numpy as np

from ..cost.keys import BY_KEY
from ..cost.units import format_size
from .data import COST_KEYS, COST_LABELS, as_list, bits_label, mean_bits

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;background:#f5f6f8;
color:#1d2330;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:1.55em;margin:0 0 4px}h2{font-size:1.2em;margin:32px 0 10px;padding-bottom:4px;
border-bottom:2px solid #e3e6eb}h3{font-size:1.02em;margin:22px 0 6px;color:#333b4a}.sub{color:#5a6272;margin:0 0 12px}
.badge{display:inline-block;padding:3px 10px;border-radius:12px;font-size:.85em;font-weight:600;margin-right:6px}
.ok{background:#dff3e4;color:#1c6b35}.bad{background:#fbe0e0;color:#9b1c1c}.na{background:#eceef2;color:#5a6272}
table{border-collapse:collapse;width:100%;font-size:.9em;margin:6px 0}
th,td{padding:5px 10px;border-bottom:1px solid #e3e6eb;text-align:right;white-space:nowrap}
th{background:#f0f2f5;font-weight:600}th:first-child,td:first-child{text-align:left}
td.l,th.l{text-align:left}tbody tr:nth-child(even){background:#fafbfc}
figure{margin:18px 0;text-align:center}figure img{max-width:100%;height:auto;border:1px solid #e3e6eb}
figcaption{color:#5a6272;font-size:.88em;margin-top:4px}a{color:#2456a6}
.meta{color:#5a6272;font-size:.85em;margin-top:28px}
"""


@dataclass(frozen=True)
class Image:
    title: str
    png: bytes
    caption: str = ""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n")


def figure(img: Image) -> str:
    cap = f"<figcaption>{escape(img.caption)}</figcaption>" if img.caption else ""
    return (f'<figure><img src="{data_uri(img.png)}" alt="{escape(img.title)}">{cap}</figure>')


def table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table of already-escaped cells; the first ``left`` columns are left-aligned."""
    cls = lambda i: ' class="l"' if i < left else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{escape(text)}</span>'


# ----------------------------------------------------------------------------- formatting

def format_cost(key: str, value, clock_hz: float | None = None) -> str:
    """A cost in its unit: sizes in binary units with the exact byte count, counts with separators."""
    if value is None:
        return "–"
    if key.endswith("bytes") or getattr(BY_KEY.get(key), "unit", None) == "B":
        return f"{format_size(value)} ({value:,.0f} B)" if value >= 1024 else format_size(value)
    if key == "latency_cycles":
        ms = f" ≈ {value / clock_hz * 1e3:.3g} ms" if clock_hz else ""
        return f"{value:,.0f} cycles{ms}"
    if key == "energy_uj":
        return f"{value:.3g} µJ"
    return f"{value:,.0f}"


def percent(value) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _status(ok: bool | None) -> str:
    return badge("n/a", "na") if ok is None else badge("ok", "ok") if ok else badge("over", "bad")


# ----------------------------------------------------------------------------- run report

def header(result: dict, capacity: dict) -> str:
    feasible = result.get("feasible")
    mism = result.get("reference_mismatches")
    title = f"{result.get('model', '?')} on {result.get('data', '?')} for {result.get('target', '?')}"
    keys = ("method", "seed", "device", "processes", "mixprec_version")
    sub = " · ".join(f"{k} {escape(str(result[k]))}" for k in keys if result.get(k) is not None)
    badges = [badge("feasible", "ok") if feasible else badge("INFEASIBLE", "bad") if feasible is False
              else badge("feasibility unknown", "na")]
    if mism is not None:
        badges.append(badge("bit-exact vs reference" if mism == 0 else f"{mism} reference mismatches",
                            "ok" if mism == 0 else "bad"))
    label = bits_label(result)
    if label:
        badges.append(badge(label, "na"))
    return f"<h1>{escape(title)}</h1><p class=\"sub\">{sub}</p><p>{''.join(badges)}</p>"


def summary_rows(result: dict, capacity: dict, clock_hz: float | None = None) -> list[list[str]]:
    """Accuracy and every cost, with its budget, the device capacity, and ok/over for each."""
    acc = result.get("accuracy") or {}
    rows = [["test accuracy, float", escape(percent(acc.get("float"))), "", "", "", ""],
            ["test accuracy, integer-exact", escape(percent(acc.get("quantized"))), "", "", "", ""]]
    if acc.get("float") is not None and acc.get("quantized") is not None:
        rows.append(["accuracy change", f"{100 * (acc['quantized'] - acc['float']):+.2f} pp", "", "", "", ""])
    cost, budget = result.get("cost") or {}, result.get("budget") or {}
    checks = result.get("budget_checks") or {}
    for key in [k for k in COST_KEYS if k in cost] + [k for k in cost if k not in COST_KEYS]:
        value = cost[key]
        limit = (checks.get(key) or {}).get("limit", budget.get(key))
        ok = (checks.get(key) or {}).get("ok", None if limit is None or value is None else value <= limit)
        cap = capacity.get(key)
        used = f" ({100 * value / cap:.1f} % used)" if cap and value is not None else ""
        rows.append([escape(COST_LABELS.get(key, key)), escape(format_cost(key, value, clock_hz)),
                     escape(format_cost(key, limit, clock_hz)) if limit is not None else "–",
                     _status(ok) if limit is not None else "",
                     escape(format_size(cap) + used) if cap else "–",
                     _status(value <= cap) if cap and value is not None else ""])
    return rows


def summary(result: dict, capacity: dict, clock_hz: float | None = None) -> str:
    return table(["", "value", "budget", "", "device capacity", ""], summary_rows(result, capacity, clock_hz))


def layer_rows(result: dict) -> list[list[str]]:
    rows = []
    for r in result.get("layers") or []:
        bits = as_list(r.get("weight_bits"))
        wb = ([f"{r.get('weight_bits_mean', np.mean(bits)):.2f}", f"{min(bits):g}", f"{max(bits):g}"]
              if bits else ["", "", ""])
        act = mean_bits(r.get("act_bits"))
        rows.append([escape(str(r.get("name", "?"))), escape(str(r.get("op", "?"))), *wb,
                     "" if act is None else f"{act:g}",
                     *(_int(r.get(k)) for k in ("weight_bytes", "param_bytes", "macs"))])
    return rows


def _int(value) -> str:
    return "" if value is None else f"{value:,.0f}"


def layers_table(result: dict) -> str:
    return table(["layer", "op", "weight bits mean", "min", "max", "act bits", "weight bytes", "param bytes", "MACs"],
                 layer_rows(result), left=2)


def run_page(result: dict, images: list[Image], capacity: dict, clock_hz: float | None = None) -> str:
    parts = [header(result, capacity), "<h2>Summary</h2>", summary(result, capacity, clock_hz)]
    if result.get("layers"):
        parts += ["<h2>Layers</h2>", layers_table(result)]
    if images:
        parts.append("<h2>Plots</h2>")
        parts += [f"<h3>{escape(i.title)}</h3>{figure(i)}" for i in images]
    if result.get("wall_seconds") is not None:
        parts.append(f'<p class="meta">run took {result["wall_seconds"]:.1f} s</p>')
    title = f"mixprec report: {result.get('model', '?')} / {result.get('target', '?')}"
    return page(title, "\n".join(parts))


# ----------------------------------------------------------------------------- folder report

@dataclass(frozen=True)
class RunLink:
    href: str  # relative to the folder report
    name: str
    result: dict


def folder_rows(links: list[RunLink]) -> list[list[str]]:
    rows = []
    for link in links:
        r = link.result
        acc, cost = r.get("accuracy") or {}, r.get("cost") or {}
        feasible = r.get("feasible")
        rows.append([f'<a href="{escape(link.href)}">{escape(link.name)}</a>',
                     *(escape(str(r.get(k, "?"))) for k in ("model", "data", "target", "method")),
                     escape(bits_label(r)), escape(percent(acc.get("float"))), escape(percent(acc.get("quantized"))),
                     *(escape(format_size(cost[k])) if cost.get(k) is not None else "–"
                       for k in ("flash_bytes", "ram_bytes")),
                     escape(format_cost("ebops", cost.get("ebops"))),
                     badge("n/a", "na") if feasible is None
                     else badge("yes", "ok") if feasible else badge("no", "bad")])
    return rows


def folder_page(folder_name: str, links: list[RunLink], images: list[Image]) -> str:
    parts = [f"<h1>{escape(folder_name)}: {len(links)} runs</h1>",
             '<p class="sub">Quantized (integer-exact) test accuracy against deployed cost; '
             "each run links to its own report.</p>"]
    parts += [figure(i) for i in images]
    parts += ["<h2>Runs</h2>", table(["run", "model", "data", "target", "method", "bits", "float acc",
                                      "quantized acc", "FLASH", "peak RAM", "EBOPs", "feasible"],
                                     folder_rows(links), left=6)]
    return page(f"mixprec runs: {folder_name}", "\n".join(parts))
