"""Every layout on 8 virtual CPU devices against `single`, one process per layout:

  python launch.py --config experiments/ablate_layouts.py --workdir runs/ablate_layouts \
      --results docs/results/ablate_layouts.md

Model: the 111M widths (d_model 768, d_ff 3072, GPT-2 vocabulary 50257) with 4 layers and 8 heads
of 96, so that every layout can put all 8 devices on one axis and 4 pipeline stages hold a layer
each; batch 16 x 128 tokens of tiny Shakespeare, big enough that matmuls dominate; 6 steps from the
same seed. WORKDIR/report.md: per layout the mesh, tokens/s and per-device memory against single,
collective bytes measured in the compiled HLO against cgpt_jax/costs/comm.py, the bubble, and the
loss against single's at every step; pipeline and wafer details; WORKDIR/layouts.png. `--results`
writes the same report to docs/results/ablate_layouts.md, the plot beside it.

The 8 devices share this machine's cores, so tokens/s ratios measure replicated work and collective
copies, not a real interconnect; bytes, FLOPs and memory are exact.
"""

from cgpt_jax import config as config_lib
from cgpt_jax import report as report_lib

STEPS = 6
PP = {"mesh.layout": "pp"}
LAYOUTS = {  # point name -> config overrides; `single` first: it is the reference
  "single": {"mesh.layout": "single"},
  "dp": {"mesh.layout": "dp"},
  "zero1": {"mesh.layout": "zero1"},
  "fsdp": {"mesh.layout": "fsdp"},
  "tp": {"mesh.layout": "tp"},
  "sp": {"mesh.layout": "sp"},
  "dp2_x_tp4": {"mesh.layout": "tp", "mesh.data": 2, "mesh.tensor": 4},
  "fsdp2_x_tp4": {"mesh.layout": "fsdp", "mesh.fsdp": 2, "mesh.tensor": 4},
  "gpipe_S4_M4_x_dp2": {**PP, "mesh.pipe": 4, "mesh.data": 2, "pipeline.microbatches": 4},
  "gpipe_S4_M8_x_dp2": {**PP, "mesh.pipe": 4, "mesh.data": 2, "pipeline.microbatches": 8},
  "gpipe_S4_M8_x_dp2_remat": {
    **PP,
    "mesh.pipe": 4,
    "mesh.data": 2,
    "pipeline.microbatches": 8,
    "model.remat": "full",
  },
  "gpipe_S2_M4_x_dp4": {**PP, "mesh.pipe": 2, "mesh.data": 4, "pipeline.microbatches": 4},
  "circular_S2_R2_M4_x_dp4": {
    **PP,
    "mesh.pipe": 2,
    "mesh.data": 4,
    "pipeline.microbatches": 4,
    "pipeline.schedule": "circular",
    "pipeline.repeats": 2,
  },
  # The 1F1B family: the backward written by hand, idle rounds computing nothing.
  "1f1b_S4_M8_x_dp2": {
    **PP,
    "mesh.pipe": 4,
    "mesh.data": 2,
    "pipeline.microbatches": 8,
    "pipeline.schedule": "1f1b",
  },
  "interleaved_1f1b_S2_R2_M4_x_dp4": {
    **PP,
    "mesh.pipe": 2,
    "mesh.data": 4,
    "pipeline.microbatches": 4,
    "pipeline.repeats": 2,
    "pipeline.schedule": "interleaved_1f1b",
  },
  "zb_h1_S4_M8_x_dp2": {
    **PP,
    "mesh.pipe": 4,
    "mesh.data": 2,
    "pipeline.microbatches": 8,
    "pipeline.schedule": "zb_h1",
  },
  "3d_dp2_pp2_tp2_M4": {"mesh.layout": "3d", "pipeline.microbatches": 4},
  # Context parallelism: the sequence in zig-zag chunks over a ring of 8, or of 4 with dp over 2.
  "cp": {"mesh.layout": "cp"},
  "cp4_x_dp2": {"mesh.layout": "cp", "mesh.context": 4, "mesh.data": 2},
  "fsdp_remat": {"mesh.layout": "fsdp", "model.remat": "full"},
  "wafer": {"mesh.layout": "wafer"},
  "swarm_2x4": {"mesh.layout": "swarm"},
}


def get_config(arg=None):
  del arg
  c = config_lib.cerebras_gpt("111m")
  c.data.source = "../shared/data/tinyshakespeare/input.txt"
  c.model.n_layers = 4
  c.model.n_heads = 8
  c.data.seq_len = 128
  c.data.global_batch = 16
  c.data.eval_batches = 1
  c.train.steps = STEPS
  c.optim.warmup_steps = 1
  c.train.eval_every = STEPS
  c.train.log_every = 1
  c.train.progress = False
  c.checkpoint.every = 0  # 6 steps: nothing to resume; a 111M-wide checkpoint is ~0.7 GB per layout
  return c


def get_sweep(arg=None):
  del arg
  return [{"name": name, "devices": 8, **overrides} for name, overrides in LAYOUTS.items()]


def report(sweep, results, workdir):
  del sweep
  if "error" in results.get("single", {"error": "not run"}):
    return [
      "`single` failed, so nothing can be compared with it:",
      "",
      *report_lib.generic_table(results),
    ]
  report_lib.layouts_plot(results, workdir / "layouts.png")
  return [
    "## Layouts against single",
    "",
    *report_lib.layouts_table(results),
    "",
    "![layouts](layouts.png)",
    "",
    "## Pipelines: bubble theory and measurement",
    "",
    *report_lib.pipeline_table(results),
    "",
    "## Weight streaming",
    "",
    *report_lib.wafer_table(results),
  ]
