"""``run_search.py inspect <run_dir | subnet.yaml>``: what a search chose, as tables and pictures.

Prints a per-layer table of the chosen subnet (choices A-E and adapter params), totals per layer kind, and
how often each choice was taken per tensor. Writes ``subnet_heatmap.png`` and, when ``history.jsonl`` lies
beside the subnet, ``search_progress.png`` (matplotlib optional: ``pip install -e .[plot]``).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from glora.core.errors import UserError
from supernet.params import layer_params
from supernet.space import TENSORS, Subnet

PLOT_HINT = "pictures need matplotlib: pip install -e .[plot]"


def _find_subnet(target: Path) -> Path:
    if target.is_dir():
        for cand in (target / "search" / "subnet.yaml", target / "subnet.yaml"):
            if cand.is_file():
                return cand
        raise UserError(f"no subnet.yaml in {target} (looked for search/subnet.yaml and subnet.yaml); "
                        "run the search first or give the path of a subnet.yaml")
    if target.is_file():
        return target
    raise UserError(f"inspect: path not found: {target} (give a run folder or a subnet.yaml)")


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1] if "." in name else name


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def fmt(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    line = "-" * len(fmt(header))
    return "\n".join([fmt(header), line] + [fmt(r) for r in rows])


def _fmt_acc(v) -> str:
    return "-" if v is None else f"{float(v):.4g}"


def _choice_order(choices) -> list[str]:
    def key(c):
        if c.startswith("lora_"):
            return (0, -int(c[5:]))
        return ({"vector": 1, "scalar": 2, "none": 3}.get(c, 4), 0)
    return sorted(set(choices), key=key)


def inspect_main(target: str, out_dir: str | None = None) -> int:
    path = _find_subnet(Path(target))
    subnet = Subnet.from_yaml(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = {str(e["name"]): e for e in data["layers"]}
    shapes = {}
    try:
        for n in subnet.names:
            e = entries[n]
            if "in_features" in e and "out_features" in e:
                shapes[n] = (int(e["in_features"]), int(e["out_features"]))
        if data.get("params") is not None:
            int(data["params"])
        if data.get("val_acc") is not None:
            float(data["val_acc"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: damaged ({e}); in_features, out_features and params must be integers, val_acc "
                        "a number") from None
    per_layer = {n: (layer_params(lc, *shapes[n]) if n in shapes else None)
                 for n, lc in zip(subnet.names, subnet.layers)}

    print(f"subnet: {path}")
    print(f"model: {data.get('model') or '-'}   val top-1: {_fmt_acc(data.get('val_acc'))}   "
          f"layers: {len(subnet)}")
    rows = [[n, *lc, "?" if per_layer[n] is None else f"{per_layer[n]:,}"]
            for n, lc in zip(subnet.names, subnet.layers)]
    print(_table(["layer", *TENSORS, "params"], rows, right={6}))

    known = [p for p in per_layer.values() if p is not None]
    total = sum(known)
    print()
    print(f"adapter params: {total:,} ({total / 1e6:.4f}M)"
          + ("" if len(known) == len(per_layer) else " (layers without shapes not counted)")
          + (f"; subnet.yaml says {int(data['params']):,}" if data.get("params") not in (None, total) else ""))
    by_kind: dict[str, list[int]] = defaultdict(list)
    for n in subnet.names:
        if per_layer[n] is not None:
            by_kind[_kind(n)].append(per_layer[n])
    if 1 < len(by_kind) < len(subnet):
        print(_table(["kind", "layers", "params", "share"],
                     [[k, str(len(v)), f"{sum(v):,}", f"{100 * sum(v) / total:.1f}%" if total else "-"]
                      for k, v in by_kind.items()], right={1, 2, 3}))

    counts = {t: Counter(getattr(lc, t) for lc in subnet.layers) for t in TENSORS}
    order = _choice_order(c for cnt in counts.values() for c in cnt)
    print()
    print("choices taken per tensor (layers):")
    print(_table(["choice", *TENSORS], [[c, *(str(counts[t].get(c, 0)) for t in TENSORS)] for c in order],
                 right=set(range(1, 6))))

    out = Path(out_dir) if out_dir else path.parent
    history_path = path.parent / "history.jsonl"
    history = _read_history(history_path) if history_path.is_file() else []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: F401
    except ImportError:
        print()
        print(PLOT_HINT)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    written = [_heatmap(subnet, order, out / "subnet_heatmap.png", data)]
    if history:
        written.append(_progress(history, out / "search_progress.png", data, path.parent))
    print()
    for w in written:
        print(f"wrote {w}")
    return 0


def _read_history(path: Path) -> list[dict]:
    from search.evolution import read_history
    history = read_history(path)
    for i, h in enumerate(history):
        try:
            int(h["generation"]), int(h["params"]), float(h["val_acc"])
        except (TypeError, ValueError):
            raise UserError(f"{path}: record {i + 1} has a generation, params or val_acc that is not a number; "
                            "repair or delete that line") from None
    return history


_COLORS = {"vector": "#4c9be8", "scalar": "#9ad17f", "none": "#eeeeee"}
_LORA_COLORS = ["#b2182b", "#e0793b", "#f4b36b", "#8e44ad", "#c06c84"]


def _colors(order: list[str]) -> dict[str, str]:
    loras = [c for c in order if c.startswith("lora_")]
    out = {c: _LORA_COLORS[i % len(_LORA_COLORS)] for i, c in enumerate(loras)}
    out.update({c: _COLORS.get(c, "#999999") for c in order if not c.startswith("lora_")})
    return out


def _heatmap(subnet: Subnet, order: list[str], dest: Path, data: dict) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = _colors(order)
    code = {c: i for i, c in enumerate(order)}
    grid = [[code[c] for c in lc] for lc in subnet.layers]
    n = len(subnet)
    fig, ax = plt.subplots(figsize=(5.5, max(2.5, 0.22 * n + 1.2)))
    ax.imshow(grid, cmap=ListedColormap([colors[c] for c in order]), vmin=-0.5, vmax=len(order) - 0.5,
              aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(TENSORS)), TENSORS)
    ax.set_yticks(range(n), subnet.names, fontsize=7 if n > 24 else 9)
    ax.set_xticks([x - 0.5 for x in range(1, len(TENSORS))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, n)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.xaxis.tick_top()
    title = f"{data.get('model') or 'subnet'}: {int(data.get('params') or 0):,} adapter params"
    if data.get("val_acc") is not None:
        title += f", val top-1 {_fmt_acc(data['val_acc'])}"
    ax.set_title(title, fontsize=9, pad=18)
    ax.legend(handles=[Patch(facecolor=colors[c], edgecolor="#777777", label=c) for c in order],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest


def _progress(history: list[dict], dest: Path, data: dict, search_dir: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    gens = sorted({int(h["generation"]) for h in history})
    by_gen = defaultdict(list)
    for h in history:
        by_gen[int(h["generation"])].append(float(h["val_acc"]))
    mean = [sum(by_gen[g]) / len(by_gen[g]) for g in gens]
    gen_best = [max(by_gen[g]) for g in gens]
    best, run = [], -math.inf
    for g in gens:
        run = max(run, max(by_gen[g]))
        best.append(run)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(gens, best, "-o", ms=3, label="best so far")
    ax1.plot(gens, gen_best, "--", lw=1, label="best of generation")
    ax1.plot(gens, mean, "-s", ms=3, label="mean of generation")
    ax1.set_xlabel("generation")
    ax1.set_ylabel("val top-1")
    ax1.set_title("search progress")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)

    top = max(int(h["params"]) for h in history)
    scale, unit = (1e6, "M") if top >= 1e5 else (1e3, "k") if top >= 1e3 else (1, "")
    params = [int(h["params"]) / scale for h in history]
    accs = [float(h["val_acc"]) for h in history]
    sc = ax2.scatter(params, accs, c=[int(h["generation"]) for h in history], cmap="viridis", s=12, alpha=0.8)
    bar = fig.colorbar(sc, ax=ax2, label="generation")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    if data.get("params") is not None and data.get("val_acc") is not None:
        ax2.scatter([int(data["params"]) / scale], [float(data["val_acc"])], marker="*", s=160, c="red",
                    edgecolors="black", label="chosen", zorder=3)
        ax2.legend(fontsize=8, loc="lower right")
    budget = _budget(search_dir)
    for b in budget:
        ax2.axvline(b / scale, color="grey", ls=":", lw=1)
    ax2.set_xlabel(f"adapter params ({unit})" if unit else "adapter params")
    ax2.set_ylabel("val top-1")
    ax2.set_title(f"all {len(history)} candidates")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest


def _budget(search_dir: Path) -> list[int]:
    """The budget bounds from ``topk.yaml`` when present (a bound of 0 is not drawn)."""
    p = search_dir / "topk.yaml"
    if not p.is_file():
        return []
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        return [int(d[k]) for k in ("min_params", "max_params") if d.get(k)]
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
        return []  # only decoration of the picture


__all__ = ["inspect_main"]
