"""The wafer layout: Cerebras weight streaming on a device mesh (docs/wafer.md).

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

# The CS-2 hardware and its streaming table live with the other hardware (costs/roofline.py); the
# plan's `cs2_streaming` field reads them through this module.

MODE = "per-layer all-gather from shards across the wafer"
