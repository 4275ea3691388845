"""--mode=plan: the train step compiled ahead of time from abstract shapes alone, nothing allocated,
and what it costs (memory, matmul FLOPs, collective bytes), each beside its formula."""

import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections

from cgpt_jax import model as model_lib
from cgpt_jax import presets
from cgpt_jax.costs import analysis, comm, roofline
from cgpt_jax.parallel import context, wafer
from cgpt_jax.train import run_dir, setup, step_functions
from cgpt_jax.train.setup import Setup


def compiled_costs(s: Setup, compiled) -> dict:
  """Matmul FLOPs and collective bytes per step measured in the compiled program, and per-device
  state bytes, each beside its analytic value."""
  hlo = compiled.as_text()
  m, d = s.cfg.model, s.cfg.data
  sizes = s.layout.axis_sizes
  vocab = model_lib.padded_vocab(m)
  tokens = d.global_batch * d.seq_len
  held = sum(x.size for x in jax.tree.leaves(s.abstract_params))
  streams = s.layout.streams_weights
  ways = sizes[context.AXIS]
  terms = comm.analytic_terms(s)
  # The same step compiled for a GPU or TPU, which move the compute dtype (spmd.wire_dtype).
  accelerator_terms = comm.analytic_terms(s, backend="gpu")
  # A hand-written schedule's rounds are one conditional: which branch runs how often is the
  # schedule's table.
  shares = s.schedule.program.branch_shares() if s.schedule and s.schedule.hand_written else None
  by_dtype = analysis.collective_bytes_by_dtype(hlo, branch_shares=shares)
  opt_state = setup.abstract_state(s).opt_state
  costs = {
    "optimizer_state_bytes": analysis.tree_bytes(opt_state),
    "optimizer_state_bytes_per_device": analysis.per_device_bytes(opt_state),
    "compiled_matmul_flops_per_step": analysis.dot_flops(hlo, shares) * s.layout.mesh.size,
    "expected_matmul_flops_per_step": analysis.expected_matmul_flops(
      m, d.seq_len, tokens, vocab, s.schedule, remat="full" if streams else None, context=ways
    ),
    "collective_bytes_per_step": {k: sum(v.values()) for k, v in by_dtype.items()},
    "collective_bytes_by_dtype": by_dtype,
    "analytic_collective_bytes_per_step": sum(terms.values()),
    "analytic_collective_bytes_by_kind": comm.by_kind(terms),
    "analytic_collective_terms": terms,
    "accelerator_collective_terms": accelerator_terms,
  }
  if s.cfg.optim.name == "adamw":  # docs/formulas.md#per-device-memory counts Adam's two moments
    costs["analytic_state_bytes_per_device"] = analysis.analytic_state_bytes(
      sizes, m, held, vocab, s.layout.zero1
    )
  if streams:
    loops = analysis.collective_bytes(hlo, loops_only=True)
    costs["wafer"] = {
      "mode": wafer.MODE,
      "streamed_bytes_per_step": loops.get("all-gather", 0) + loops.get("reduce-scatter", 0),
      "analytic_streamed_bytes_per_step": terms["layer_weight_gather"]
      + terms["layer_grad_scatter"],
    }
  if ways > 1:
    costs["context"] = context.describe(ways, d.seq_len)
  if s.schedule:
    # What the same step costs without the pipeline's bubbles: the single-device program.
    unpipelined = analysis.expected_matmul_flops(m, d.seq_len, tokens, vocab)
    costs["pipeline"] = {
      **s.schedule.describe(),
      "step_flops_ratio_theory": costs["expected_matmul_flops_per_step"] / unpipelined,
      "step_flops_ratio_measured": costs["compiled_matmul_flops_per_step"] / unpipelined,
    }
  return costs


def plan(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  out = run_dir.check_workdir(workdir, ("plan.json",))
  vocab = cfg.model.vocab_size or setup.load_tokenizer(cfg).vocab_size
  s = setup.build(cfg, vocab)
  state = setup.abstract_state(s)
  batch = jax.ShapeDtypeStruct(
    (s.cfg.data.global_batch, s.cfg.data.seq_len + 1), jnp.int32, sharding=s.batch_sharding
  )
  t0 = time.perf_counter()
  compiled = step_functions.make_train_step(s).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  memory = analysis.compiled_memory(compiled)
  tokens_per_step = s.cfg.data.global_batch * s.cfg.data.seq_len
  budget = presets.TOKENS_PER_PARAM * s.n_params
  result = {
    **setup.describe(s),
    "chinchilla_tokens": budget,
    "chinchilla_steps": math.ceil(budget / tokens_per_step),
    "tokens_per_step": tokens_per_step,
    "param_bytes": analysis.tree_bytes(state.params),
    "model_flops_per_step": analysis.flops_per_token(s.cfg.model, s.cfg.data.seq_len)
    * tokens_per_step,
    "compile_s": round(compile_s, 3),
    "memory_per_device_bytes": memory,
    "fits_80GB": memory["total_bytes"] <= 80e9,
    **compiled_costs(s, compiled),
    **({"cs2_streaming": roofline.cs2_streaming_table()} if s.layout.streams_weights else {}),
    "config": s.cfg.to_dict(),
  }
  run_dir.create_workdir(out)
  (out / "plan.json").write_text(json.dumps(result, indent=2))
  if s.schedule:
    s.schedule.plot(out / "pipeline_timeline.png")
  return result
