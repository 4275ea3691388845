"""muP coordinate check: does each layer's activation size stay put as the model widens?

  python benchmarks/coord_check.py --workdir runs/coord_check --results docs/results/coord_check.md

Trains 2-layer character-level models on tiny Shakespeare at widths 128 ... 2048 (d_head 64) for a
few AdamW steps at muP's base hyperparameters (LR 6e-3 constant, init std 0.08, embedding x 10),
once under muP and once under standard parameterisation (the same model with none of muP's width
rules), and records the RMS of every layer's output after each step (mup.activation_rms). Under muP
the curves are flat in width; under standard parameterisation the updates grow with width (Adam
moves every weight by ~LR whatever the width, so W x grows like the width) and so do the
activations. Writes WORKDIR/coord_check.png (RMS vs width per layer, one panel per
parameterisation and step), WORKDIR/report.md (the table at the last step, and each layer's log-log
slope in width) and WORKDIR/report.json (every RMS at every step); with --results, the report to
that file too (the docs' docs/results/coord_check.md), the plot beside it. About 4 minutes on 2
cores. Rerunning into the same --workdir overwrites what it wrote there.
"""

import pathlib

import common
from absl import app, flags

flags.DEFINE_string("workdir", "runs/coord_check", "where the plot and the report go")
flags.DEFINE_string(
  "results", None, "also write the report to this Markdown file (docs/results/coord_check.md)"
)
flags.DEFINE_list("widths", ["128", "256", "512", "1024", "2048"], "d_model values")
flags.DEFINE_integer("steps", 4, "optimizer steps")
flags.DEFINE_integer("layers", 2, "blocks")
flags.DEFINE_integer("batch", 8, "sequences per step")
flags.DEFINE_integer("seq_len", 64, "tokens per sequence")
flags.DEFINE_string("data", "../shared/data/tinyshakespeare/input.txt", "training text")
FLAGS = flags.FLAGS
# The flags that change what is measured, in the order the regenerating command names them.
SETTINGS = ("widths", "steps", "layers", "batch", "seq_len", "data")
D_HEAD = 64


def coordinates(
  width: int,
  mup: bool,
  steps: int,
  layers: int,
  batch: int,
  seq_len: int,
  source: str,
  data_dir: str,
) -> list[dict]:
  """Activation RMS per layer on one fixed batch, at init and after each of `steps` steps."""
  import jax
  import numpy as np
  from flax import nnx

  from cgpt_jax import config as config_lib
  from cgpt_jax import data
  from cgpt_jax import mup as mup_lib
  from cgpt_jax.train import setup, step_functions

  c = config_lib.base_config()
  c.lock()  # a misspelt or renamed key is an error, not a new key that nothing reads
  c.model.update(
    n_layers=layers,
    d_model=width,
    n_heads=width // D_HEAD,
    n_positions=seq_len,
    mup=mup,
    init_std=mup_lib.BASE_INIT_STD,
    embed_multiplier=mup_lib.EMBED_MULTIPLIER,
  )
  c.data.update(
    source=source, data_dir=data_dir, tokenizer="char", seq_len=seq_len, global_batch=batch
  )
  c.optim.update(lr=mup_lib.BASE_LR, decay="constant", warmup_steps=0, weight_decay=0.0)
  c.train.steps = steps + 1
  corpus = data.load_corpus(source, data_dir, "char", "")
  s = setup.build(c, corpus.tokenizer.vocab_size)
  state, step = setup.make_init(s)(), step_functions.make_train_step(s)
  batch_rows = np.asarray(
    next(
      iter(data.train_batches(corpus.tokens["train"], seq_len=seq_len, global_batch=batch, seed=0))
    )
  )

  @jax.jit
  def measure(params):
    return mup_lib.activation_rms(nnx.merge(s.graphdef, params), batch_rows[:, :-1])

  rows = []
  for t in range(steps + 1):
    rows.append({"step": t, **{k: float(v) for k, v in measure(state.params).items()}})
    if t < steps:
      state, _ = step(state, batch_rows)
  return rows


def slope(widths, values):
  """Least-squares slope of log(value) against log(width): 0 is flat, 1 grows like the width."""
  import numpy as np

  return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def plot(results: dict, widths: list[int], layers: list[str], steps: int, path: pathlib.Path):
  """RMS against width per layer: a row per parameterisation, a column per step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
    2, steps + 1, figsize=(3.2 * (steps + 1), 6.4), sharex=True, sharey="row"
  )
  for row, name in enumerate(("standard", "muP")):
    for t in range(steps + 1):
      ax = axes[row][t]
      for layer in layers:
        ax.plot(widths, [results[name, w][t][layer] for w in widths], marker="o", label=layer)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(f"{name}, step {t}")
      ax.set_xlabel("width (d_model)")
  axes[0][0].set_ylabel("activation RMS")
  axes[1][0].set_ylabel("activation RMS")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report_lines(results: dict, widths: list[int], layers: list[str]) -> list[str]:
  """The RMS at the last step per parameterisation and width, then each layer's slope in width."""
  from cgpt_jax import mup as mup_lib

  last = FLAGS.steps
  lines = [
    f"Activation RMS after {last} AdamW steps (LR {mup_lib.BASE_LR}), "
    f"{FLAGS.layers} layers, batch {FLAGS.batch}x{FLAGS.seq_len}.",
    "",
    "| parameterisation | width | " + " | ".join(layers) + " |",
    "|---|---:|" + "---:|" * len(layers),
  ]
  for name in ("standard", "muP"):
    for w in widths:
      lines.append(
        f"| {name} | {w} | " + " | ".join(f"{results[name, w][last][l]:.3g}" for l in layers) + " |"
      )
  lines += [
    "",
    "Slope of log RMS in log width (0 = flat in width):",
    "",
    "| parameterisation | " + " | ".join(layers) + " |",
    "|---|" + "---:|" * len(layers),
  ]
  for name in ("standard", "muP"):
    lines.append(
      f"| {name} | "
      + " | ".join(
        f"{slope(widths, [results[name, w][last][l] for w in widths]):+.2f}" for l in layers
      )
      + " |"
    )
  return [*lines, "", "![coordinate check](coord_check.png)"]


def regenerate_command() -> list[str]:
  """This run's command line: the flags that set what it measures, as given."""
  settings = [
    f"--{name}={FLAGS[name].serialize().split('=', 1)[1]}"
    for name in SETTINGS
    if FLAGS[name].present
  ]
  return [
    "python",
    "benchmarks/coord_check.py",
    f"--workdir={FLAGS.workdir}",
    *settings,
    f"--results={FLAGS.results}",
  ]


def main(_):
  from cgpt_jax import config as config_lib
  from cgpt_jax import report as report_lib
  from cgpt_jax.train import setup

  out = pathlib.Path(FLAGS.workdir)
  out.mkdir(parents=True, exist_ok=True)
  if FLAGS.results and not (
    FLAGS.results.endswith(".md") and pathlib.Path(FLAGS.results).parent.is_dir()
  ):
    raise app.UsageError(f"--results {FLAGS.results}: give a Markdown file in an existing folder.")
  widths = [int(w) for w in FLAGS.widths]
  data_dir = setup.data_dir(config_lib.base_config())
  results = {}
  for name, mup in (("standard", False), ("muP", True)):
    for w in widths:
      print(f"{name} width {w} ...", flush=True)
      results[name, w] = coordinates(
        w, mup, FLAGS.steps, FLAGS.layers, FLAGS.batch, FLAGS.seq_len, FLAGS.data, data_dir
      )
  layers = ["embedding", *(f"block {i + 1}" for i in range(FLAGS.layers)), "logits"]
  plot(results, widths, layers, FLAGS.steps, out / "coord_check.png")
  lines = report_lines(results, widths, layers)
  rms = {f"{name} {w}": rows for (name, w), rows in results.items()}
  common.write_report(out, lines, {"widths": widths, "layers": layers, "rms": rms})
  if FLAGS.results:
    report_lib.write_results(FLAGS.results, regenerate_command(), lines, out)
    print(f"results -> {FLAGS.results}")


if __name__ == "__main__":
  app.run(main)
