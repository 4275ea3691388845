"""Hugging Face GPT-2-format import/export: exact round trips, clear refusals, and (when
transformers and torch are installed, requirements-hf.txt) the same logits as transformers'
GPT2LMHeadModel."""

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from helpers import SMALL_SHAPE, random_params, small_model_cfg

from cgpt_jax import hf
from cgpt_jax import model as model_lib
from cgpt_jax.errors import InputError

VOCAB = SMALL_SHAPE["vocab_size"]  # 65, padded to 128 rows: the padding is exercised


def logits(cfg, params, tokens):
  graphdef, _ = model_lib.abstract_model(cfg)
  return np.asarray(nnx.merge(graphdef, params)(tokens))[..., : cfg.vocab_size]


TOKENS = jax.random.randint(jax.random.key(1), (2, 48), 0, VOCAB)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(folder, cfg, params): a small random model exported once for the tests to read or spoil."""
  cfg = small_model_cfg()
  params = random_params(cfg)
  folder = tmp_path_factory.mktemp("hf") / "model"
  hf.export(params, cfg, folder)
  return folder, cfg, params


def copy(exported, tmp_path):
  folder = tmp_path / "copy"
  shutil.copytree(exported[0], folder)
  return folder


def rewrite(folder, change):
  """Applies `change` to the tensor dict of folder's model.safetensors."""
  tensors = safetensors.numpy.load_file(folder / hf.WEIGHTS)
  change(tensors)
  safetensors.numpy.save_file(tensors, folder / hf.WEIGHTS, metadata={"format": "pt"})


def test_round_trip_is_exact(exported):
  folder, cfg, params = exported
  back = hf.import_params(folder, cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    assert b.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.asarray(back["wte"][...])[VOCAB:].any()  # padding rows
  np.testing.assert_allclose(logits(cfg, back, TOKENS), logits(cfg, params, TOKENS), rtol=1e-5)


def test_config_json_gives_the_same_model(exported):
  folder, cfg, _ = exported
  written = json.loads((folder / hf.CONFIG).read_text())
  assert (
    written["architectures"] == ["GPT2LMHeadModel"] and written["activation_function"] == "gelu"
  )
  assert written["tie_word_embeddings"] and written["n_inner"] == 4 * 64
  assert written["eos_token_id"] is None  # 50256 is no token of a 65-word vocabulary
  overrides = hf.read_config(folder)
  assert overrides == dict(SMALL_SHAPE, d_ff=256, ln_eps=1e-5)
  assert small_model_cfg(**overrides) == cfg


def test_accepts_unprefixed_names_buffers_and_tied_head(exported, tmp_path):
  folder, cfg, params = exported
  folder = copy(exported, tmp_path)

  def as_gpt2_model(tensors):
    for key in list(tensors):
      tensors[key.removeprefix("transformer.")] = tensors.pop(key)
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors["lm_head.weight"] = tensors["wte.weight"]

  rewrite(folder, as_gpt2_model)
  back = hf.import_params(folder, cfg)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
  "spoil, phrases",
  [
    (
      lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"),
      ["transformer.h.1.mlp.c_fc.bias", "missing"],
    ),
    (
      lambda t: t.update({"transformer.h.0.attn.c_attn.weight": np.zeros((64, 190), np.float32)}),
      ["transformer.h.0.attn.c_attn.weight", "shape [64, 190]", "implies [64, 192]"],
    ),
    (
      lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(64, np.float32)}),
      ["does not have", "transformer.h.2.ln_1.weight", "n_layers=2"],
    ),
    (
      lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}),
      ["lm_head.weight differs", "tied"],
    ),
  ],
)
def test_refuses_weights_that_do_not_fit(exported, tmp_path, spoil, phrases):
  folder = copy(exported, tmp_path)
  rewrite(folder, spoil)
  with pytest.raises(InputError) as e:
    hf.import_params(folder, exported[1])
  for phrase in phrases:
    assert phrase in str(e.value)


def test_refuses_missing_and_corrupt_files(exported, tmp_path):
  cfg = exported[1]
  with pytest.raises(InputError, match="no such folder"):
    hf.import_params(tmp_path / "nowhere", cfg)
  with pytest.raises(InputError, match="no such folder"):
    hf.read_config(tmp_path / "nowhere")
  folder = copy(exported, tmp_path)
  data = (folder / hf.WEIGHTS).read_bytes()
  (folder / hf.WEIGHTS).write_bytes(data[: len(data) // 2])
  with pytest.raises(InputError, match="model.safetensors: not a readable safetensors file"):
    hf.import_params(folder, cfg)
  (folder / hf.WEIGHTS).unlink()
  with pytest.raises(InputError, match="model.safetensors: missing"):
    hf.import_params(folder, cfg)
  (folder / hf.CONFIG).write_text("{not json")
  with pytest.raises(InputError, match="config.json: not readable as JSON"):
    hf.read_config(folder)


@pytest.mark.parametrize(
  "change, phrases",
  [
    ({"activation_function": "gelu_new"}, ["activation_function='gelu_new'", "exact (erf) GELU"]),
    ({"activation_function": None}, ["activation_function=None"]),
    ({"tie_word_embeddings": False}, ["tie_word_embeddings=false", "output head"]),
    ({"scale_attn_by_inverse_layer_idx": True}, ["scale_attn_by_inverse_layer_idx=true"]),
    ({"model_type": "gpt_neox"}, ["model_type='gpt_neox'"]),
    ({"n_head": 5}, ["n_head=5 does not divide n_embd=64"]),
    ({"n_layer": None}, ["n_layer=None must be a positive integer"]),
  ],
)
def test_refuses_unsupported_config(exported, tmp_path, change, phrases):
  folder = copy(exported, tmp_path)
  c = json.loads((folder / hf.CONFIG).read_text())
  c.update(change)
  (folder / hf.CONFIG).write_text(json.dumps(c))
  with pytest.raises(InputError) as e:
    hf.read_config(folder)
  for phrase in phrases:
    assert phrase in str(e.value)


def test_missing_activation_means_gpt2s_tanh_gelu(exported, tmp_path):
  folder = copy(exported, tmp_path)
  c = json.loads((folder / hf.CONFIG).read_text())
  del c["activation_function"]  # transformers then uses GPT2Config's default, gelu_new
  (folder / hf.CONFIG).write_text(json.dumps(c))
  with pytest.raises(InputError, match="gelu_new"):
    hf.read_config(folder)


def test_export_refuses_to_overwrite(exported):
  folder, cfg, params = exported
  before = {name: (folder / name).read_bytes() for name in (hf.CONFIG, hf.WEIGHTS)}
  with pytest.raises(InputError, match="already holds config.json and model.safetensors"):
    hf.export(params, cfg, folder)
  assert {name: (folder / name).read_bytes() for name in before} == before


def test_export_refuses_mup_and_mismatched_params(exported, tmp_path):
  mup = small_model_cfg(mup=True)
  with pytest.raises(
    InputError, match="cannot export to GPT-2 format, which has no muP multipliers"
  ):
    hf.export(random_params(mup), mup, tmp_path / "mup")
  with pytest.raises(InputError, match="muP"):
    hf.import_params(exported[0], mup)
  with pytest.raises(InputError, match=r"wpe is \[64, 64\], the config implies \[32, 64\]"):
    hf.export(exported[2], small_model_cfg(n_positions=32), tmp_path / "other")
  assert not (tmp_path / "mup").exists() and not (tmp_path / "other").exists()  # refused up front


# ----------------------------------------------------------------------------------------------
# Cross-check against transformers (optional extra: requirements-hf.txt)
# ----------------------------------------------------------------------------------------------
def hf_logits(model, tokens):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def test_transformers_model_imports_with_same_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.GPT2Config(
    n_embd=64,
    n_layer=2,
    n_head=4,
    vocab_size=VOCAB,
    n_positions=64,
    activation_function="gelu",
    tie_word_embeddings=True,
    n_inner=None,
  )
  theirs = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # biases and norms start at 0 and 1: randomise them so a swap would show
    for p in theirs.parameters():
      p.add_(0.05 * torch.randn_like(p))
  theirs.save_pretrained(tmp_path, safe_serialization=True)
  cfg = small_model_cfg(**hf.read_config(tmp_path))
  ours = logits(cfg, hf.import_params(tmp_path, cfg), TOKENS)
  np.testing.assert_allclose(ours, hf_logits(theirs, TOKENS), atol=1e-4)


def test_export_loads_in_transformers_with_same_logits(exported, tmp_path):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  folder, cfg, params = exported
  ours = logits(cfg, params, TOKENS)
  theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
  np.testing.assert_allclose(hf_logits(theirs, TOKENS), ours, atol=1e-4)
  theirs.save_pretrained(tmp_path, safe_serialization=True)  # their writer's names and layout
  again = logits(cfg, hf.import_params(tmp_path, cfg), TOKENS)
  np.testing.assert_allclose(again, ours, rtol=1e-5)
