"""Estimated step time of a plan (a compiled plan.json, or the analytic stand-in built from a Setup
before anything compiles) on an accelerator: compute and communication by the roofline
(costs/roofline.py), plus the pipeline's idle time; ranking and the Pareto front."""

from cgpt_jax import model as model_lib
from cgpt_jax.costs import analysis, comm, roofline
from cgpt_jax.parallel import context, pipeline_1f1b


def idle_fraction(plan: dict) -> float:
  """The share of each stage's time a hand-written schedule idles (its closed form, the plan's
  pipeline.bubble_fraction_theory). 0 without a pipeline, and 0 under gpipe and circular, whose
  SPMD loop computes through its bubbles: those are already in the compiled FLOPs."""
  p = plan.get("pipeline")
  if not p or p["schedule"] not in pipeline_1f1b.SCHEDULES:
    return 0.0
  return p["bubble_fraction_theory"]


def step_time(plan: dict, hw: roofline.Hardware) -> dict:
  """Seconds per step: max(compute, communication) with perfect overlap, as roofline.analyse,
  plus the stages' idle time f / (1 - f) of their compute; and the MFU that step time gives."""
  compute = roofline.compute_seconds(plan, hw)
  analytic = roofline.terms_seconds(plan, hw, plan["analytic_collective_terms"])
  comm_s = roofline.comm_seconds(plan, hw, analytic)
  f = idle_fraction(plan)
  bubble = compute * f / (1 - f)
  step = max(compute, comm_s) + bubble
  model = plan["model_flops_per_step"] / plan["devices"] / hw.peak_flops
  return {
    "compute_s": compute,
    "comm_s": comm_s,
    "comm_s_bf16_wire": roofline.terms_seconds(plan, hw, plan["accelerator_collective_terms"]),
    "bubble_s": bubble,
    "step_s": step,
    "mfu": model / step,
    "bound": "compute" if compute >= comm_s else "communication",
  }


def analytic_plan(s) -> dict:
  """The plan.json fields step_time reads, from the formulas alone (comm.analytic_terms,
  analysis.expected_matmul_flops): what the search ranks candidates by before compiling any."""
  m, d = s.cfg.model, s.cfg.data
  tokens = d.global_batch * d.seq_len
  streams = s.layout.streams_weights
  terms = comm.analytic_terms(s)
  flops = analysis.expected_matmul_flops(
    m,
    d.seq_len,
    tokens,
    model_lib.padded_vocab(m),
    s.schedule,
    remat="full" if streams else None,
    context=s.layout.axis_sizes[context.AXIS],
  )
  plan = {
    "devices": s.layout.mesh.size,
    "mesh": s.layout.axis_sizes,
    "compiled_matmul_flops_per_step": flops,
    "collective_bytes_per_step": comm.by_kind(terms),
    "analytic_collective_terms": terms,
    "accelerator_collective_terms": comm.analytic_terms(s, backend="gpu"),
    "model_flops_per_step": analysis.flops_per_token(m, d.seq_len) * tokens,
  }
  if s.schedule:
    plan["pipeline"] = {
      "schedule": s.schedule.name,
      "bubble_fraction_theory": s.schedule.bubble_fraction,
    }
  return plan


def pareto(points: list[tuple[float, float]]) -> list[bool]:
  """Which (memory, step time) points no other point beats on both counts (ties beat nothing)."""
  return [
    not any(m2 <= m and t2 <= t and (m2, t2) != (m, t) for m2, t2 in points) for m, t in points
  ]
