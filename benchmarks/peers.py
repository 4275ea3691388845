"""Our train step against Hugging Face's GPT-2 (transformers.GPT2LMHeadModel + torch.optim.AdamW),
side by side: the same shapes, the same batches, in one process on this machine.

  python benchmarks/peers.py --workdir runs/peers                    # every shape
  python benchmarks/peers.py --workdir runs/peers --shapes=char --steps=20

Shapes: `char` is the default experiment (experiments/shakespeare_char.py); `4l256` and `2l768`
are the Cerebras-GPT recipe (config.cerebras_gpt("111m")) narrowed or cut short, on the GPT-2
vocabulary.
The peer is the same model: GPT-2's graph with our widths, exact GELU, tied head, no dropout, layer
norm eps 1e-5, AdamW with our lr, betas, eps and weight decay (on matrices and embeddings only, as
optim.DECAYED), the gradient norm clipped as ours. Both MFUs are model FLOPs/s
(analysis.flops_per_token, one formula for both) over the float32 matmul peak measured once here.
Without torch and transformers (requirements-hf.txt) the peer is skipped and ours still reported.
Writes WORKDIR/report.md and WORKDIR/report.json.
"""

import dataclasses
import os
import pathlib

from cgpt_jax import malloc

if __name__ == "__main__":  # launch.py's allocator setting, for both sides
  malloc.reexec_with_tuned_malloc()

# Everything else after the re-exec above, so that the first process does not import jax for
# nothing.
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from cgpt_jax import config as config_lib  # noqa: E402
from cgpt_jax import (
  presets,  # noqa: E402
  sweep,  # noqa: E402
)
from cgpt_jax.costs import analysis  # noqa: E402
from cgpt_jax.train import setup, step_functions  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

CHAR_VOCAB = 65  # tiny Shakespeare's distinct characters: the default experiment's vocabulary


def char_config() -> ml_collections.ConfigDict:
  return sweep.load_experiment(str(REPO / "experiments/shakespeare_char.py")).get_config()


def gpt2_config(n_layers: int, d_model: int, n_heads: int, batch: int, seq_len: int):
  """Cerebras-GPT 111M's recipe at another shape. The preset only fills the fields left unset
  (config.resolve_model), so the widths given here stand."""

  def make():
    c = config_lib.cerebras_gpt("111m")
    c.model.n_layers, c.model.d_model, c.model.n_heads = n_layers, d_model, n_heads
    c.data.global_batch, c.data.seq_len = batch, seq_len
    return c

  return make


@dataclasses.dataclass(frozen=True)
class Shape:
  make: Callable[[], ml_collections.ConfigDict]
  vocab: int
  steps: int  # timed steps unless --steps says otherwise: a few seconds of work or more


SHAPES = {
  "char": Shape(char_config, CHAR_VOCAB, 100),
  "4l256": Shape(gpt2_config(4, 256, 4, 8, 256), presets.GPT2_VOCAB, 10),
  "2l768": Shape(gpt2_config(2, 768, 12, 8, 256), presets.GPT2_VOCAB, 10),
}

_WORKDIR = flags.DEFINE_string("workdir", "runs/peers", "Where the report goes.")
_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to time, of: {', '.join(SHAPES)}.")
_STEPS = flags.DEFINE_integer(
  "steps", None, "Timed steps per side and shape (default: the shape's).", lower_bound=1
)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per side first.", lower_bound=1)
flags.register_validator(
  "shapes",
  lambda names: bool(names) and set(names) <= set(SHAPES),
  f"--shapes must name one or more of: {', '.join(SHAPES)}",
)


def token_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
  """n random [batch, seq_len + 1] token rows (inputs and their next tokens), the same for both."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32) for _ in range(n)]


def time_ours(s: setup.Setup, batches: list[np.ndarray], warmup: int) -> dict:
  """Seconds of our compiled train step over batches[warmup:], each waited for."""
  state = setup.make_init(s)()
  struct = jax.ShapeDtypeStruct(batches[0].shape, jnp.int32, sharding=s.batch_sharding)
  start = time.perf_counter()
  step = step_functions.make_train_step(s).lower(state, struct).compile()
  compile_s = time.perf_counter() - start
  for i, rows in enumerate(batches):
    if i == warmup:
      start = time.perf_counter()
    state, metrics = step(state, jax.device_put(rows, s.batch_sharding))
    jax.block_until_ready((state, metrics))
  return {
    "seconds": time.perf_counter() - start,
    "compile_s": compile_s,
    "final_loss": float(metrics["loss"]),
  }


def time_peer(
  torch, transformers, cfg: ml_collections.ConfigDict, batches: list[np.ndarray], warmup: int
) -> dict:
  """Seconds of transformers' GPT-2 training step (forward, backward, clip, AdamW, zero_grad) over
  batches[warmup:]."""
  m, o = cfg.model, cfg.optim
  torch.manual_seed(cfg.train.seed)
  model = transformers.GPT2LMHeadModel(
    transformers.GPT2Config(
      n_layer=m.n_layers,
      n_embd=m.d_model,
      n_head=m.n_heads,
      n_inner=m.d_ff,
      vocab_size=m.vocab_size,
      n_positions=m.n_positions,
      activation_function="gelu",
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      layer_norm_epsilon=m.ln_eps,
      tie_word_embeddings=True,
      use_cache=False,
      bos_token_id=None,
      eos_token_id=None,
    )
  ).train()  # GPT-2's 50256 is outside a char vocabulary
  params = list(model.parameters())  # the tied head is the embedding: listed once
  # Matrices and embeddings are the 2-D parameters; biases and layer norms the 1-D ones.
  optimizer = torch.optim.AdamW(
    [
      {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ],
    lr=o.lr,
    betas=(o.b1, o.b2),
    eps=o.eps,
  )
  for i, rows in enumerate(batches):
    if i == warmup:
      start = time.perf_counter()
    # transformers shifts the labels itself: the same T inputs as ours, the loss over T - 1 of them.
    inputs = torch.from_numpy(rows[:, :-1]).long()
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    final_loss = loss.item()  # waits for the step
  return {
    "seconds": time.perf_counter() - start,
    "final_loss": final_loss,
    "attention": model.config._attn_implementation,
  }


def import_peer():
  """(torch, transformers), or None with the line that says why the peer is skipped."""
  try:
    import torch
    import transformers
  except ImportError:
    print("peer skipped: torch/transformers not installed (pip install -r requirements-hf.txt)")
    return None
  torch.set_num_threads(os.cpu_count())
  return torch, transformers


def torch_matmul_peak(torch, n: int = 2048, seconds: float = 1.0) -> float:
  """analysis.measure_matmul_peak for torch's own float32 matmul (its BLAS, not XLA's): what the
  peer's GEMMs can reach here, so each side's MFU can be read against its own library too."""
  a = torch.ones((n, n))
  return analysis.sustained_rate(lambda: torch.matmul(a, a), 2 * n**3, seconds)  # torch is eager


def measure(name: str, peer, peak: float) -> dict:
  shape = SHAPES[name]
  s = setup.build(shape.make(), shape.vocab)
  m, d = s.cfg.model, s.cfg.data
  steps = _STEPS.value or shape.steps
  batches = token_batches(_WARMUP.value + steps, d.global_batch, d.seq_len, shape.vocab)
  ours = time_ours(s, batches, _WARMUP.value)
  tokens = steps * d.global_batch * d.seq_len
  flops_per_token = analysis.flops_per_token(m, d.seq_len)
  result = {
    "n_layers": m.n_layers,
    "d_model": m.d_model,
    "n_heads": m.n_heads,
    "vocab_size": m.vocab_size,
    "batch": d.global_batch,
    "seq_len": d.seq_len,
    "steps": steps,
    "flops_per_token": flops_per_token,
    "ours": ours,
    "peer": None,
  }
  sides = [ours]
  if peer:
    result["peer"] = time_peer(*peer, s.cfg, batches, _WARMUP.value)
    sides.append(result["peer"])
  for side in sides:
    side["tokens_per_s"] = tokens / side["seconds"]
    side["mfu"] = side["tokens_per_s"] * flops_per_token / peak
  if peer:
    result["ratio"] = ours["tokens_per_s"] / result["peer"]["tokens_per_s"]
  print(
    f"{name}: ours {ours['tokens_per_s']:,.0f} tokens/s"
    + (f", peer {result['peer']['tokens_per_s']:,.0f}" if peer else ""),
    flush=True,
  )
  return result


def table(results: dict, peak: float, versions: dict) -> list[str]:
  peer = "transformers GPT2LMHeadModel + torch AdamW"
  lines = [
    f"# cgpt-jax vs {peer}, same shapes, same process",
    "",
    f"{os.cpu_count()} CPUs, jax {versions['jax']} on {versions['jax_device']}"
    + (
      f", torch {versions['torch']}, transformers {versions['transformers']}"
      if "torch" in versions
      else "; peer skipped (torch/transformers not installed)"
    )
    + f". MFU = model FLOPs/s over the float32 matmul peak measured here: "
    f"{peak / 1e9:.1f} GFLOP/s.",
    "",
    "| shape | layers x d (heads) | vocab | batch x seq | steps | ours tokens/s | "
    "peer tokens/s | ours / peer | ours MFU | peer MFU |",
    "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in results.items():
    p = r["peer"]
    ours = r["ours"]
    theirs = (
      f"{p['tokens_per_s']:,.0f} | {r['ratio']:.2f} | {ours['mfu']:.3f} | {p['mfu']:.3f}"
      if p
      else f"skipped | | {ours['mfu']:.3f} |"
    )
    lines.append(
      f"| {name} | {r['n_layers']} x {r['d_model']} ({r['n_heads']}) | "
      f"{r['vocab_size']} | {r['batch']} x {r['seq_len']} | {r['steps']} | "
      f"{ours['tokens_per_s']:,.0f} | {theirs} |"
    )
  attention = {r["peer"]["attention"] for r in results.values() if r["peer"]}
  if attention:
    lines += ["", f"Peer attention implementation: {', '.join(sorted(attention))}."]
  return lines


def main(_):
  out = common.fresh_workdir(_WORKDIR.value)
  peer = import_peer()
  versions = {"jax": jax.__version__, "jax_device": jax.devices()[0].device_kind}
  if peer:
    versions.update(torch=peer[0].__version__, transformers=peer[1].__version__)
  peak = analysis.measure_matmul_peak()
  peer_peak = torch_matmul_peak(peer[0]) if peer else None
  results = {name: measure(name, peer, peak) for name in _SHAPES.value}
  report = {
    "matmul_peak_flops": peak,
    "peer_matmul_peak_flops": peer_peak,
    "cpus": os.cpu_count(),
    "versions": versions,
    "peer_skipped": peer is None,
    "shapes": results,
  }
  lines = table(results, peak, versions)
  if peer:
    lines += [
      "",
      f"torch's own float32 matmul, measured the same way: {peer_peak / 1e9:.1f} GFLOP/s, "
      f"{peer_peak / peak:.2f}x XLA's. Against it the peer's MFU is "
      + ", ".join(f"{n} {r['peer']['mfu'] * peak / peer_peak:.3f}" for n, r in results.items())
      + ".",
    ]
  common.write_report(out, lines, report)


if __name__ == "__main__":
  app.run(main)
