"""The LoRA-vs-adapters study's table (Markdown + JSON) and figures, from ``study.py``'s results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lora_jax.advanced import atomic_write

BASE = "base model (no fine-tuning)"
FULL = "full fine-tuning"


def _tp(m, tp) -> str:
    if m.kind == "lora":
        return f"{tp['lora_merged']['total']} / {tp['lora_unmerged']['total']}"
    if m.kind == "adapter":
        return f"{tp['adapters_replicated']['total']} / {tp['adapters_sharded']['total']}"
    return str(tp["base"]["total"]) if m.kind == "full" else "not measured"


def _decode(m, per_config) -> str:
    """Ratio to the base of a per-decode-program number (time or FLOPs); LoRA: merged / unmerged."""
    ratio = lambda k: per_config[k] / per_config["base"]  # noqa: E731
    if m.kind == "lora":
        return f"{ratio(m.name + ' merged'):.2f} / {ratio(m.name + ' unmerged'):.2f}"
    return "1.00 (base program)" if m.kind == "full" else f"{ratio(m.name):.2f}"


def row(r, ref, evals, step_ms, decode, tp, full_gflop) -> dict:
    m = r["method"]
    n = m.text_len
    return dict(
        method=m.name,
        kind=m.kind,
        info=m.info,
        trainable=r["trainable"],
        adam_bytes=r["opt_bytes"],
        step_x_full=step_ms[m.name] / step_ms[FULL],
        step_ms=step_ms[m.name],
        step_flops_x_full=r["step_gflop"] / full_gflop,
        step_mib=r["step_mib"],
        lr=r["lr"],
        by_lr=r["by_lr"],
        lr_spread=max(r["by_lr"].values()) - min(r["by_lr"].values()),
        loss0=r["loss0"],
        base_loss0=ref(evals["target"], n),
        target=r["target"],
        target_delta=r["target"] - ref(evals["target"], n),
        base_domain=r["base_loss"],
        base_domain_delta=r["base_loss"] - ref(evals["base"], n),
        decode=_decode(m, decode[0]),
        decode_flops=_decode(m, decode[1]),
        tp=_tp(m, tp),
        context=n,
    )


def build(results, ref, evals, step_ms, decode, tp, same_program, meta) -> dict:
    """``decode``: (ms, GFLOP) per decode program."""
    full_gflop = next(r["step_gflop"] for r in results if r["method"].name == FULL)
    rows = [
        row(r, ref, evals, step_ms, decode, tp, full_gflop) for r in results if r["method"].in_table
    ]
    sweep = [
        dict(
            r=r["method"].info["r"],
            by_lr=r["by_lr"],
            target=r["target"],
            init=r["method"].info["init"],
            rslora=r["method"].info["rslora"],
        )
        for r in results
        if r["method"].kind == "lora"
    ]
    base = dict(
        method=BASE,
        target=ref(evals["target"], meta["seq"]),
        base_domain=ref(evals["base"], meta["seq"]),
        tp=str(tp["base"]["total"]),
    )
    return dict(
        meta=meta,
        base=base,
        rows=rows,
        r_sweep=sweep,
        tp_counts=tp,
        decode_ms=decode[0],
        decode_gflop=decode[1],
        step_ms=step_ms,
        merged_decode_program_is_base=same_program,
    )


def _mb(b) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def markdown(report) -> str:
    b, meta = report["base"], report["meta"]
    lines = [
        "| method | trainable params | Adam state | train step x full: time (FLOPs) | XLA step memory "
        "| LR (target spread over LRs) | target loss (vs base) | base-domain loss (vs base) "
        "| decode time x base | decode FLOPs x base | TP collectives | context for text |",
        "|" + "---|" * 12,
        f"| {BASE} | 0 | 0 | | | | {b['target']:.3f} | {b['base_domain']:.3f} | 1.00 | 1.00 "
        f"| {b['tp']} "
        f"| {meta['seq']} |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {_mb(r['adam_bytes'])} | {r['step_x_full']:.2f} ({r['step_flops_x_full']:.2f}) "
            f"| {r['step_mib']:.1f} MiB | {r['lr']:g} ({r['lr_spread']:.3f}) "
            f"| {r['target']:.3f} ({r['target_delta']:+.3f}) "
            f"| {r['base_domain']:.3f} ({r['base_domain_delta']:+.3f}) | {r['decode']} | {r['decode_flops']} "
            f"| {r['tp']} "
            f"| {r['context']} |"
        )
    return "\n".join(lines)


def write(report, results, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("table.md", markdown(report) + "\n"),
        ("results.json", json.dumps(report, indent=1, default=str)),
    ):
        atomic_write(out / name, lambda tmp, text=text: tmp.write_text(text))
    plot_curves(results, out / "curves.png")
    plot_rank(report["r_sweep"], out / "rank.png")


def _smooth(x, beta=0.9):
    out, avg = np.empty(len(x)), 0.0
    for i, v in enumerate(x):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    styles = {"full": "-", "adapter": "--", "prefix": ":", "lora": "-."}
    for r in (r for r in results if r["method"].in_table):
        m = r["method"]
        ax.plot(_smooth(r["losses"]), styles[m.kind], lw=1.2, label=f"{m.name} (lr {r['lr']:g})")
    ax.set(
        xlabel="step",
        ylabel="training loss, smoothed (nats / byte)",
        title="Target-domain training loss, same steps x batch, tuned LR",
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def plot_rank(sweep, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    plain = sorted(
        (s for s in sweep if s["init"] == "gaussian" and not s["rslora"]), key=lambda s: s["r"]
    )
    rs = [s["r"] for s in plain]
    for lr in sorted(plain[0]["by_lr"]):
        ax.plot(rs, [s["by_lr"][lr] for s in plain], "o--", lw=0.8, ms=3, label=f"lr {lr:g}")
    ax.plot(rs, [s["target"] for s in plain], "ko-", lw=1.6, label="best lr per r")
    for s in sweep:
        if s["init"] == "swapped" or s["rslora"]:
            ax.plot(
                [s["r"]],
                [s["target"]],
                "s" if s["rslora"] else "^",
                ms=7,
                label="rsLoRA (alpha/sqrt r)" if s["rslora"] else "swapped init (A=0)",
            )
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="rank r (alpha = 64, scale alpha/r)",
        ylabel="held-out target loss",
        title="LoRA: held-out loss against r at alpha 64",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
