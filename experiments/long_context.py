"""Long context on the CPU mesh: what context parallelism buys in memory and costs in bytes at
T = 8192, planned ahead of time (`--mode plan`, nothing allocated):

  python launch.py --config experiments/long_context.py --workdir runs/long_context \
      --results docs/results/long_context.md

A small width (4 layers, d_model 256, 4 heads, the character vocabulary), one sequence of 8192
tokens per step, float32, no remat: `single` on one device against `cp` rings of 2, 4 and 8
devices, and a ring of 4 twice over `data` (two sequences). Per point: per-device memory from the
compiled program beside single's, the ring's collective-permute bytes beside the formula
(comm.py's context_kv_ring + context_kv_grad_ring: 2 (N-1)/N B T d x 4 bytes per layer, each way),
and the compiled matmul FLOPs beside single's, (2N+1)/(4N) of the [T, T] scores
(docs/context_parallel.md).
"""

import ml_collections

from cgpt_jax import config as config_lib
from cgpt_jax import report as report_lib

SEQ_LEN = 8192
RINGS = (2, 4, 8)


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  c = config_lib.base_config()
  c.model.update(n_layers=4, d_model=256, n_heads=4, n_positions=SEQ_LEN)
  c.data.update(seq_len=SEQ_LEN, global_batch=1, eval_batch=1)
  c.optim.warmup_steps = 0
  c.train.steps = 1
  return c


def get_sweep(arg=None) -> list[dict]:
  del arg
  points = [{"name": "single", "devices": 1, "mode": "plan"}]
  points += [
    {"name": f"cp{n}", "devices": n, "mode": "plan", "mesh.layout": "cp", "mesh.context": n}
    for n in RINGS
  ]
  points.append(
    {
      "name": "cp4_x_dp2",
      "devices": 8,
      "mode": "plan",
      "mesh.layout": "cp",
      "mesh.context": 4,
      "mesh.data": 2,
      "data.global_batch": 2,
      "data.eval_batch": 2,
    }
  )
  return points


def report(sweep, results, workdir):
  del sweep, workdir
  return report_lib.long_context_table(results, SEQ_LEN)
