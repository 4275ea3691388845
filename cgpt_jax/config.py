"""Config schema and validation (the model presets: presets.py).

Experiment files (`experiments/*.py`) return `base_config()` with their own values filled in; the
launcher applies `--config.KEY=VALUE` overrides, then `resolve()` fills what a preset implies and
checks every number a user can get wrong, raising `InputError` (exit 2) before anything compiles.
"""

import math

import ml_collections
from ml_collections import config_dict

from cgpt_jax import mup, presets
from cgpt_jax.errors import InputError

TOKENIZERS = ("char", "bytes", "gpt2")
DECAYS = ("cosine", "linear", "constant")
REMAT = ("none", "full", "dots")
OPTIMIZERS = ("adamw", "adafactor")
DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")


def _model_defaults(c: ml_collections.ConfigDict) -> None:
  """The model's shape, initialisation, parameterisation and compute knobs."""
  c.model = dict(
    preset="",  # a key of presets.PRESETS, or "" to give every shape field by hand
    n_layers=config_dict.placeholder(int),
    d_model=config_dict.placeholder(int),
    n_heads=config_dict.placeholder(int),
    d_ff=config_dict.placeholder(int),  # default 4 * d_model
    vocab_size=config_dict.placeholder(int),  # default: the tokenizer's
    vocab_multiple=128,  # the embedding table is padded to this so a tensor axis splits it
    n_positions=2048,
    init_std=config_dict.placeholder(float),  # embeddings; 0.02, or 0.08 under muP
    hidden_init_std=config_dict.placeholder(float),  # QKV, MLP-in: init_std, or init_std/sqrt(m)
    # Cerebras: 0.02/sqrt(2L) up to 590M, 0.0025 from 1.3B; muP 0.08/sqrt(2 m L) (docs/mup.md).
    residual_init_std=config_dict.placeholder(float),
    # muP (docs/mup.md), m = d_model / mup_base_width: hidden matrices' Adam LR / m, logits / m,
    # attention scores / d_head, embedding output x embed_multiplier. The derived multipliers
    # below are filled in by resolve(); set them by hand only to experiment.
    mup=config_dict.placeholder(bool),  # default: the preset's (the "-mup" presets), else False
    mup_base_width=mup.BASE_WIDTH,
    embed_multiplier=config_dict.placeholder(float),  # 10 under muP, else 1
    output_multiplier=config_dict.placeholder(float),  # 1/m under muP, else 1
    attention_scale=config_dict.placeholder(float),  # 1/d_head under muP, else 1/sqrt(d_head)
    hidden_lr_multiplier=config_dict.placeholder(float),  # 1/m under muP, else 1
    # Compute dtype. Parameters, optimizer state, layer norms, softmax and the loss stay float32.
    dtype="float32",
    ln_eps=1e-5,
    remat="none",  # "full": recompute each block in the backward; "dots": all but its matmuls
    scan_unroll=1,  # layers unrolled per scan iteration; >= n_layers unrolls fully
    grad_barrier=True,  # optimization barrier on the residual gradient (docs/speed.md#cpu-levers)
  )


def _data_defaults(c: ml_collections.ConfigDict) -> None:
  """The corpus, tokenizer and batches."""
  c.data = dict(
    source="../shared/data/tinyshakespeare/input.txt",  # file, glob, folder or tfds:NAME
    tokenizer="char",
    tokenizer_path="../shared/data/gpt2",  # folder with encoder.json + vocab.bpe (gpt2 only)
    data_dir="",  # TFDS data_dir; "" = $CGPT_DATA_DIR or ~/.cache/cgpt_jax/tfds
    seq_len=64,
    global_batch=12,
    eval_batch=config_dict.placeholder(int),  # default global_batch
    eval_batches=0,  # 0 = the whole validation split
    seed=0,  # shuffling of training windows
    allow_binary=False,  # train on files that look binary (NUL or many control bytes)
  )


def _optim_defaults(c: ml_collections.ConfigDict) -> None:
  """AdamW or Adafactor, and the learning rate's warm-up and decay."""
  c.optim = dict(
    name="adamw",  # or "adafactor"
    lr=1e-3,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.1,  # on weight matrices and embeddings only
    clip_norm=1.0,
    warmup_steps=100,
    decay="cosine",  # the learning rate after warm-up: cosine, linear or constant
    final_lr_fraction=0.1,
    # Used when name="adafactor" (Shazeer & Stern 2018, via optax.adafactor). lr, the schedule,
    # weight_decay (x lr, as AdamW's) and clip_norm (before it) apply as for AdamW.
    adafactor=dict(
      factored=True,  # second moments as row and column means of the two largest dims
      factor_min_dim=128,  # factor only if both of those dims are at least this big
      decay_rate=0.8,  # second-moment decay 1 - t^-0.8
      clip_threshold=1.0,  # clip each update's RMS to this; 0 = off
      momentum=0.0,  # first moment (extra memory); 0 = none, as in the paper
      parameter_scale=True,  # step relative to each parameter's RMS
      relative_step=False,  # step min(lr, 1/sqrt(t)) instead of the schedule
    ),
  )


def _train_defaults(c: ml_collections.ConfigDict) -> None:
  """The loop, its checkpoints and its starting weights."""
  c.train = dict(
    steps=2000,
    # Micro-steps per optimizer step: data.global_batch is split into this many slices whose
    # gradients are summed in a scan inside the step, so activations are those of one slice.
    grad_accum=1,
    seed=0,  # parameter initialisation
    log_every=10,
    eval_every=250,
    progress=True,
    # A step whose loss, gradient norm or new parameters are not all finite never changes the
    # state. "stop": the run ends there (exit 3) after saving the last finite state; "skip": the
    # update is dropped and training goes on, up to max_skips steps in a row.
    on_nonfinite="stop",
    max_skips=10,
  )
  # orbax, in WORKDIR/checkpoints (checkpoint.py): rerunning the same command resumes from the last.
  c.checkpoint = dict(
    every=500,  # save every this many steps (asynchronously) and at the last step; 0 = never
    keep=3,  # the most recent this many are kept
  )
  # Starting weights: "" = random init (train.seed), or a GPT-2-format folder (config.json +
  # model.safetensors, e.g. a Cerebras-GPT release) to fine-tune; its config sets the model shape.
  c.init = dict(from_hf="")


def _mode_defaults(c: ml_collections.ConfigDict) -> None:
  """launch.py's modes that act on a trained run."""
  # launch.py --mode=eval: sliding-window loss of the latest checkpoint (perplexity.py); windows of
  # data.seq_len tokens, data.eval_batch at a time.
  c.evaluate = dict(
    text="",  # a UTF-8 text file; "" = the training data's validation split
    stride=config_dict.placeholder(int),  # default data.seq_len // 2
  )
  # launch.py --mode=generate: a continuation of `prompt` with a KV cache (generate.py).
  c.generate = dict(
    prompt="",
    max_new_tokens=200,
    method="sample",  # greedy | sample | beam
    temperature=0.8,
    top_k=0,  # 0 = off
    top_p=1.0,  # 1 = off
    num_beams=4,
    length_penalty=1.0,
    no_repeat_ngram_size=0,  # 0 = off
    seed=0,
  )
  # launch.py --mode=export_hf: the latest checkpoint in GPT-2 format ("" = WORKDIR/hf).
  c.export = dict(hf_dir="")


def _mesh_defaults(c: ml_collections.ConfigDict) -> None:
  """The layout and, when mesh.pipe > 1, the pipeline schedule."""
  c.mesh = dict(
    layout="single",
    data=config_dict.placeholder(int),
    pipe=config_dict.placeholder(int),
    fsdp=config_dict.placeholder(int),
    context=config_dict.placeholder(int),  # context parallelism: the sequence split N ways
    tensor=config_dict.placeholder(int),
  )
  # Used when mesh.pipe > 1 (pipeline.py, pipeline_1f1b.py; bubbles in timeline.py).
  c.pipeline = dict(
    # gpipe (bubble (S-1)/(M+S-1)), circular (each microbatch goes round the stages `repeats`
    # times: (S-1)/(M R+S-1)), 1f1b (GPipe's bubble, at most S microbatches held),
    # interleaved_1f1b (circular's bubble, Megatron's order), zb_h1 (about a third of 1F1B's)
    schedule="gpipe",
    microbatches=4,  # M >= S
    repeats=1,  # R, circular and interleaved_1f1b; layers = R x S x layers per stage
  )


def base_config() -> ml_collections.ConfigDict:
  """Every key a run understands, with defaults. Typed placeholders mean "derived in resolve()"."""
  c = ml_collections.ConfigDict()
  for section in (
    _model_defaults,
    _data_defaults,
    _optim_defaults,
    _train_defaults,
    _mode_defaults,
    _mesh_defaults,
  ):
    section(c)
  return c


def _fail(key: str, value, why: str, fix: str):
  raise InputError(f"config {key}={value!r}: {why}. {fix}")


def resolve_model(model: ml_collections.ConfigDict) -> None:
  """Fills shape fields from the preset and checks them (in place)."""
  if model.preset:
    if model.preset not in presets.PRESETS:
      _fail(
        "model.preset",
        model.preset,
        "unknown preset",
        f"Choose one of: {', '.join(presets.PRESETS)}.",
      )
    p = presets.PRESETS[model.preset]
    for key, value in (
      ("n_layers", p.n_layers),
      ("d_model", p.d_model),
      ("n_heads", p.n_heads),
      ("mup", p.mup),
    ):
      if model[key] is None:
        model[key] = value
  for key in ("n_layers", "d_model", "n_heads"):
    if model[key] is None:
      _fail(
        f"model.{key}",
        None,
        "not set and no preset given",
        f"Set --config.model.preset (one of {', '.join(presets.PRESETS)}) or --config.model.{key}.",
      )
    if model[key] <= 0:
      _fail(f"model.{key}", model[key], "must be positive", "Give a positive integer.")
  if model.d_ff is None:
    model.d_ff = 4 * model.d_model
  if model.d_model % model.n_heads:
    _fail(
      "model.n_heads",
      model.n_heads,
      f"does not divide d_model={model.d_model}",
      "Pick a head count that divides d_model.",
    )
  resolve_parameterisation(model)
  check_model_values(model)


def check_model_values(model: ml_collections.ConfigDict) -> None:
  """The knobs past the shape: remat, padding, unroll, dtype, positions and the init scales."""
  if model.remat not in REMAT:
    _fail("model.remat", model.remat, "unknown remat policy", f"Choose one of: {', '.join(REMAT)}.")
  if model.vocab_multiple < 1:
    _fail(
      "model.vocab_multiple", model.vocab_multiple, "must be >= 1", "E.g. 128 (Megatron's default)."
    )
  if model.scan_unroll < 1:
    _fail(
      "model.scan_unroll",
      model.scan_unroll,
      "must be >= 1",
      "Use 1 for a rolled scan or n_layers to unroll fully.",
    )
  if model.dtype not in DTYPES:
    _fail(
      "model.dtype", model.dtype, "unknown compute dtype", f"Choose one of: {', '.join(DTYPES)}."
    )
  if not model.n_positions > 0:
    _fail(
      "model.n_positions",
      model.n_positions,
      "must be positive",
      "Give at least data.seq_len positions, e.g. --config.model.n_positions=2048.",
    )
  if not (math.isfinite(model.ln_eps) and model.ln_eps > 0):
    _fail(
      "model.ln_eps",
      model.ln_eps,
      "must be a positive number (it keeps layer norm's division away from zero)",
      "GPT-2's is 1e-5.",
    )
  for key in ("init_std", "hidden_init_std", "residual_init_std"):
    if not (math.isfinite(model[key]) and model[key] >= 0):
      _fail(
        f"model.{key}",
        model[key],
        "must be a finite number >= 0",
        "Leave it unset for the preset's rule.",
      )


def resolve_parameterisation(model: ml_collections.ConfigDict) -> None:
  """Init scales and multipliers: standard (Cerebras-GPT) or muP (docs/mup.md#the-rules)."""
  model.mup = bool(model.mup)
  if model.mup_base_width <= 0:
    _fail("model.mup_base_width", model.mup_base_width, "must be positive", "muP's base is 256.")
  big = model.preset in presets.CEREBRAS_GPT and presets.CEREBRAS_GPT[model.preset].d_model >= 2048
  for key, value in mup.parameterisation(model, big_residual_rule=big).items():
    if model[key] is None:
      model[key] = value


def resolve_adafactor(o: ml_collections.ConfigDict) -> None:
  a = o.adafactor
  if o.name != "adafactor":
    if a.relative_step:
      _fail(
        "optim.adafactor.relative_step",
        True,
        "is an Adafactor option",
        "Set --config.optim.name=adafactor or drop it.",
      )
    return
  if a.factor_min_dim < 1:
    _fail(
      "optim.adafactor.factor_min_dim", a.factor_min_dim, "must be >= 1", "optax's default is 128."
    )
  if not 0 < a.decay_rate <= 1:
    _fail("optim.adafactor.decay_rate", a.decay_rate, "must be in (0, 1]", "The paper uses 0.8.")
  if a.clip_threshold and a.clip_threshold < 1:
    _fail(
      "optim.adafactor.clip_threshold",
      a.clip_threshold,
      "must be >= 1, or 0 for none",
      "The paper uses 1.0.",
    )
  if not 0 <= a.momentum < 1:
    _fail(
      "optim.adafactor.momentum", a.momentum, "must be in [0, 1)", "Use 0 for none or e.g. 0.9."
    )


def resolve_optimizer_values(o: ml_collections.ConfigDict) -> None:
  """Numbers under which the optimizer diverges at once or computes nonsense."""
  if not (math.isfinite(o.lr) and o.lr >= 0):
    _fail("optim.lr", o.lr, "must be a finite number >= 0", "E.g. --config.optim.lr=6e-4.")
  for key in ("b1", "b2"):
    if not 0 <= o[key] < 1:
      _fail(
        f"optim.{key}",
        o[key],
        "must be in [0, 1) (a moment's decay)",
        "Cerebras-GPT uses b1=0.9, b2=0.95.",
      )
  for key, example in (("eps", "1e-8"), ("weight_decay", "0.1, or 0 for none")):
    if not (math.isfinite(o[key]) and o[key] >= 0):
      _fail(f"optim.{key}", o[key], "must be a finite number >= 0", f"E.g. {example}.")
  if not (math.isfinite(o.clip_norm) and o.clip_norm > 0):  # 0 would scale every update to 0
    _fail(
      "optim.clip_norm",
      o.clip_norm,
      "must be a positive number (the global gradient norm is clipped to it)",
      "Cerebras-GPT uses 1.0; a large value such as 1e9 clips nothing.",
    )


def resolve(c: ml_collections.ConfigDict, vocab_size: int) -> ml_collections.ConfigDict:
  """Fills derived values and validates the whole config; `vocab_size` is the tokenizer's."""
  resolve_model(c.model)
  if c.model.vocab_size is None:
    c.model.vocab_size = vocab_size
  elif c.model.vocab_size < vocab_size:
    _fail(
      "model.vocab_size",
      c.model.vocab_size,
      f"is smaller than the {c.data.tokenizer} tokenizer's vocabulary ({vocab_size})",
      "Leave it unset to use the tokenizer's size.",
    )
  resolve_data(c)
  resolve_optimizer(c.optim)
  resolve_train(c)
  return c


def resolve_data(c: ml_collections.ConfigDict) -> None:
  d = c.data
  if d.tokenizer not in TOKENIZERS:
    _fail(
      "data.tokenizer", d.tokenizer, "unknown tokenizer", f"Choose one of: {', '.join(TOKENIZERS)}."
    )
  if d.seq_len <= 0 or d.seq_len > c.model.n_positions:
    _fail(
      "data.seq_len",
      d.seq_len,
      f"must be in 1..model.n_positions ({c.model.n_positions})",
      f"Use --config.data.seq_len<={c.model.n_positions} or raise --config.model.n_positions.",
    )
  if d.global_batch <= 0:
    _fail("data.global_batch", d.global_batch, "must be positive", "Give a positive batch size.")
  if d.eval_batch is None:
    d.eval_batch = d.global_batch
  for key, low, example in (
    ("eval_batch", 1, "the global batch"),
    ("eval_batches", 0, "20, or 0 for the whole validation split"),
    ("seed", 0, "0"),
  ):
    if d[key] < low:
      _fail(f"data.{key}", d[key], f"must be >= {low}", f"E.g. {example}.")


def resolve_optimizer(o: ml_collections.ConfigDict) -> None:
  if o.name not in OPTIMIZERS:
    _fail("optim.name", o.name, "unknown optimizer", f"Choose one of: {', '.join(OPTIMIZERS)}.")
  resolve_adafactor(o)
  resolve_optimizer_values(o)
  if o.decay not in DECAYS:
    _fail("optim.decay", o.decay, "unknown decay", f"Choose one of: {', '.join(DECAYS)}.")
  if not 0 <= o.final_lr_fraction <= 1:
    _fail("optim.final_lr_fraction", o.final_lr_fraction, "must be in [0, 1]", "E.g. 0.1.")


def resolve_train(c: ml_collections.ConfigDict) -> None:
  """The loop's knobs, and those that depend on the batch and the step count."""
  d, o, t = c.data, c.optim, c.train
  if t.steps <= 0:
    _fail("train.steps", t.steps, "must be positive", "Give the number of optimizer steps.")
  if t.grad_accum < 1 or d.global_batch % t.grad_accum:
    _fail(
      "train.grad_accum",
      t.grad_accum,
      f"must be a positive divisor of data.global_batch={d.global_batch}",
      "Choose a micro-step count that divides the batch.",
    )
  if o.warmup_steps < 0 or o.warmup_steps >= t.steps:
    _fail(
      "optim.warmup_steps",
      o.warmup_steps,
      f"must be in [0, train.steps={t.steps})",
      "Shorten the warm-up or train longer.",
    )
  if c.evaluate.stride is not None and not 1 <= c.evaluate.stride <= d.seq_len:
    _fail(
      "evaluate.stride",
      c.evaluate.stride,
      f"must be in 1..data.seq_len ({d.seq_len})",
      "E.g. half the window.",
    )
  if c.checkpoint.every < 0 or c.checkpoint.keep <= 0:
    _fail(
      "checkpoint",
      c.checkpoint.to_dict(),
      "every must be >= 0 and keep positive",
      "E.g. --config.checkpoint.every=500 --config.checkpoint.keep=3 (every=0: no checkpoints).",
    )
  for key in ("log_every", "eval_every"):
    if t[key] <= 0:
      _fail(f"train.{key}", t[key], "must be positive", "Give a step interval.")
  if t.on_nonfinite not in ON_NONFINITE:
    _fail("train.on_nonfinite", t.on_nonfinite, "unknown policy", "Choose stop or skip.")
  if t.max_skips < 1:
    _fail(
      "train.max_skips",
      t.max_skips,
      "must be >= 1 (skipped steps in a row before the run stops)",
      "E.g. 10.",
    )


def cerebras_gpt(size: str) -> ml_collections.ConfigDict:
  """The paper's recipe at one of its sizes (arXiv 2304.03208, docs/cerebras_gpt.md): GPT-2 BPE,
  2048-token sequences, the size's batch and peak LR, AdamW beta=(0.9, 0.95), weight decay 0.1, clip
  1.0, linear warm-up over 375M tokens, then linear or cosine decay to 10% at the Chinchilla budget
  of 20 tokens per parameter. The data is the Gutenberg selection (the Pile is not available
  offline)."""
  sizes = {**presets.CEREBRAS_GPT, **presets.CEREBRAS_GPT_MUP}
  if size not in sizes:
    raise InputError(f"unknown Cerebras-GPT size {size!r}. Choose one of: {', '.join(sizes)}.")
  p = sizes[size]
  c = base_config()
  c.model.preset = size
  c.data.source = "../shared/data/gutenberg"
  c.data.tokenizer = "gpt2"
  c.data.seq_len = 2048
  c.data.global_batch = p.batch
  c.data.eval_batches = 20
  c.optim.lr = p.lr
  c.optim.eps = p.eps
  c.optim.decay = p.decay
  tokens_per_step = p.batch * 2048
  c.optim.warmup_steps = math.ceil(presets.WARMUP_TOKENS / tokens_per_step)
  params = presets.closed_form_params(p.n_layers, p.d_model)
  c.train.steps = math.ceil(presets.TOKENS_PER_PARAM * params / tokens_per_step)
  c.train.eval_every = 1000
  return c
