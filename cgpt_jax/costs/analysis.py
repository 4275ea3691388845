"""What a run costs: model FLOPs, byte counts, the compiled program's memory and FLOPs, the matmul
peak.

Exact figures (FLOPs, bytes, memory) come from shapes and from the compiled program; the one timing
here, the matmul peak, is measured in the same process as the run it is compared with, so MFU on a
noisy shared CPU compares like with like.
"""

import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cgpt_jax import presets
from cgpt_jax.costs import memory as memory_model
from cgpt_jax.parallel import context as context_lib


def layer_matmul_params(m: ml_collections.ConfigDict) -> int:
  """Parameters of the blocks' matrices: QKV, attention-out and the two MLP matrices."""
  return m.n_layers * presets.layer_matrix_params(m.d_model, m.d_ff)


def flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> int:
  """Training FLOPs per token: 6 N_matmul (forward + backward) plus causal-agnostic attention
  12 L T d (docs/formulas.md#flops): the blocks' (layer_matmul_flops_per_token) and the tied head's
  6 V d. Biases, layer norms and softmax are left out, as in the usual MFU."""
  return layer_matmul_flops_per_token(m, seq_len) + 6 * m.vocab_size * m.d_model


def tree_bytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (device 0's shards:
  every layout here shards evenly)."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )


def compiled_memory(compiled) -> dict:
  """Per-device memory of a compiled (partitioned) program, in bytes.

  (Its cost_analysis() FLOPs are not reported: they count a scan body once, not once per layer.)
  """
  mem = compiled.memory_analysis()
  memory = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
  }
  # Donated state is both argument and output: count it once.
  memory["total_bytes"] = (
    memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"]
  )
  return memory


def measure_matmul_peak(n: int = 2048, seconds: float = 1.0, dtype=jnp.float32) -> float:
  """Sustained FLOP/s of back-to-back n x n matmuls in `dtype` (accumulated in float32) on the
  default device: MFU's denominator.

  2048 reaches the BLAS plateau here (1024 read 15-30% lower and noisier). Sustained over a second
  rather than the fastest single call, which caught short turbo bursts up to 1.4x higher.
  """
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  return sustained_rate(lambda: f(a).block_until_ready(), 2 * n**3, seconds)


def sustained_rate(call, flops: float, seconds: float = 1.0) -> float:
  """FLOP/s of `call()` (which returns when its work is done, `flops` of it) repeated back to back
  for `seconds` and at least 3 times, after one untimed call (compiling, warming caches)."""
  call()
  reps, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds or reps < 3:
    call()
    reps += 1
  return flops * reps / elapsed


# ----------------------------------------------------------------------------------------------
# Collective bytes from the compiled, partitioned HLO
# ----------------------------------------------------------------------------------------------
_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_WHILE = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"")
_CALLEE = re.compile(r"\b(?:to_apply|calls|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")


def _group_size(line: str) -> int:
  """Devices per replica group, from any of the forms XLA prints."""
  if m := re.search(
    r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line
  ):  # mesh['a'=2,'b'=4] {'b'}
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[(\d+),(\d+)\]", line):  # iota form [groups, size]<=[...]
    return int(m.group(2))
  return 1


_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ")
_DOT = re.compile(r" dot\(%?([\w.\-]+), .*lhs_contracting_dims=\{([\d,]*)\}")


def _dims(type_str: str) -> list[int]:
  m = _ARRAY.search(type_str)
  return [int(n) for n in m.group(2).split(",") if n] if m else []


def _walk(hlo_text: str, branch_shares: list[float] | None = None):
  """Yields (instruction line, its computation's name -> type table, times it runs per call of the
  program, whether it is inside a while loop): entry once, while bodies once per known trip, called
  computations as often as their caller. A conditional's branches are not known from the program:
  `branch_shares` gives, for the conditional with that many branches (a hand-written pipeline
  schedule's round, pipeline_1f1b.Program.branch_shares), the share of its runs each branch takes,
  averaged over the devices; other conditionals' branches are not counted."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if m := _HEADER.match(line):
      current = m.group(1)
      computations[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif current is not None:
      computations[current].append(line)

  def visit(name: str, times: int, in_loop: bool):
    lines = computations.get(name, ())
    types = {m.group(1): m.group(2) for line in lines if (m := _DEF.match(line))}
    for line in lines:
      yield line, types, times, in_loop
      trips = dict(_WHILE.findall(line))
      for callee in _CALLEE.findall(line):
        if callee in computations and callee != name:
          yield from visit(callee, times * int(trips.get(callee, 1)), in_loop or callee in trips)
      if (m := _BRANCHES.search(line)) and branch_shares:
        branches = [b.strip().lstrip("%") for b in m.group(1).split(",")]
        if len(branches) == len(branch_shares):
          for branch, share in zip(branches, branch_shares):
            if share:
              yield from visit(branch, times * share, in_loop)

  if entry is not None:
    yield from visit(entry, 1, False)


def collective_bytes_by_dtype(
  hlo_text: str, loops_only: bool = False, branch_shares: list[float] | None = None
) -> dict[str, dict[str, int]]:
  """Bytes each device sends per call of the program, by collective kind and the element type it
  moves, e.g. {"all-gather": {"f32": ...}} (formulas: all-reduce 2V(n-1)/n, all-gather
  V_out(n-1)/n, reduce-scatter V_in(n-1)/n, all-to-all V(n-1)/n, collective-permute V). Ops inside
  while bodies count once per known trip; `loops_only` counts only those (e.g. the per-layer weight
  streaming inside the layer scan); conditionals' branches as `branch_shares` says (_walk)."""
  totals: dict[tuple[str, str], float] = {}
  for line, _, times, in_loop in _walk(hlo_text, branch_shares):
    if (m := _OP.match(line)) and (in_loop or not loops_only):
      kind, n = m.group(2), _group_size(line)
      share = {
        "all-reduce": 2 * (n - 1) / n,
        "all-gather": (n - 1) / n,
        "reduce-scatter": n - 1,
        "all-to-all": (n - 1) / n,
        "collective-permute": 1,
      }[kind]
      for dtype, dims in _ARRAY.findall(m.group(1)):
        out = _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        totals[kind, dtype] = totals.get((kind, dtype), 0) + out * share * times
  result: dict[str, dict[str, int]] = {}
  for (kind, dtype), value in sorted(totals.items()):
    result.setdefault(kind, {})[dtype] = int(round(value))
  return result


def collective_bytes(
  hlo_text: str, loops_only: bool = False, branch_shares: list[float] | None = None
) -> dict[str, int]:
  """Bytes each device sends per call of the program, by collective kind, whatever they move
  (collective_bytes_by_dtype)."""
  return {
    kind: sum(by_dtype.values())
    for kind, by_dtype in collective_bytes_by_dtype(hlo_text, loops_only, branch_shares).items()
  }


def dot_flops(hlo_text: str, branch_shares: list[float] | None = None) -> int:
  """Matmul FLOPs one device runs per call of the program: 2 x output elements x contracted size
  for every dot, once per trip of its loop (cost_analysis() counts a loop body once); conditionals'
  branches as `branch_shares` says (_walk), averaged over the devices."""
  total = 0
  for line, types, times, _ in _walk(hlo_text, branch_shares):
    if (m := _DOT.search(line)) and (d := _DEF.match(line)):
      lhs = _dims(types.get(m.group(1), ""))
      contracted = math.prod(lhs[int(i)] for i in m.group(2).split(",") if i)
      total += 2 * math.prod(_dims(d.group(2))) * contracted * times
  return int(round(total))


def layer_params(m: ml_collections.ConfigDict) -> int:
  """Parameters of one block of `m` (presets.layer_params): matrices, biases and layer norms."""
  return presets.layer_params(m.d_model, m.d_ff)


def layer_matmul_flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> int:
  """Forward + backward matmul FLOPs of all blocks per token: 6 N_layers + 12 L T d."""
  return 6 * layer_matmul_params(m) + 12 * m.n_layers * seq_len * m.d_model


def remat_unit(m: ml_collections.ConfigDict, schedule=None) -> int:
  """Blocks in one rematerialised unit: a block, or under a pipeline a stage iteration's K
  blocks."""
  return m.n_layers // (schedule.stages * schedule.repeats) if schedule else 1


def rerun_drops_last(m: ml_collections.ConfigDict, schedule=None) -> int:
  """1 if the backward's rerun of a unit skips the unit's last MLP-out (its matmul and its tensor
  collective), else 0. The backward never needs the unit's output, so XLA drops that dead work
  from straight-line code, but not from the body of a rolled loop (K blocks > scan_unroll), which
  runs every trip."""
  return int(remat_unit(m, schedule) <= m.scan_unroll)


def backward_chains(schedule=None) -> int:
  """Times the backward runs its chain of input gradients through the layers: 2 under ZB-H1, whose
  W applies the stage's VJP again to reach the weights (pipeline.Schedule.backward_chains), else
  1."""
  return schedule.backward_chains if schedule is not None else 1


def expected_matmul_flops(
  m: ml_collections.ConfigDict,
  seq_len: int,
  tokens: int,
  padded_vocab: int,
  schedule=None,
  remat: str | None = None,
  context: int = 1,
) -> int:
  """Matmul FLOPs the compiled step should run on all devices together.

  The head: 6 V d per token over the padded vocabulary. The blocks: 6 N_layers + 12 L T d per token,
  plus under full remat the forward of each rematerialised unit again (a block; a whole stage
  iteration of K blocks under a pipeline). XLA drops the unit's last matmul (the MLP-out, 2 d f per
  token), whose output the backward never needs, when that matmul is straight-line code; when the
  K blocks run as a rolled loop (K > scan_unroll) it sits in the loop body and runs every trip.
  `remat` overrides m.remat (the wafer always runs "full"). An SPMD pipeline computes its bubbles:
  the blocks' FLOPs times (M R + S - 1) / (M R); a hand-written schedule's idle rounds compute
  nothing. ZB-H1's W reruns the backward's chain to every weight, which is all of its input-gradient
  work (2 N_layers + 8 L T d per token; even the first layer's QKV input gradient feeds its layer
  norm's gradient), and under full remat the unit's forward once more. A `context`-parallel ring
  of N devices scores a query against (2N+1)/(4N) of the T keys on average
  (parallel.context.score_fraction): the attention terms' T becomes that.
  """
  d, f = m.d_model, m.d_ff
  keys = seq_len * context_lib.score_fraction(context)
  layers = layer_matmul_flops_per_token(m, keys)
  chains = backward_chains(schedule)
  layers += (chains - 1) * (2 * layer_matmul_params(m) + 8 * m.n_layers * keys * d)
  if (m.remat if remat is None else remat) == "full":
    per_unit = remat_unit(m, schedule)
    forward = 2 * presets.layer_matrix_params(d, f) + 4 * keys * d
    skipped = 2 * d * f * rerun_drops_last(m, schedule)
    layers += chains * (m.n_layers // per_unit) * (per_unit * forward - skipped)
  layers *= tokens
  if schedule is not None:
    layers = layers * schedule.layer_runs // (schedule.microbatches * schedule.repeats)
  return int(6 * padded_vocab * d * tokens + layers)


def analytic_state_bytes(
  sizes: dict, m: ml_collections.ConfigDict, params_held: int, padded_vocab: int, zero1: bool
) -> int:
  """Per-device bytes of the state kept between steps, float32 parameters and Adam moments
  (memory.STATE_BYTES_PER_PARAM, 4 + 8; gradients live only within a step), by
  docs/formulas.md#per-device-memory: FSDP divides everything by its axis but the MLP biases (mlp
  is never on fsdp, layouts.RULES); TP divides the matrices (the layers' and the vocab-parallel
  embedding) by its axis and replicates the rest (positions, norms, biases); PP divides the layers
  by its stages; ZeRO-1 further divides the moments by the data axis. `params_held` counts what is
  stored, embedding padding included."""
  layer_matrices = layer_matmul_params(m)
  layers = m.n_layers * layer_params(m)
  layers_held = (layer_matrices / sizes["tensor"] + layers - layer_matrices) / sizes["pipe"]
  embedding = padded_vocab * m.d_model
  rest_held = embedding / sizes["tensor"] + (params_held - layers - embedding)
  mlp_biases = m.n_layers * m.d_ff / sizes["tensor"] / sizes["pipe"]
  per_device = (layers_held + rest_held - mlp_biases) / sizes["fsdp"] + mlp_biases
  moment_ways = sizes["data"] if zero1 else 1
  return int(
    round(
      memory_model.PARAM_BYTES * per_device
      + memory_model.ADAM_MOMENT_BYTES * per_device / moment_ways
    )
  )
