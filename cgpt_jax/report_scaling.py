"""The scaling study's report (experiments/scaling.py): the law fitted to final validation losses
against training FLOPs (scaling_law.py), its table and plot."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: a sweep's own process does not load scipy
  from cgpt_jax import scaling_law


# ----------------------------------------------------------------------------------------------
# Scaling study (experiments/scaling.py): loss against training FLOPs and the fitted law
# ----------------------------------------------------------------------------------------------
def training_flops(result: dict) -> float:
  """FLOPs of the whole run: 6 N_matmul + 12 L T d per token (analysis.flops_per_token), times its
  tokens (summary.json's model_flops_per_step x steps)."""
  return result["model_flops_per_step"] * result["steps"]


def scaling_report(
  sweep: list[dict],
  results: dict,
  workdir: pathlib.Path,
  sizes: dict[str, dict],
  train_tokens: int,
  seq_len: int,
  plot_title: str,
  notes: Sequence[str] = (),
) -> list[str]:
  """The scaling sweep's report: scaling_law.fit of the final validation losses against training
  FLOPs (with a bootstrap of b, and the pure power law when the floor c ends on its bound), the
  points' table and WORKDIR/scaling.png (titled `plot_title`), then `notes`. `sizes[name]` gives
  each point's n_layers, d_model and peak lr (summary.json does not hold the config);
  `train_tokens` is the training split's length, for the epochs column."""
  from cgpt_jax import scaling_law
  from cgpt_jax.errors import InputError

  done = {p["name"]: results[p["name"]] for p in sweep if "error" not in results[p["name"]]}
  failed = [f"- `{name}` failed: {r['error']}" for name, r in results.items() if "error" in r]
  flops = np.array([training_flops(r) for r in done.values()])
  losses = np.array([r["final_eval_loss"] for r in done.values()])
  table = dict(sizes=sizes, train_tokens=train_tokens, seq_len=seq_len)
  try:
    fit = scaling_law.fit(flops, losses)
  except InputError as e:
    return [*failed, "", f"No fit: {e}", "", *scaling_table(done, None, workdir, **table)]
  exponents = scaling_law.bootstrap_b(flops, losses)
  # With the floor on its bound the three-term fit says nothing about c or the errors; the pure
  # power law (c = 0) is then the model the points support, with meaningful error bars.
  pure = scaling_law.fit_pure(flops, losses) if fit.floor_at_bound else None
  scaling_plot(done, pure or fit, workdir / "scaling.png", plot_title)
  return [
    *failed,
    "",
    *fit_lines(fit, exponents, pure),
    "",
    *scaling_table(done, (pure or fit).law, workdir, **table),
    "",
    "![validation loss against training FLOPs](scaling.png)",
    "",
    *notes,
  ]


def fit_lines(
  fit: scaling_law.Fit, exponents: np.ndarray, pure: scaling_law.Fit | None
) -> list[str]:
  """The fitted law beside the paper's, its errors and bootstrap spread; when the floor c ended on
  its bound, why, and the pure power law `pure` instead."""
  from cgpt_jax import scaling_law

  law, paper = fit.law, scaling_law.PAPER
  low, high = np.percentile(exponents, [16, 84])
  return [
    "## Fitted law",
    "",
    f"L(f) = {law}, f = training FLOPs, L = validation loss (nats per character).",
    "",
    "| | a | b | c |",
    "|---|---:|---:|---:|",
    f"| this sweep ({fit.n_points} sizes) | {law.a:.4g} (ln a ± {fit.sigma_log_a:.2g}) "
    f"| **{law.b:.4f} ± {fit.sigma_b:.4f}** | {law.c:.4f} ± {fit.sigma_c:.4f} |",
    f"| Cerebras-GPT paper (111M-13B, Pile, GPT-2 BPE) | {paper.a:.4g} | {paper.b:.4f} "
    f"| {paper.c:.4f} |",
    "",
    f"± is 1 sigma from the least-squares covariance. Bootstrap over the points "
    f"({len(exponents)} fittable resamples): b 16th-84th percentile {low:.4f}-{high:.4f}, median "
    f"{np.median(exponents):.4f}. RMS residual {fit.rms_residual:.4f} nats.",
    *(
      []
      if not fit.floor_at_bound
      else [
        "",
        f"**The floor c ended on its bound ({law.c:.3g}).** The losses do not flatten "
        "towards a floor over this range, so c is not determined, the ± above are not "
        "meaningful, and the bootstrap, whose resamples mostly pin c too, understates the "
        "spread: b here is the exponent of a pure power law, not the paper's three-term fit.",
        "",
        "Fitted as what it is, a pure power law L(f) = (f / a)^(-b) (c = 0; a straight line "
        "in log-log, ordinary least squares, 1 sigma over n - 2 degrees of freedom):",
        "",
        f"**L(f) = (f / {pure.law.a:.4g})^(-{pure.law.b:.4f}), b = {pure.law.b:.4f} ± "
        f"{pure.sigma_b:.4f}** (ln a ± {pure.sigma_log_a:.2g}), RMS residual "
        f"{pure.rms_residual:.4f} nats. The table's `fit` column and the plot use this law.",
      ]
    ),
  ]


def process_seconds(workdir: pathlib.Path, name: str) -> float:
  """Wall time of a point's (last) launch.py process: the runner writes point.json just before
  starting it, and summary.json is the run's last write."""
  folder = workdir / "points" / name
  return (folder / "summary.json").stat().st_mtime - (folder / "point.json").stat().st_mtime


def scaling_table(
  done: dict,
  law: scaling_law.PowerLaw | None,
  workdir: pathlib.Path,
  sizes: dict[str, dict],
  train_tokens: int,
  seq_len: int,
) -> list[str]:
  """One row per finished size: shape, parameters, tokens (per parameter, in epochs of
  `train_tokens`), batch, steps, peak LR, training FLOPs, validation loss beside `law`'s, speed
  and wall times; then the sweep's total wall time."""
  lines = [
    "| size | layers | d_model | params | tokens | tokens/param | epochs | batch | steps "
    "| peak LR | training FLOPs | val loss | fit | tokens/s | train s | process s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in done.items():
    size = sizes[name]
    f = training_flops(r)
    predicted = f"{float(law(f)):.4f}" if law else "-"
    lines.append(
      f"| {name} | {size['n_layers']} | {size['d_model']} | {r['params']:,} | {r['tokens']:,} "
      f"| {r['tokens'] / r['params']:.2f} | {r['tokens'] / train_tokens:.2f} "
      f"| {r['tokens'] // r['steps'] // seq_len} | {r['steps']} | {size['lr']:.2g} | {f:.3g} "
      f"| {r['final_eval_loss']:.4f} | {predicted} | {r['tokens_per_s']:,.0f} "
      f"| {r['train_wall_s']:.0f} | {process_seconds(workdir, name):.0f} |"
    )
  train_s = sum(r["train_wall_s"] for r in done.values())
  process_s = sum(process_seconds(workdir, name) for name in done)
  return [
    *lines,
    "",
    f"Wall time of the sweep's processes: {process_s:.0f} s, of which training "
    f"(with the final evaluation) {train_s:.0f} s; the rest is start-up, data loading, the "
    "matmul-peak probe and compilation.",
  ]


def scaling_plot(done: dict, fit: scaling_law.Fit, path: pathlib.Path, title: str) -> None:
  """Each size's training loss against FLOPs so far, its final validation loss, the fitted law."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for name, r in done.items():
    per_step = r["model_flops_per_step"]
    curve = np.array([(m["step"] * per_step, m["loss"]) for m in r["metrics"] if "loss" in m])
    (line,) = ax.plot(curve[:, 0], curve[:, 1], lw=0.8, alpha=0.6)
    ax.plot(training_flops(r), r["final_eval_loss"], "o", color=line.get_color(), label=name)
  f = np.geomspace(
    min(training_flops(r) for r in done.values()) / 3,
    max(training_flops(r) for r in done.values()) * 3,
    200,
  )
  ax.plot(
    f, fit.law(f), "k--", label=f"fit: (f/{fit.law.a:.3g})^-{fit.law.b:.4f} + {fit.law.c:.3f}"
  )
  ax.set(
    xscale="log",
    xlabel="training FLOPs",
    ylabel="loss (nats per character)",
    title=title,
  )
  lowest = min(r["final_eval_loss"] for r in done.values())
  ax.set_ylim(max(fit.law.c, lowest - 0.4), 3.6)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
