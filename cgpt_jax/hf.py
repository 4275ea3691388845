"""Hugging Face GPT-2-format checkpoints: import into our parameter tree, export from it.

Cerebras-GPT is published in this format: a folder with config.json (a transformers GPT2Config) and
model.safetensors. GPT-2's graph is ours when the config asks for exact GELU, tied embeddings and
1/sqrt(d_head) attention (read_config checks), and standard parameterisation (no muP multipliers,
which the format cannot express). GPT-2 stores one tensor per layer, Conv1D weights as [in, out] and
attention as [d, 3d] (q|k|v, heads-major); we stack layers on a leading axis and keep q/k/v and
heads as axes of their own. Every conversion is a reshape plus the embedding table's padding rows,
so a round trip is exact.
"""

import json
import math
import os
import pathlib
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from cgpt_jax import model as model_lib
from cgpt_jax import presets
from cgpt_jax.errors import InputError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER_KEY = "cgpt_tokenizer"  # our own entry in config.json; transformers keeps it as is
PREFIX = "transformer."  # GPT2LMHeadModel's; GPT2Model saves the same names without it


class Tensor(NamedTuple):
  """Where one of our parameters is in a GPT-2 checkpoint."""

  name: str  # without PREFIX; layer parameters get "h.{i}." in front
  in_dims: int  # leading axes (after the layer axis) that make a GPT-2 matrix's rows; 0: a vector


TENSORS = {
  ("wte",): Tensor("wte.weight", 1),
  ("wpe",): Tensor("wpe.weight", 1),
  ("ln_f", "scale"): Tensor("ln_f.weight", 0),
  ("ln_f", "bias"): Tensor("ln_f.bias", 0),
  ("blocks", "ln1", "scale"): Tensor("ln_1.weight", 0),
  ("blocks", "ln1", "bias"): Tensor("ln_1.bias", 0),
  ("blocks", "attn", "qkv_kernel"): Tensor("attn.c_attn.weight", 1),  # [d, 3, h, dh] ~ [d, 3d]
  ("blocks", "attn", "qkv_bias"): Tensor("attn.c_attn.bias", 0),
  ("blocks", "attn", "out_kernel"): Tensor("attn.c_proj.weight", 2),  # [h, dh, d] ~ [d, d]
  ("blocks", "attn", "out_bias"): Tensor("attn.c_proj.bias", 0),
  ("blocks", "ln2", "scale"): Tensor("ln_2.weight", 0),
  ("blocks", "ln2", "bias"): Tensor("ln_2.bias", 0),
  ("blocks", "mlp", "fc_kernel"): Tensor("mlp.c_fc.weight", 1),
  ("blocks", "mlp", "fc_bias"): Tensor("mlp.c_fc.bias", 0),
  ("blocks", "mlp", "proj_kernel"): Tensor("mlp.c_proj.weight", 1),
  ("blocks", "mlp", "proj_bias"): Tensor("mlp.c_proj.bias", 0),
}
# Causal-mask buffers that older transformers versions saved with the weights.
BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
HEAD = "lm_head.weight"  # the tied output head: wte again, when saved at all
GPT2_EOT = 50256  # the GPT-2 tokenizer's <|endoftext|> id

# What transformers' GPT2Config assumes for a behaviour field the file leaves out.
GPT2_DEFAULTS = {
  "activation_function": "gelu_new",
  "layer_norm_epsilon": 1e-5,
  "tie_word_embeddings": True,
  "scale_attn_weights": True,
  "scale_attn_by_inverse_layer_idx": False,
  "add_cross_attention": False,
}
# The values our model computes with; any other is a different function.
REQUIRED = {
  "tie_word_embeddings": (True, "our output head is the token embedding"),
  "scale_attn_weights": (True, "our attention scores are scaled by 1/sqrt(d_head)"),
  "scale_attn_by_inverse_layer_idx": (False, "our attention has no per-layer scaling"),
  "add_cross_attention": (False, "our model is decoder-only"),
}
# GPT2Config field -> our model config field, for the shape fields every config must give.
SHAPE_FIELDS = {
  "n_layer": "n_layers",
  "n_embd": "d_model",
  "n_head": "n_heads",
  "vocab_size": "vocab_size",
  "n_positions": "n_positions",
}


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------
def read_config(folder: str | os.PathLike) -> dict:
  """Our model-config overrides (n_layers, d_model, n_heads, d_ff, vocab_size, n_positions, ln_eps)
  from the GPT2Config in `folder`/config.json, refusing any setting our model does not compute."""
  path = _existing(folder, CONFIG)
  try:
    c = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(
      f"{path}: not readable as JSON ({e}). Re-download or re-export the checkpoint."
    ) from None
  if not isinstance(c, dict):
    raise InputError(f"{path}: not a JSON object. Re-download or re-export the checkpoint.")
  if c.get("model_type") != "gpt2":
    raise InputError(
      f"{path}: model_type={c.get('model_type')!r}, only 'gpt2' (the format of "
      "Cerebras-GPT) can be read. Use a GPT-2-format checkpoint."
    )
  c = {**GPT2_DEFAULTS, **c}
  _check_behaviour(c, path)
  out = {ours: _positive_int(c, key, path) for key, ours in SHAPE_FIELDS.items()}
  if out["d_model"] % out["n_heads"]:
    raise InputError(
      f"{path}: n_head={out['n_heads']} does not divide n_embd={out['d_model']}. "
      "Fix the config.json."
    )
  out["d_ff"] = (
    4 * out["d_model"] if c.get("n_inner") is None else _positive_int(c, "n_inner", path)
  )
  eps = c["layer_norm_epsilon"]
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
    raise InputError(
      f"{path}: layer_norm_epsilon={eps!r} must be a positive number. "
      "Fix the config.json (GPT-2's is 1e-05)."
    )
  out["ln_eps"] = float(eps)
  return out


def _check_behaviour(c: dict, path: pathlib.Path) -> None:
  """Refuses settings under which GPT-2 computes a different function from our model."""
  act = c["activation_function"]
  if act != "gelu":
    raise InputError(
      f"{path}: activation_function={act!r} is not supported: our model uses exact (erf) GELU, "
      "transformers' 'gelu'; 'gelu_new' / 'gelu_pytorch_tanh' (GPT-2's default) are the tanh "
      "approximation. Use a checkpoint trained with exact GELU (Cerebras-GPT's configs say 'gelu')."
    )
  for key, (want, why) in REQUIRED.items():
    if c[key] is not want:
      ok = json.dumps(want)
      raise InputError(
        f"{path}: {key}={json.dumps(c[key])} is not supported ({why}); only {ok} "
        f"can be read. Use a checkpoint with {key}={ok}."
      )


def _positive_int(c: dict, key: str, path: pathlib.Path) -> int:
  value = c.get(key)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise InputError(f"{path}: {key}={value!r} must be a positive integer. Fix the config.json.")
  return value


def gpt2_config(cfg: ml_collections.ConfigDict) -> dict:
  """The config.json that makes transformers' GPT2LMHeadModel compute our model `cfg`."""
  return {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_layer": cfg.n_layers,
    "n_embd": cfg.d_model,
    "n_head": cfg.n_heads,
    "n_inner": cfg.d_ff,
    "vocab_size": cfg.vocab_size,
    "n_positions": cfg.n_positions,
    "activation_function": "gelu",
    "layer_norm_epsilon": cfg.ln_eps,
    "initializer_range": cfg.init_std,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "attn_pdrop": 0.0,  # Cerebras-GPT trains without dropout
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "summary_first_dropout": 0.0,
    "use_cache": True,
    # The model config does not know its tokenizer: <|endoftext|> for the GPT-2 vocabulary, and
    # none otherwise rather than transformers' default 50256, which is no token of a smaller one.
    "bos_token_id": GPT2_EOT if cfg.vocab_size == presets.GPT2_VOCAB else None,
    "eos_token_id": GPT2_EOT if cfg.vocab_size == presets.GPT2_VOCAB else None,
  }


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
def import_params(
  folder: str | os.PathLike, model_cfg: ml_collections.ConfigDict, tokenizer: dict | None = None
) -> nnx.State:
  """The parameters of `model_cfg`'s GPT (same tree, shapes and float32 dtype as
  nnx.state(GPT(model_cfg))) from `folder`/model.safetensors. The embedding table's padding rows
  are zeros. Nothing is initialised: the tree comes from abstract shapes. A folder we exported
  records its tokenizer (data.tokenizer_identity): one other than `tokenizer` is refused, as are
  non-finite weights."""
  _check_standard(model_cfg, "import from")
  if tokenizer is not None:
    _check_tokenizer(folder, tokenizer)
  path = _existing(folder, WEIGHTS)
  _, abstract = model_lib.abstract_model(model_cfg)
  flat = list(nnx.to_flat_state(abstract))
  with _open(path) as f:
    ckpt = _Checkpoint(f, path, model_cfg)
    values = {p: ckpt.read(p, v.shape) for p, v in flat}
    ckpt.check_rest(values[("wte",)])
  return nnx.from_flat_state([(p, v.replace(value=jnp.asarray(values[p]))) for p, v in flat])


class _Checkpoint:
  """An open model.safetensors, addressed by GPT-2 names without PREFIX, checked against a
  config."""

  def __init__(self, f, path: pathlib.Path, cfg: ml_collections.ConfigDict):
    self.f, self.path, self.cfg = f, path, cfg
    self.keys = {}  # name without PREFIX -> name as stored
    for key in f.keys():
      name = key.removeprefix(PREFIX)
      if name in self.keys:
        raise InputError(
          f"{path}: tensor {name} is stored twice ({self.keys[name]!r} and {key!r}). "
          "Keep one of them."
        )
      self.keys[name] = key
    self.prefix = PREFIX if any(key.startswith(PREFIX) for key in f.keys()) else ""  # for messages
    self.used = set()

  def read(self, path: tuple, shape: tuple) -> np.ndarray:
    """Our parameter at `path` (of `shape`) from its GPT-2 tensors, as float32."""
    parts = [
      self.tensor(name, hf_shape).reshape(ours)
      for name, hf_shape, ours in _gpt2_tensors(path, shape, self.cfg)
    ]
    value = np.stack(parts) if path[0] == "blocks" else parts[0]
    return _pad_rows(value, shape[0])

  def tensor(self, name: str, shape: tuple) -> np.ndarray:
    if name not in self.keys:
      raise InputError(
        f"{self.path}: tensor {self.prefix}{name} is missing; a GPT-2 checkpoint of "
        f"{_describe(self.cfg)} has it. Check that the weights and the config belong "
        "together."
      )
    key = self.keys[name]
    self.used.add(name)
    value = self.f.get_tensor(key)
    if value.shape != shape:
      raise InputError(
        f"{self.path}: tensor {key} has shape {list(value.shape)}, the config "
        f"({_describe(self.cfg)}) implies {list(shape)}. Use the config.json that came "
        "with these weights."
      )
    value = value.astype(np.float32)
    if not np.isfinite(value).all():
      raise InputError(
        f"{self.path}: tensor {key} holds {np.size(value) - np.isfinite(value).sum()} "
        "non-finite values (nan or inf); these weights come from a diverged run. "
        "Export an earlier, finite checkpoint."
      )
    return value

  def check_rest(self, wte: np.ndarray) -> None:
    """Refuses tensors left over: an untied head, or layers or weights the config does not have."""
    if HEAD in self.keys:
      head = self.tensor(HEAD, (self.cfg.vocab_size, self.cfg.d_model))
      if not np.array_equal(head, wte[: self.cfg.vocab_size]):
        raise InputError(
          f"{self.path}: {self.keys[HEAD]} differs from {self.prefix}wte.weight, but our "
          "output head is tied to the token embedding. Use a checkpoint with tied "
          "embeddings."
        )
    extra = sorted(self.keys[n] for n in self.keys.keys() - self.used if not BUFFERS.fullmatch(n))
    if extra:
      raise InputError(
        f"{self.path}: {len(extra)} tensor(s) that a GPT-2 model of "
        f"{_describe(self.cfg)} does not have, e.g. {extra[0]}. Use the config.json "
        "that came with these weights."
      )


def export(
  params: nnx.State,
  model_cfg: ml_collections.ConfigDict,
  folder: str | os.PathLike,
  tokenizer: dict | None = None,
) -> None:
  """Writes `params` of `model_cfg`'s GPT to `folder` as config.json + model.safetensors, loadable
  by transformers' GPT2LMHeadModel.from_pretrained. Refuses a folder that already holds either file
  (nothing is overwritten) and muP models. `params` may be sharded: they are fetched to the host.
  `tokenizer` (data.tokenizer_identity) is recorded in config.json for import_params to check."""
  _check_standard(model_cfg, "export to")
  flat = _checked_flat(params, model_cfg)
  folder = _new_folder(folder)
  tensors = {}
  for path, v in flat:
    value = np.asarray(jax.device_get(v.get_value()), np.float32)
    for i, (name, hf_shape, ours) in enumerate(_gpt2_tensors(path, v.shape, model_cfg)):
      part = value[i] if path[0] == "blocks" else value[: ours[0]]  # wte: without the padding rows
      tensors[PREFIX + name] = np.ascontiguousarray(part.reshape(hf_shape))
  # Temporary names first, so that a failure never leaves a half-written model in the folder.
  weights, config = folder / (WEIGHTS + ".tmp"), folder / (CONFIG + ".tmp")
  # transformers refuses safetensors files without a "format" entry in their metadata.
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  record = {TOKENIZER_KEY: tokenizer} if tokenizer else {}
  config.write_text(json.dumps({**gpt2_config(model_cfg), **record}, indent=2) + "\n")
  weights.replace(folder / WEIGHTS)
  config.replace(folder / CONFIG)


def _checked_flat(params: nnx.State, cfg: ml_collections.ConfigDict) -> list:
  """params' flat (path, Variable) list, refused unless it is the tree of `cfg`'s GPT."""
  _, abstract = model_lib.abstract_model(cfg)
  want = {p: v.shape for p, v in nnx.to_flat_state(abstract)}
  flat = list(nnx.to_flat_state(params))
  got = {p: tuple(v.shape) for p, v in flat}
  if got != want:
    bad = sorted(want.keys() ^ got.keys()) or [p for p in want if want[p] != got[p]]
    p = bad[0]
    raise InputError(
      f"params do not fit the model config ({_describe(cfg)}): {'.'.join(p)} is "
      f"{list(got[p]) if p in got else 'missing'}, the config implies "
      f"{list(want[p]) if p in want else 'none'}. Pass the config the parameters were "
      "trained with (a pipelined run's: pipeline.from_stages first)."
    )
  return flat


def _gpt2_tensors(path: tuple, shape: tuple, cfg: ml_collections.ConfigDict) -> list:
  """(GPT-2 name, GPT-2 shape, our shape) of the tensors that hold our parameter at `path` of
  `shape`: one per layer for the layer stack, our shape without the padding for the embedding."""
  t = TENSORS[path]
  if path[0] == "blocks":
    return [
      (f"h.{i}.{t.name}", _gpt2_shape(shape[1:], t.in_dims), shape[1:]) for i in range(shape[0])
    ]
  if path == ("wte",):
    shape = (cfg.vocab_size, *shape[1:])
  return [(t.name, _gpt2_shape(shape, t.in_dims), shape)]


def _gpt2_shape(shape: tuple, in_dims: int) -> tuple:
  if not in_dims:
    return (math.prod(shape),)
  return math.prod(shape[:in_dims]), math.prod(shape[in_dims:])


def _pad_rows(value: np.ndarray, rows: int) -> np.ndarray:
  """`value` with zero rows appended up to `rows` (the embedding table's padding)."""
  return np.pad(value, [(0, rows - value.shape[0])] + [(0, 0)] * (value.ndim - 1))


# ----------------------------------------------------------------------------------------------
# Checks shared by import and export
# ----------------------------------------------------------------------------------------------
def _check_standard(cfg: ml_collections.ConfigDict, verb: str) -> None:
  """GPT-2 has no muP multipliers: refuse a model config that uses any."""
  d_head = cfg.d_model // cfg.n_heads
  standard = (
    not cfg.mup
    and cfg.embed_multiplier == 1
    and cfg.output_multiplier == 1
    and math.isclose(cfg.attention_scale, d_head**-0.5, rel_tol=1e-12)
  )
  if not standard:
    raise InputError(
      f"config model.mup={cfg.mup} (embed_multiplier={cfg.embed_multiplier}, output_multiplier="
      f"{cfg.output_multiplier}, attention_scale={cfg.attention_scale}): cannot {verb} GPT-2 "
      "format, which has no muP multipliers. Use a standard-parameterised model (model.mup=False, "
      "multipliers unset)."
    )


def _check_tokenizer(folder: str | os.PathLike, tokenizer: dict) -> None:
  """Refuses a folder whose config.json records another tokenizer than this run's. Folders we did
  not export (Cerebras-GPT's releases) record none: only the vocabulary size is checked for them."""
  path = _existing(folder, CONFIG)
  theirs = json.loads(path.read_text()).get(TOKENIZER_KEY)
  if theirs is not None and theirs != tokenizer:
    raise InputError(
      f"{path}: the model was trained with the {theirs.get('kind')!r} tokenizer "
      f"(sha256 {theirs.get('sha256')}), this run's is {tokenizer['kind']!r} (sha256 "
      f"{tokenizer['sha256']}): the same ids would mean other text. Use the "
      "data.source, data.tokenizer and data.tokenizer_path the model was trained with."
    )


def _describe(cfg: ml_collections.ConfigDict) -> str:
  return (
    f"n_layers={cfg.n_layers}, d_model={cfg.d_model}, n_heads={cfg.n_heads}, d_ff={cfg.d_ff}, "
    f"vocab_size={cfg.vocab_size}, n_positions={cfg.n_positions}"
  )


def _existing(folder: str | os.PathLike, name: str) -> pathlib.Path:
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    what = "not a folder" if folder.exists() else "no such folder"
    raise InputError(
      f"{folder}: {what}. Pass the folder of a Hugging Face GPT-2-format "
      f"checkpoint ({CONFIG} + {WEIGHTS})."
    )
  path = folder / name
  if not path.is_file():
    raise InputError(
      f"{path}: missing. A Hugging Face GPT-2-format checkpoint folder holds {CONFIG} "
      f"and {WEIGHTS}; convert pytorch_model.bin with transformers' save_pretrained("
      "safe_serialization=True) if that is what you have."
    )
  return path


def _open(path: pathlib.Path):
  try:
    return safetensors.safe_open(path, framework="numpy")
  except (safetensors.SafetensorError, OSError) as e:
    raise InputError(
      f"{path}: not a readable safetensors file ({e}). Re-download or re-export the checkpoint."
    ) from None


def _new_folder(folder: str | os.PathLike) -> pathlib.Path:
  """Creates `folder` if need be; refuses one that is a file or already holds a model."""
  folder = pathlib.Path(folder)
  if folder.exists() and not folder.is_dir():
    raise InputError(f"{folder}: exists and is not a folder. Choose another export folder.")
  found = [name for name in (CONFIG, WEIGHTS) if (folder / name).exists()]
  if found:
    raise InputError(
      f"{folder}: already holds {' and '.join(found)}; refusing to overwrite them. "
      "Choose a new export folder or delete the old files."
    )
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise InputError(
      f"{folder}: cannot create the export folder ({e.strerror}). Choose a folder you can write to."
    ) from None
  return folder
