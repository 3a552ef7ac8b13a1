"""``autopar show plan.json --html report.html``: one self-contained page.

The plan's headline, the per-layer table, a bar of the peak memory per device split into its
parts, and a chart of the communication time per layer. Charts are drawn with matplotlib and
embedded as base64 PNG; the page loads nothing from the network (no scripts, fonts or
stylesheets outside it).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from autopar.solver.plan import Plan

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td.l, th.l { text-align: left; }
pre { background: #f6f6f6; padding: 1em; }
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _charts(plan: Plan) -> list[str]:
    """(memory bar, communication chart) as base64 PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = plan.memory
    parts = [("resident", "resident_bytes"), ("gradients", "gradient_bytes")]
    parts += [("saved activations", "activation_bytes"), ("transients", "transient_bytes")]
    fig, ax = plt.subplots(figsize=(8, 1.8))
    left = 0.0
    for label, key in parts:
        gib = m.get(key, 0) / 2**30
        ax.barh(["per device"], [gib], left=left, label=f"{label} {gib:.2f} GiB")
        left += gib
    ax.set_xlabel(f"GiB at the peak ({m.get('at', '?')})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=2, fontsize=8)
    memory = _png(fig)
    plt.close(fig)
    layers = plan.layers()
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers)), 3))
    ax.bar(range(len(layers)), [r["comm_s"] * 1e3 for r in layers.values()], color="tab:red")
    ax.set_xticks(range(len(layers)), list(layers), rotation=90, fontsize=6)
    ax.set_ylabel("communication per step (ms)")
    comm = _png(fig)
    plt.close(fig)
    return [memory, comm]


def write_html(plan: Plan, path: str | Path) -> None:
    """Write the page (needs matplotlib for the charts)."""
    memory, comm = _charts(plan)
    head = "\n".join(html.escape(line) for line in plan.headline())
    rows = []
    for layer, r in plan.layers().items():
        rows.append(
            f"<tr><td class=l>{html.escape(layer)}</td><td class=l>{html.escape(r['out'])}</td>"
            f"<td>{r['compute_s'] * 1e3:.4f}</td><td>{r['comm_s'] * 1e3:.4f}</td>"
            f"<td>{r['mem'] / 2**20:.2f}</td><td class=l>{html.escape(' '.join(r['params']))}</td></tr>"
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>autopar plan</title><style>{_STYLE}</style></head>
<body>
<h1>autopar plan</h1>
<pre>{head}</pre>
<h2>Peak memory per device</h2>
<img alt="memory" src="data:image/png;base64,{memory}">
<h2>Communication per layer</h2>
<img alt="communication" src="data:image/png;base64,{comm}">
<h2>Layers</h2>
<table><tr><th class=l>layer</th><th class=l>out</th><th>compute ms</th><th>comm ms</th><th>MiB</th>
<th class=l>parameters</th></tr>
{"".join(rows)}
</table>
<p>fallback ops (replicated, no sharding rule): {html.escape(", ".join(plan.fallback_ops) or "none")}</p>
</body></html>
"""
    Path(path).write_text(page)
