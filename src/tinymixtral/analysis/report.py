"""What `tinymixtral routes` shows: a terminal table, two PNG pictures and an HTML page of coloured tokens.

Inputs are the dict of analysis.stats.summarize (token texts already decoded by the caller).
matplotlib is imported lazily and drawn with the Agg backend.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from ..plots import plot_expert_load, pyplot, save_png

# tab20-like colours, readable behind black text; experts beyond 20 reuse them (the title still says which).
PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#d9d9d9",
           "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#b2df8a", "#fb9a99", "#fdbf6f", "#cab2d6", "#ffff99",
           "#1f78b4", "#33a02c"]


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- pictures -----------------------------------------------------------------------------------------
def plot_load_heatmap(stats: dict, out: Path) -> Path:
    """Layer x expert share of assignments (balanced = 1/E)."""
    return plot_expert_load([lay["load"] for lay in stats["layers"]], out, title="routed load")


def plot_repeat_rates(stats: dict, out: Path) -> Path:
    """Per layer, consecutive tokens with the same first choice (and overlapping top-k sets) vs chance."""
    plt = pyplot()
    layers = [lay["layer"] for lay in stats["layers"]]
    k = stats["top_k"]
    series = [("repeat_top1", "chance_top1", "same first choice", "tab:blue")]
    if k > 1:
        series.append(("overlap_topk", "chance_overlap_topk", f"top-{k} sets overlap", "tab:orange"))
    width = 0.8 / (2 * len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 1 + 0.7 * len(layers) * len(series)), 4))
    for j, (obs, chance, label, colour) in enumerate(series):
        x0 = [x + (2 * j - len(series) + 0.5) * width for x in layers]
        ax.bar(x0, [lay[obs] or 0 for lay in stats["layers"]], width, color=colour, label=label)
        ax.bar([x + width for x in x0], [lay[chance] for lay in stats["layers"]], width, color=colour,
               alpha=0.35, hatch="//", label=f"{label}: chance")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of consecutive token pairs")
    ax.set_ylim(0, 1.05)
    ax.set_title("consecutive tokens routed alike vs chance (independent tokens, same loads)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_png(fig, plt, out)


# ---- HTML page --------------------------------------------------------------------------------------
def tokens_html(pieces: list[str], first: list[int], chosen: list[list[int]], weights: list[list[float]],
                n_experts: int, layer: int, title: str = "") -> str:
    """A page with one <span class="tok eN"> per token, coloured by its first-choice expert at `layer`."""
    css = "\n".join(f".e{e} {{ background: {PALETTE[e % len(PALETTE)]}; }}" for e in range(n_experts))
    legend = " ".join(f'<span class="key e{e}">expert {e}</span>' for e in range(n_experts))
    spans = []
    for i, (piece, e) in enumerate(zip(pieces, first)):
        tip = f"#{i}: experts " + ", ".join(f"{x} ({w:.2f})" for x, w in zip(chosen[i], weights[i]))
        spans.append(f'<span class="tok e{e}" title="{html.escape(tip)}">{html.escape(piece)}</span>')
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>routes, layer {layer}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.7; }}
.tok {{ border-radius: 2px; }}
.key {{ padding: 0.1em 0.5em; margin-right: 0.3em; border-radius: 3px; }}
{css}
</style></head><body>
<h3>First-choice expert of each token at layer {layer}</h3>
<p>{html.escape(title)}</p>
<p>{legend}</p>
<p>Hover over a token for its top-k experts and their weights.</p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""


# ---- terminal table ---------------------------------------------------------------------------------
def table(stats: dict, layer: int, piece_of=str) -> str:
    """The statistics as plain text; `piece_of(id)` turns a token id into text for the top-tokens list."""
    E, K = stats["n_experts"], stats["top_k"]
    lines = [f"{stats['n_tokens']:,} tokens in {stats['n_sequences']} sequence(s); {E} experts, top-{K}; "
             f"router entropy max ln {E} = {stats['max_entropy']:.3f}",
             "repeat = consecutive tokens with the same first choice; overlap = their top-k sets share an "
             "expert; chance = independent tokens with the same loads",
             f"{'layer':>5} {'entropy':>8} {'max/min':>8} {'cv':>6} {'repeat':>7} {'chance':>7} {'ratio':>6}"
             + (f" {'overlap':>8} {'chance':>7} {'ratio':>6}" if K > 1 else "")]
    for lay in stats["layers"]:
        mm = "inf" if lay["max_min"] is None else f"{lay['max_min']:.2f}"
        row = (f"{lay['layer']:>5} {lay['entropy']:>8.3f} {mm:>8} {lay['cv']:>6.3f} "
               f"{_num(lay['repeat_top1'])} {lay['chance_top1']:>7.3f} "
               f"{_ratio(lay['repeat_top1'], lay['chance_top1'])}")
        if K > 1:
            row += (f" {_num(lay['overlap_topk'], 8)} {lay['chance_overlap_topk']:>7.3f} "
                    f"{_ratio(lay['overlap_topk'], lay['chance_overlap_topk'])}")
        lines.append(row)
    lines += ["", f"load: share of all assignments, and of tokens whose 1st / 2nd choice is each expert "
              f"(balanced = {1 / E:.3f})", f"{'layer':>5} {'':>5} " + " ".join(f"{'e' + str(e):>6}" for e in range(E))]
    for lay in stats["layers"]:
        for name, key in (("all", "load"), ("1st", "first_choice"), ("2nd", "second_choice")):
            if lay[key] is not None:
                lines.append(f"{lay['layer'] if name == 'all' else '':>5} {name:>5} "
                             + " ".join(f"{x:>6.3f}" for x in lay[key]))
    lay = stats["layers"][layer]
    if E <= 16:
        lines += ["", f"co-selection at layer {layer} (tokens with both experts in their top-{K})",
                  "      " + " ".join(f"{'e' + str(e):>7}" for e in range(E))]
        lines += [f"{'e' + str(i):>5} " + " ".join(f"{c:>7}" for c in row) for i, row in enumerate(lay["co_selection"])]
    lines += ["", f"most frequent tokens per expert at layer {layer} (first choice; % = share of the token's "
              "occurrences sent there)"]
    for e, toks in enumerate(lay["top_tokens"]):
        items = "  ".join(f"{piece_of(t['id'])!r} {t['count']} ({100 * t['frac']:.0f}%)" for t in toks[:8])
        lines.append(f"  e{e}: {items or '(no tokens)'}")
    return "\n".join(lines) + "\n"


def _num(x, width: int = 7) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}"


def _ratio(obs, chance) -> str:
    return f"{'-':>6}" if obs is None or not chance else f"{obs / chance:>5.2f}x"
