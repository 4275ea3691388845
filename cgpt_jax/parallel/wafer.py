"""The wafer layout: Cerebras weight streaming on a device mesh (DESIGN.md, "The wafer layout").

A CS-2 keeps activations on the wafer and only the running layer's weights; weights and optimizer
state live off-wafer in MemoryX and stream in layer by layer, forward and again backward, while
weight gradients stream back and MemoryX runs the update. SwarmX joins wafers by pure data
parallelism: weights broadcast, gradients reduced.

Here every device of the `fsdp` axis is a part of one wafer: activations are split over them by
batch, and the state lives sharded across them (the off-wafer store; the optimizer updates each
shard where it lives). In the step's shard_map (spmd.py) the layer scan streams each layer's weights
in with an all-gather from the shards, runs the block, and, being rematerialised, streams the same
layer in again in the backward; the all-gather's transpose reduce-scatters the layer's gradient
back to its shards. Streamed bytes per device per step: 3 P_layers b (n-1)/n (comm.py). With
`data` > 1 (swarm) the shards are replicated across wafers and the gradients summed across them
once per step.

The mode that runs is this per-layer gather. A host-memory mode (the store in `pinned_host` memory,
one device_put per layer) is not built: XLA's CPU compiler ignores memory kinds (the compiled
program has no host memory space and memory_analysis() counts pinned_host arguments as device
memory), so here it could be neither measured nor told apart from this one.
"""

import ml_collections

from cgpt_jax import config as config_lib
from cgpt_jax.costs import analysis

MODE = "per-layer all-gather from shards across the wafer"


# ----------------------------------------------------------------------------------------------
# Is Cerebras-GPT's training streaming-bound on a CS-2?
# ----------------------------------------------------------------------------------------------
# CS-2 system I/O: 12 x 100 GbE = 1.2 Tb/s (Cerebras CS-2 datasheet), in bytes per second.
CS2_IO_BYTES_PER_S = 1.2e12 / 8
# Dense 16-bit compute of one CS-2: Andromeda's 16 CS-2s give 120 PFLOP/s (Cerebras, SC22,
# reported by Tom's Hardware, 2022-11-14: "120 Petaflops of 16-bit half-precision").
CS2_PEAK_FLOPS = 120e15 / 16
STREAM_BYTES_PER_PARAM = (
  6  # 16-bit weights in for the forward and again for the backward, 16-bit gradients out
)


def cs2_streaming_table(seq_len: int = 2048) -> list[dict]:
  """Per training step of each Cerebras-GPT size at the paper's batch on one CS-2: seconds to stream
  the weights in twice and the gradients out once at the system I/O rate, against seconds of
  compute at the wafer's dense peak (a lower bound on the real compute time)."""
  rows = []
  for name, p in config_lib.CEREBRAS_GPT.items():
    params = config_lib.closed_form_params(p.n_layers, p.d_model)
    m = ml_collections.ConfigDict(
      dict(n_layers=p.n_layers, d_model=p.d_model, d_ff=4 * p.d_model, vocab_size=50257)
    )
    tokens = p.batch * seq_len
    stream_s = STREAM_BYTES_PER_PARAM * params / CS2_IO_BYTES_PER_S
    compute_s = analysis.flops_per_token(m, seq_len) * tokens / CS2_PEAK_FLOPS
    rows.append(
      {
        "model": name,
        "params": params,
        "batch": p.batch,
        "tokens_per_step": tokens,
        "stream_bytes_per_step": STREAM_BYTES_PER_PARAM * params,
        "stream_s": stream_s,
        "compute_s_at_peak": compute_s,
        "compute_over_stream": compute_s / stream_s,
        "bound": "compute" if compute_s >= stream_s else "streaming",
      }
    )
  return rows
