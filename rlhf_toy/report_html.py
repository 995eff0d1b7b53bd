"""The compare report as one self-contained HTML page: tables you can sort, plots inline.

    python -m rlhf_toy.report_html runs/demo/compare/summary.json   # writes report.html beside it

`render_compare_html(summary)` reads only the compare summary dict (what `summary.json`
holds): every entry that is a dict with a `kl_to_ref` is a method (a row), its numeric
keys are the columns (a `<key>_se` beside `<key>` is shown as `value ± se`); `sweep`
(a list of points) becomes a second table, `verdict["sentence"]` a paragraph, and every
PNG named in `plots` is embedded as a data URI, so the page is one file that opens anywhere.
Clicking a column header sorts its table (a few lines of inline script, no network).
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys

# preferred column order; other numeric keys follow in the order the summary gives them
COLUMN_ORDER = ("beta", "steps", "gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_ref",
                "response_len")

_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#1a1a1a;"
        "line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
        "th,td{padding:.35em .8em;border-bottom:1px solid #ddd;text-align:right}"
        "th:first-child,td:first-child{text-align:left}"
        "th{background:#f3f3f3;cursor:pointer;user-select:none}th:hover{background:#e4e4e4}"
        "tbody tr:hover{background:#f7f9fc}img{max-width:100%;border:1px solid #ddd}"
        ".note{color:#555;font-size:.9em}"
        'th[data-order=asc]::after{content:" \\25B2"}th[data-order=desc]::after{content:" \\25BC"}')

_SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var asc = th.dataset.order !== "asc";
    th.closest("tr").querySelectorAll("th").forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = asc ? "asc" : "desc";
    var key = function (row) {
      var text = row.cells[col].dataset.value || row.cells[col].textContent;
      var x = parseFloat(text);
      return isNaN(x) ? text : x;
    };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _methods(summary: dict) -> list[str]:
    return [k for k, v in summary.items() if isinstance(v, dict) and "kl_to_ref" in v]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _columns(rows: list[dict]) -> list[str]:
    """Numeric keys of the rows (not the `_se` companions), preferred ones first."""
    seen = dict.fromkeys(k for row in rows for k, v in row.items()
                         if _is_number(v) and not k.endswith("_se"))
    return [k for k in COLUMN_ORDER if k in seen] + [k for k in seen if k not in COLUMN_ORDER]


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if not _is_number(value):
        return "<td></td>"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if _is_number(row.get(f"{key}_se")):
        text += f" ± {row[f'{key}_se']:.3f}"
    return f'<td data-value="{value!r}">{html.escape(text)}</td>'


def _table(rows: list[tuple[str, dict]], first: str) -> str:
    columns = _columns([row for _, row in rows])
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in (first, *columns))
    body = "".join(f"<tr><td>{html.escape(name)}</td>{''.join(_cell(row, c) for c in columns)}"
                   "</tr>" for name, row in rows)
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _image(path: str, alt: str) -> str:
    if not os.path.isfile(path):
        return f'<p class="note">({html.escape(alt)}: {html.escape(path)} not found)</p>'
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def render_compare_html(summary: dict) -> str:
    """The page for a compare summary dict; see the module docstring for what it reads."""
    seeds = summary.get("seeds", [summary.get("seed", "?")])
    title = (f"Every method against SFT ({summary.get('task', '?')}, "
             f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">Every policy sampled on the same {summary.get("n_eval_prompts", "?")}'
             " held-out prompts. Click a column header to sort.</p>",
             *([f"<p><b>{html.escape(str(summary['gold']).capitalize())}:</b> the prompts are "
                "the user's; proxy reward and KL are measured, no gold.</p>"]
               if "gold" in summary else []),
             _table([(m, summary[m]) for m in _methods(summary)], "method")]
    if summary.get("sweep"):
        parts += ["<h2>Frontier sweep</h2>",
                  _table([(p.get("method", "?"), p) for p in summary["sweep"]], "method")]
    if isinstance(summary.get("verdict"), dict) and summary["verdict"].get("sentence"):
        parts.append(f"<p><b>At equal KL.</b> {html.escape(summary['verdict']['sentence'])}</p>")
    parts += [_image(path, name.replace("_", " ")) for name, path in summary.get("plots", {}).items()]
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{_CSS}</style></head><body>{''.join(parts)}"
            f"<script>{_SORT_JS}</script></body></html>\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m rlhf_toy.report_html SUMMARY_JSON [OUT_HTML]`."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m rlhf_toy.report_html SUMMARY_JSON [OUT_HTML]", file=sys.stderr)
        return 2
    with open(args[0]) as fh:
        summary = json.load(fh)
    out = args[1] if len(args) == 2 else os.path.join(os.path.dirname(args[0]), "report.html")
    with open(out, "w") as fh:
        fh.write(render_compare_html(summary))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
