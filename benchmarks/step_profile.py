"""Where one train step's time goes: every compiled op of the step timed by jax.profiler, grouped by
what it is (matmul, elementwise, copy, collective) and by the part of the model that issued it (the
named scopes in model.py and train/step_functions.py), beside the step's wall time and the matmul
peak measured in this process.

  python benchmarks/step_profile.py --config experiments/cerebras_gpt.py:111m \
      --workdir runs/profile \
      --config.model.n_layers=2 --config.data.global_batch=8 --config.data.seq_len=256

Writes WORKDIR/report.md, WORKDIR/report.json (every op's time), WORKDIR/step.hlo (the compiled
program the op names refer to) and WORKDIR/trace (open it in Perfetto or TensorBoard).

How the time is attributed. XLA:CPU runs a step as thunks, several at once when they are
independent; the profiler records each thunk's span under its HLO instruction name. An instant
shared by k running thunks counts 1/k to each, so the rows sum to the traced span. A matmul XLA
hands to Eigen (a plain `dot`, not a YNNPACK fusion) returns before it finishes: its event marks
the launch, and the gap after it, when no thunk is recorded, is its compute. Gaps are therefore
given to the op that ran last before them.
"""

import pathlib

from cgpt_jax import malloc

if __name__ == "__main__":  # the allocator setting launch.py runs a step under
  malloc.reexec_with_tuned_malloc()

# Everything else after the re-exec above, so that the first process does not import jax for
# nothing.
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cgpt_jax import data  # noqa: E402
from cgpt_jax.costs import analysis  # noqa: E402
from cgpt_jax.train import aot_plan, setup, step_functions  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, as path.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", "runs/profile", "Where the report and the trace go.")
_STEPS = flags.DEFINE_integer(
  "steps", 5, "Steps timed without the profiler (the step's wall time)."
)
_TRACED = flags.DEFINE_integer("traced_steps", 2, "Steps recorded by the profiler.")
flags.mark_flags_as_required(["config"])

# Named scopes, most specific first: an op is filed under the first one its op_name holds.
SCOPES = ("optimizer", "loss", "head", "attention", "mlp", "embed")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (.*)$", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", re.M | re.S)
_COLLECTIVE = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def op_table(hlo: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (kind, part, output shape, whether it is a matmul Eigen runs
  asynchronously: a plain dot) for every instruction of the compiled module."""
  bodies = dict(_COMPUTATION.findall(hlo))
  table = {}
  for name, shape, rest in _INSTRUCTION.findall(hlo):
    callee = re.search(r"\bcalls=%?([\w.\-]+)", rest)
    body = bodies.get(callee.group(1), "") if callee else ""
    opcode = rest.split("(", 1)[0]
    if opcode in ("dot", "convolution") or re.search(r" (dot|convolution)\(", body):
      kind = "matmul"
    elif any(opcode.startswith(c) for c in _COLLECTIVE):
      kind = "collective"
    elif opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
      kind = "copy/transpose"
    elif opcode == "while":
      kind = "loop control"
    else:
      kind = "elementwise/reduce"
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = op_name.group(1) if op_name else ""
    part = next((s for s in SCOPES if re.search(rf"\b{s}\b", op_name)), "other")
    if part not in ("optimizer", "other") and "transpose(" in op_name:
      part += " (backward)"
    table[name] = (kind, part, shape, opcode == "dot")
  return table


def attribute(events: list[dict], table: dict) -> tuple[collections.Counter, float]:
  """Seconds of the traced span per instruction: concurrent thunks share an instant; a gap goes to
  the last Eigen matmul launched since the previous gap, else to the op that ended last (see the
  module docstring). -> (seconds by name, span)."""
  edges = sorted(
    [(e["ts"], 1, e["name"]) for e in events]
    + [(e["ts"] + e["dur"], -1, e["name"]) for e in events]
  )
  running, share = collections.Counter(), collections.Counter()
  last_time, last_ended, launched = edges[0][0], edges[0][2], None
  for time_us, delta, name in edges:
    dt = (time_us - last_time) * 1e-6
    if running:
      k = sum(running.values())
      for r, c in running.items():
        share[r] += dt * c / k
    elif dt:
      share[launched or last_ended] += dt
      launched = None
    last_time = time_us
    running[name] += delta
    if delta > 0 and table[name][3]:
      launched = name
    if not running[name]:
      del running[name]
      last_ended = name
  return share, (edges[-1][0] - edges[0][0]) * 1e-6


def read_trace(trace_dir: pathlib.Path, table: dict) -> list[dict]:
  """The trace's complete events that are instructions of the step (not runtime bookkeeping)."""
  (path,) = trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz")
  events = json.loads(gzip.open(path).read())["traceEvents"]
  return [e for e in events if e.get("ph") == "X" and e["name"] in table]


def head_matmul_rates(tokens: int, d: int, vocab: int, dtype) -> dict[str, float]:
  """The tied head's three matmuls alone at the step's shapes: the logits x W^T, the input's
  gradient g W and the table's gradient g^T x (x [tokens, d], W [vocab, d], g [tokens, vocab])."""
  mm = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)

  def rate(f, *shapes):  # measured as analysis.measure_matmul_peak measures the peak
    f, args = jax.jit(f), [jnp.ones(shape, dtype) for shape in shapes]
    return analysis.sustained_rate(lambda: jax.block_until_ready(f(*args)), 2 * tokens * d * vocab)

  return {
    "logits x W^T": rate(lambda x, w: mm(x, w.T), (tokens, d), (vocab, d)),
    "input gradient g W": rate(mm, (tokens, vocab), (vocab, d)),
    "table gradient g^T x": rate(lambda g, x: mm(g.T, x), (tokens, vocab), (tokens, d)),
  }


def main(_):
  out = common.fresh_workdir(_WORKDIR.value)
  cfg = _CONFIG.value
  corpus = setup.load_data(cfg)
  s = setup.build(cfg, corpus.tokenizer.vocab_size)
  d = s.cfg.data
  batches = data.train_batches(
    corpus.tokens["train"], seq_len=d.seq_len, global_batch=d.global_batch, seed=d.seed
  )
  batch = jax.device_put(np.asarray(next(batches)), s.batch_sharding)
  state = setup.make_init(s)()
  step = step_functions.make_train_step(s).lower(state, batch).compile()
  hlo = step.as_text()
  (out / "step.hlo").write_text(hlo)  # the ops' names in the report and the trace are its names
  table = op_table(hlo)

  def run(n):
    nonlocal state
    for _ in range(n):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))

  run(2)  # warm: the allocator's pools and the caches
  # MFU's denominator: matmuls in the model's compute dtype, measured the same way.
  dtype = jnp.dtype(cfg.model.dtype)
  peak = analysis.measure_matmul_peak(dtype=dtype)
  m = s.cfg.model
  single = s.layout.mesh.size == 1  # the head's ceiling below is one device's
  head_rates = (
    head_matmul_rates(
      d.global_batch * d.seq_len, m.d_model, s.abstract_params["wte"].shape[0], dtype
    )
    if single
    else {}
  )
  start = time.perf_counter()
  run(_STEPS.value)
  step_s = (time.perf_counter() - start) / _STEPS.value
  trace_dir = out / "trace"
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    run(_TRACED.value)
  seconds, span = attribute(read_trace(trace_dir, table), table)
  per_step = lambda x: x / _TRACED.value

  model_flops = analysis.flops_per_token(s.cfg.model, d.seq_len) * d.global_batch * d.seq_len
  compiled_flops = (
    aot_plan.compiled_costs(s, step)["compiled_matmul_flops_per_step"] / s.layout.mesh.size
  )
  by_kind, by_part, by_both = collections.Counter(), collections.Counter(), collections.Counter()
  for name, sec in seconds.items():
    kind, part, *_ = table[name]
    by_kind[kind] += sec
    by_part[part] += sec
    by_both[kind, part] += sec
  matmul_s = per_step(by_kind["matmul"])
  results = {
    "config": s.cfg.to_dict(),
    "step_s": step_s,
    "traced_span_per_step_s": per_step(span),
    "matmul_peak_flops": peak,
    "model_flops_per_step": model_flops,
    "matmul_flops_per_device": compiled_flops,
    "mfu": model_flops / step_s / peak,
    "matmul_s": matmul_s,
    "matmul_flops_per_s": compiled_flops / matmul_s,
    "seconds_per_step": {f"{k}|{p}": per_step(v) for (k, p), v in by_both.items()},
    "ops": [
      {"name": n, "kind": table[n][0], "part": table[n][1], "shape": table[n][2], "s": per_step(v)}
      for n, v in seconds.most_common()
    ],
  }
  total = per_step(sum(seconds.values()))
  # The step's matmuls with the head's at their own measured rates and the rest at the peak: the
  # step's time, and MFU, with every other op and gap gone.
  head_flops = 2 * d.global_batch * d.seq_len * m.d_model * s.abstract_params["wte"].shape[0]
  ideal_s = (
    head_flops * sum(1 / r for r in head_rates.values()) + (compiled_flops - 3 * head_flops) / peak
    if single
    else None
  )
  results.update(
    head_matmul_flops_per_s=head_rates,
    matmul_only_step_s=ideal_s,
    matmul_only_mfu=model_flops / ideal_s / peak if single else None,
  )
  lines = [
    f"# One train step, op by op: {m.n_layers} layers, d={m.d_model}, vocab {m.vocab_size}, "
    f"batch {d.global_batch} x {d.seq_len}, {s.layout.name}, {m.dtype}",
    "",
    f"Step {step_s:.3f} s untraced ({per_step(span):.3f} s traced); "
    f"model FLOPs {model_flops / 1e9:.1f} G; "
    f"{m.dtype} matmul peak measured here {peak / 1e9:.0f} GFLOP/s; **MFU {results['mfu']:.3f}**.",
    "",
    f"Matmuls: {matmul_s:.3f} s per step for {compiled_flops / 1e9:.1f} GFLOP compiled = "
    f"{compiled_flops / matmul_s / 1e9:.0f} GFLOP/s, {compiled_flops / matmul_s / peak:.2f} of the "
    f"peak. At the peak they would take {compiled_flops / peak:.3f} s: everything else is "
    f"{total - compiled_flops / peak:.3f} s.",
    "",
    *(
      [
        "The head's matmuls alone at the step's shapes, measured the same way: "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s ({v / peak:.2f})" for k, v in head_rates.items())
        + f". With those rates, the other matmuls at the peak and nothing else, the step would "
        f"take {ideal_s:.3f} s: MFU {results['matmul_only_mfu']:.3f}, this machine's ceiling for "
        f"this step under XLA.",
        "",
      ]
      if single
      else []
    ),
    "| part | " + " | ".join(sorted(by_kind)) + " | all | share |",
    "|---|" + "---:|" * (len(by_kind) + 2),
  ]
  for part, sec in by_part.most_common():
    cells = [f"{1000 * per_step(by_both[k, part]):.0f}" for k in sorted(by_kind)]
    lines.append(
      f"| {part} | " + " | ".join(cells) + f" | {1000 * per_step(sec):.0f} | "
      f"{per_step(sec) / total:.3f} |"
    )
  cells = [f"{1000 * per_step(by_kind[k]):.0f}" for k in sorted(by_kind)]
  lines += [
    "| all (ms) | " + " | ".join(cells) + f" | {1000 * total:.0f} | 1.000 |",
    "",
    "The 15 longest ops:",
    "",
    "| op | kind | part | output | ms |",
    "|---|---|---|---|---:|",
  ]
  lines += [
    f"| {o['name']} | {o['kind']} | {o['part']} | {o['shape']} | {1000 * o['s']:.1f} |"
    for o in results["ops"][:15]
  ]
  common.write_report(out, lines, results)


if __name__ == "__main__":
  app.run(main)
