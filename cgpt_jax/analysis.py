"""What a run costs: model FLOPs, byte counts, the compiled program's memory and FLOPs, the matmul peak.

Exact figures (FLOPs, bytes, memory) come from shapes and from the compiled program; the one timing
here, the matmul peak, is measured in the same process as the run it is compared with, so MFU on a
noisy shared CPU compares like with like.
"""
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def matmul_params(m: ml_collections.ConfigDict) -> int:
  """Parameters that take part in a matmul: the layer matrices and the tied output head."""
  return m.n_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff) + m.vocab_size * m.d_model


def flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> int:
  """Training FLOPs per token: 6 N_matmul (forward + backward) plus causal-agnostic attention
  12 L T d (REFERENCE.md §2). Biases, layer norms and softmax are left out, as in the usual MFU."""
  return 6 * matmul_params(m) + 12 * m.n_layers * seq_len * m.d_model


def tree_bytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


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
  memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                           - memory["alias_bytes"] + memory["temp_bytes"])
  return memory


def measure_matmul_peak(n: int = 2048, seconds: float = 1.0) -> float:
  """Sustained FLOP/s of back-to-back float32 n x n matmuls on the default device: MFU's denominator.

  2048 reaches the BLAS plateau here (1024 read 15-30% lower and noisier). Sustained over a second
  rather than the fastest single call, which caught short turbo bursts up to 1.4x higher.
  """
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  reps, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds or reps < 3:
    f(a).block_until_ready()
    reps += 1
  return 2 * n**3 * reps / elapsed
