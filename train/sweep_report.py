"""A sweep's report from its rows (`train.sweep.collect_rows`): results.csv, results.md, plots.

* results.csv: one row per cell and seed (finished, partial, failed or missing), the columns
  of `COLUMNS` then one `mqar_L{length}_kv{pairs}` per evaluated MQAR cell.
* results.md: one line per cell, mean ± std over the seeds that finished.
* recall_vs_attn_share.png, loss_vs_attn_share.png (one line per mixer; the all-attention
  baseline sits at share 1 on every line), recall_vs_cache.png (recall against decode cache
  bytes at 32k tokens, log scale: the recall-memory trade-off).
"""

from __future__ import annotations

import csv
import math
import os

from train.sweep import mean_std

__all__ = ["COLUMNS", "write_report"]

COLUMNS = ("cell", "mixer", "layer_types", "attn_share", "seed", "status", "params",
           "flops_per_token", "train_tokens", "mqar_train_tokens", "eval_loss", "bits_per_byte",
           "recall", "passkey", "train_tokens_per_s", "lm_tokens_per_s", "cache_bytes_2k",
           "cache_bytes_32k", "lr", "reason")


def _mqar_columns(rows) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("mqar_L")}
    def order(k):
        length, kv = k[len("mqar_L"):].split("_kv")
        return int(length), int(kv)
    return sorted(keys, key=order)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _cells(rows):
    """Rows grouped by cell, in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(r["cell"], []).append(r)
    return out


def write_csv(rows, path: str) -> None:
    cols = list(COLUMNS[:-1]) + _mqar_columns(rows) + ["reason"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in cols])


def write_md(rows, path: str, title: str) -> None:
    mq = _mqar_columns(rows)
    metrics = ["recall", *mq, "eval_loss", "bits_per_byte", "passkey"]
    head = ["cell", "layer_types", "attn share", "params", "cache@32k", "lr", "seeds", *(
        m.replace("mqar_", "") for m in metrics)]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for cell, group in _cells(rows).items():
        ok = [r for r in group if r["status"] == "ok"]
        first = group[0]
        vals = []
        for m in metrics:
            mean, std = mean_std([r.get(m) for r in ok])
            vals.append("" if math.isnan(mean) else (f"{mean:.3f} ± {std:.3f}" if len(ok) > 1
                                                      else f"{mean:.3f}"))
        lr = first.get("lr")
        lines.append("| " + " | ".join([
            cell, first["layer_types"], f"{first['attn_share']:.2f}", f"{first['params']:,}",
            f"{first['cache_bytes_32k'] / 2**20:.2f} MiB", "" if lr is None else f"{lr:g}",
            f"{len(ok)}/{len(group)}", *vals]) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed:"] + [f"- {r['cell']} seed {r['seed']}: {r.get('reason', '')}"
                                    for r in failed]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _lines_by_mixer(rows, y: str):
    """{mixer: [(attn_share, mean y)]} with the all-attention cells joined to every line."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(y) is not None]
    by_cell = {}
    for r in ok:
        by_cell.setdefault((r["mixer"], r["attn_share"], r["cell"]), []).append(r[y])
    base = [(1.0, mean_std(v)[0]) for (m, _, _), v in by_cell.items() if m in ("attn", "swa")]
    out = {}
    for (m, share, _), v in by_cell.items():
        if m not in ("attn", "swa"):
            out.setdefault(m, []).append((share, mean_std(v)[0]))
    return {m: sorted(pts + base) for m, pts in out.items()} or ({"attn": base} if base else {})


def write_plots(rows, out_dir: str, title: str) -> list[str]:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    paths = []
    for y, label, name in (("recall", "MQAR recall (mean accuracy, trained lengths)",
                            "recall_vs_attn_share.png"),
                           ("eval_loss", "held-out loss (nats/byte)", "loss_vs_attn_share.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for mixer, pts in _lines_by_mixer(rows, y).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mixer)
        ax.set_xlabel("attention share (attention layers / layers)")
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {y.replace('_', ' ')} vs attention share")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ok = [r for r in rows if r["status"] == "ok" and r.get("recall") is not None]
    for mixer in sorted({r["mixer"] for r in ok}):
        pts = sorted({(r["cache_bytes_32k"], r["recall"]) for r in ok if r["mixer"] == mixer})
        ax.scatter([p[0] / 2**20 for p in pts], [p[1] for p in pts], label=mixer)
    ax.set_xscale("log")
    ax.set_xlabel("decode cache per sequence at 32k tokens (MiB, log)")
    ax.set_ylabel("MQAR recall")
    ax.set_title(f"{title}: recall vs memory")
    ax.grid(alpha=0.3)
    if ok:
        ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "recall_vs_cache.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(rows, out_dir: str, title: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    write_md(rows, os.path.join(out_dir, "results.md"), title)
    return [os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.md"),
            *write_plots(rows, out_dir, title)]
