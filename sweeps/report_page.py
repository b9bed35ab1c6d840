"""The report's HTML: one self-contained page (images inlined as data URIs, no CDN, no network).

A jinja2 template with autoescaping; the only script sorts the trials table by the clicked
column (numbers as numbers, empty cells last), which HTML cannot do by itself.
"""

from __future__ import annotations

import base64

import jinja2

_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>sweep {{ name }}: report</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px; padding: 0 1em; color: #222; }
 h1 { margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
 .meta { color: #555; } .note { color: #666; font-style: italic; }
 table { border-collapse: collapse; font-size: 12px; }
 th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; white-space: nowrap; }
 th { background: #f0f0f0; cursor: pointer; user-select: none; position: sticky; top: 0; }
 th.asc::after { content: " \25B2"; } th.desc::after { content: " \25BC"; }
 td.text { text-align: left; }
 tr.winner td { background: #fff5cc; } tr.exported td:first-child { font-weight: bold; }
 tr.pruned td { color: #8a5a00; } tr.failed td { color: #b00; }
 #ground-truth-table tr.original td { background: #eef3fb; } #ground-truth-table th { cursor: default; }
 .scroll { max-height: 600px; overflow: auto; display: inline-block; }
 img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
 .wide { max-width: 100%; overflow-x: auto; } .wide img { max-width: none; }
 .grids figure { margin: 0 0 1.5em 0; } figcaption { color: #555; margin-bottom: .3em; }
</style></head>
<body>
<h1>sweep {{ name }}</h1>
<p class="meta">{{ summary }}<br>objective: {{ objectives }}; written {{ written }}; from {{ location }}</p>

<h2 id="trials-title">Trials</h2>
<p class="note">Click a column to sort. Values are each trial's best evaluation; the winner is highlighted,
exported trials in bold.</p>
<div class="scroll"><table id="trials">
<thead><tr>{% for c in header %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>{% for r in rows %}
<tr class="{{ r.cls }}">{% for v in r.cells %}<td{% if v.text %} class="text"{% endif %}
{%- if v.sort is not none %} data-sort="{{ v.sort }}"{% endif %}>{{ v.shown }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table></div>
<h3 id="bill">Cost</h3>
{% for line in bill %}<p class="bill">{{ line }}</p>{% endfor %}
{% if failed %}<details><summary>{{ failed|length }} failed trial(s) and why</summary>
{% for r in failed %}<p class="note">{{ r }}</p>{% endfor %}</details>{% endif %}

<h2>Objective against training step</h2>
<img alt="objective against step" src="{{ curves }}">

<h2>Parameter importance</h2>
{% for imp in importances %}
<p><b>{{ imp.metric }}</b> ({{ imp.method }}, {{ imp.trials }} complete trials):
{% if imp.values %}{% for k, v in imp.values.items() %}{{ k }} {{ '%.3f' % v }}{% if not loop.last %}, {% endif %}{% endfor %}
{% else %}<span class="note">{{ imp.note }}</span>{% endif %}</p>
{% endfor %}
{% if importance_plot %}<img alt="parameter importance" src="{{ importance_plot }}">{% endif %}

{% if slices %}<h2>Slice and contour of the most important parameters</h2>
{% for s in slices %}<figure><figcaption>{{ s.caption }}</figcaption>
<img alt="{{ s.caption }}" src="{{ s.src }}"></figure>{% endfor %}
{% endif %}

{% if pareto %}<h2>Pareto front</h2><img alt="Pareto front" src="{{ pareto }}">{% endif %}

<h2>The winner beside the base model</h2>
{% if comparison %}<p class="note">Same prompts and seeds in every row.</p>
<div class="wide"><img alt="base model and winner" src="{{ comparison }}"></div>
{% else %}<p class="note">No trial has a scored evaluation yet.</p>{% endif %}

{% if ground_truth %}<h2 id="ground-truth">Original vs fine-tuned on the held-out ground truth</h2>
<p class="note">Each held-out caption sampled once at seed {{ ground_truth.seed }} and scored against its truth
image: LPIPS per pair, FD, KID and CMMD between the two sets' CLIP features, CLIP-T against the caption. The
original is the base model; each fine-tuned row is a trial's best evaluation.</p>
<table id="ground-truth-table">
<thead><tr><th></th><th>model</th>{% for h in ground_truth.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for r in ground_truth.rows %}
<tr class="{{ r.label }}"><td class="text">{{ r.label }}</td><td class="text">{{ r.who }}</td>
{%- for v in r.cells %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>
{% if ground_truth.plot %}<img alt="ground-truth metrics, original and fine-tuned" src="{{ ground_truth.plot }}">{% endif %}
{% if ground_truth.images %}<p class="note">The truth images, the original's and the winner's, same captions and seed.</p>
<div class="wide"><img alt="ground truth, original and fine-tuned images" src="{{ ground_truth.images }}"></div>{% endif %}
{% for n in ground_truth.notes %}<p class="note">{{ n }}</p>{% endfor %}
{% endif %}

<h2>XYZ grids</h2>
<div class="grids">{% for g in grids %}
<figure><figcaption><b>{{ g.title }}</b>{% if g.note %}: {{ g.note }}{% endif %} (<code>{{ g.file }}</code>)</figcaption>
<div class="wide"><img alt="{{ g.title }}" src="{{ g.src }}"></div></figure>{% endfor %}
</div>
{% for n in notes %}<p class="note">{{ n }}</p>{% endfor %}

<h2>Live view</h2>
<p>The Optuna study of this sweep: <code>optuna-dashboard {{ journal }}</code>, then open http://127.0.0.1:8080.</p>

<script>
(function () {
  var table = document.getElementById("trials");
  var heads = table.tHead.rows[0].cells;
  function key(cell) {
    var s = cell.getAttribute("data-sort");
    return s === null ? null : (isNaN(Number(s)) ? s : Number(s));
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("asc");
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a.cells[col]), y = key(b.cells[col]);
        if (x === null || y === null) { return (x === null) - (y === null); }
        var d = x < y ? -1 : (x > y ? 1 : 0);
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
})();
</script>
</body></html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_page(context: dict) -> str:
    return _ENV.from_string(_TEMPLATE).render(**context)
