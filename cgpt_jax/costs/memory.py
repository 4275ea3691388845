"""The analytic memory model: what each byte of training memory per parameter is for, activation
bytes per sequence under full remat, and the gradient accumulation that fits a budget.

The compiled program's own memory (analysis.compiled_memory) is what plans and runs report; this
model chooses settings before anything compiles (experiments/plan_cerebras_gpt.py) and gives the
analytic state bytes their terms (analysis.analytic_state_bytes). Pure arithmetic, no jax.
"""

# Bytes per parameter. Parameters, gradients and optimizer state stay float32 under bf16 compute
# (the forward casts a copy), so every term is 4 bytes per value.
PARAM_BYTES = 4  # the float32 parameters (the master copy)
ADAM_MOMENT_BYTES = 8  # Adam's first and second moments, float32 each
GRAD_BYTES = 4  # the float32 gradient (under grad_accum, the sum carried across micro-steps)
# What persists between steps (the step's donated arguments, a checkpoint): parameters and moments.
# Gradients are produced and consumed inside the step, so they are not state.
STATE_BYTES_PER_PARAM = PARAM_BYTES + ADAM_MOMENT_BYTES  # 12
# What a training step holds besides its activations: the state and, for the update, the gradients.
STEP_BYTES_PER_PARAM = STATE_BYTES_PER_PARAM + GRAD_BYTES  # 16

# Activation elements are float32 on the CPU compiler (it computes bf16 in f32); a GPU would
# keep bf16 activations at 2 bytes, so this over-counts there, on the safe side.
ACTIVATION_BYTES = 4
LOGITS_COPIES = 3  # the logits, their softmax and its gradient, alive together in the head
# Activation memory a micro-step may take per device: half of an 80 GB accelerator, leaving the rest
# for the state, gathered weights and XLA's temporaries.
ACTIVATION_BUDGET = 40e9


def step_state_bytes(n_params: int, split: int) -> float:
  """Per-device bytes of parameters, gradients and Adam moments (STEP_BYTES_PER_PARAM per
  parameter) divided `split` ways (fsdp x tensor x pipe; data replicates them;
  docs/formulas.md#per-device-memory)."""
  return STEP_BYTES_PER_PARAM * n_params / split


def layer_activation_bytes_per_token(
  remat: str,
  d_model: int,
  d_ff: int,
  n_heads: int,
  seq_len: int,
  tensor: int = 1,
  sequence_parallel: bool = False,
) -> float:
  """Bytes one token keeps per block for the backward, ACTIVATION_BYTES each, under a remat policy.
  "full": the block's input [d] (split over tensor under sequence parallelism). "dots": the matmul
  outputs too: QKV (3 d), the scores (heads x T), attention's output and projection (2 d), MLP-in
  (f) and MLP-out (d). "none": Korthikanti et al. (2022)'s 34 d + 5 heads T bytes per token at
  2 bytes per value. All but the block's input split over tensor. These are the lower end of what a
  compiler keeps (XLA adds temporaries), which is the side the search's pruning needs."""
  kept = {
    "full": 0.0,
    "dots": 6 * d_model + d_ff + n_heads * seq_len,
    "none": (34 * d_model + 5 * n_heads * seq_len) / 2 - d_model,
  }[remat]
  block_input = d_model / (tensor if sequence_parallel else 1)
  return ACTIVATION_BYTES * (block_input + kept / tensor)


def logits_bytes_per_token(padded_vocab: int, tensor: int) -> float:
  """LOGITS_COPIES copies of a token's logits [V / Y] (vocab-parallel over Y tensor devices)."""
  return ACTIVATION_BYTES * LOGITS_COPIES * padded_vocab / tensor


def activation_bytes_per_row(
  n_layers: int, d_model: int, seq_len: int, padded_vocab: int, tensor: int
) -> float:
  """Bytes one sequence of a micro-step keeps alive on a device under full remat: every block's
  input [T, d] and LOGITS_COPIES copies of the logits [T, V / Y] (the vocabulary as the model pads
  it, split over Y tensor devices), ACTIVATION_BYTES each. Measured: within 1.2x of the compiled
  temp bytes for 13B."""
  block = layer_activation_bytes_per_token("full", d_model, 0, 0, seq_len)
  return seq_len * (n_layers * block + logits_bytes_per_token(padded_vocab, tensor))


def grad_accum(
  rows: int, per_row: float, state_bytes: float, budget: float = ACTIVATION_BUDGET
) -> int:
  """The fewest micro-steps k dividing the `rows` (sequences) a device gets per step whose
  micro-batch of rows / k sequences, `per_row` bytes each, fits what `budget` leaves beside
  `state_bytes`: fewer micro-steps, fewer weight gathers. One sequence per micro-step (k = rows),
  the least activation memory there is, when none fits."""
  room = budget - state_bytes
  for k in range(1, rows):
    if rows % k == 0 and rows // k * per_row <= room:
      return k
  return rows
