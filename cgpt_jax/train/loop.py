"""One training run: prepare (every input checked, nothing written), compile, loop, summarise.

config -> data -> validated config -> layout -> abstract state and its shardings -> sharded init ->
one AOT-compiled train step -> loop with logging and periodic eval -> summary.json.
"""

import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from cgpt_jax import checkpoint, data, distributed, hf
from cgpt_jax.costs import analysis
from cgpt_jax.errors import Diverged, InputError, Stopped
from cgpt_jax.train import aot_plan, faults, run_dir, run_log, setup, step_functions
from cgpt_jax.train.setup import Setup, TrainState


def check_inputs(cfg: ml_collections.ConfigDict, workdir: str):
  """Every input checked, nothing written: (Setup, workdir, corpus, tokenizer identity,
  checkpointer or None, start step, starting state or None)."""
  out = run_dir.check_workdir(workdir)
  run_dir.check_resumable(out)
  if cfg.init.from_hf:  # the imported checkpoint defines the model's shape
    cfg.model.update(hf.read_config(cfg.init.from_hf))
  with distributed.main_first("data prepared"):
    corpus = setup.load_data(cfg)
  s = setup.build(cfg, corpus.tokenizer.vocab_size)
  cfg = s.cfg
  tokenizer = data.tokenizer_identity(corpus.tokenizer)
  ckpt, start, state = None, 0, None
  if cfg.checkpoint.every and (out / "checkpoints").is_dir():  # else created once all is checked
    ckpt = checkpoint.Checkpointer(out / "checkpoints", cfg, tokenizer)
    start = ckpt.latest_step() or 0
  if not start and (out / "metrics.jsonl").exists():
    raise InputError(
      f"--workdir {out} already holds a run with no complete checkpoint to resume "
      "from; refusing to overwrite it. Choose a new --workdir or delete the old one."
    )
  if start > cfg.train.steps:
    raise InputError(
      f"--workdir {out} has a checkpoint at step {start}, past "
      f"train.steps={cfg.train.steps}. Raise --config.train.steps to train further."
    )
  # The starting state is read now, so that a damaged or mismatched checkpoint (or imported folder)
  # is refused before anything is written.
  if start:
    state = setup.restore(s, ckpt, start, resume=True)
  elif cfg.init.from_hf:
    state = setup.make_init_from(s)(hf.import_params(cfg.init.from_hf, cfg.model, tokenizer))
  return s, out, corpus, tokenizer, ckpt, start, state


class Prepared(NamedTuple):
  """A run whose every input is checked and whose workdir is written (config, marker)."""

  s: Setup
  out: pathlib.Path
  ckpt: checkpoint.Checkpointer | None
  start: int  # the step it resumes after (0: a new run)
  state: TrainState | None  # restored or imported; None: initialise from the seed
  init_s: float
  train_batches: Iterator[np.ndarray]  # this process's rows of each step's batch
  eval_batches: list[np.ndarray]
  batch_shape: tuple[int, int]  # [B, T+1]


class Compiled(NamedTuple):
  state: TrainState
  train_step: Any  # the AOT-compiled step
  eval_step: Any
  compile_s: float
  init_s: float
  memory: dict  # the compiled step's per-device bytes
  peak: float  # the matmul peak measured in this process, in the compute dtype


class Trained(NamedTuple):
  state: TrainState
  last: dict  # the last logged step's metrics
  eval_metrics: dict
  train_time: float  # seconds between logged steps (excludes compile and eval)
  wall_s: float
  skipped: int


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir` -> summary.json. Raises InputError for bad input
  (nothing written), Diverged for a non-finite step and Stopped for SIGTERM/SIGINT (each after
  saving the last finite state)."""
  # ==============================================================================================
  # Prepare: every input checked before anything is written
  # ==============================================================================================
  p = prepare(cfg, workdir)
  # ==============================================================================================
  # Compile
  # ==============================================================================================
  c = compile_steps(p)
  # ==============================================================================================
  # Loop
  # ==============================================================================================
  t = train_loop(p, c)
  # ==============================================================================================
  # Summarise
  # ==============================================================================================
  return summarise(p, c, t)


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> Prepared:
  t0 = time.perf_counter()
  s, out, corpus, tokenizer, ckpt, start, state = check_inputs(cfg, workdir)
  init_s = time.perf_counter() - t0
  cfg, d = s.cfg, s.cfg.data
  eval_batches = data.eval_batches(
    corpus.tokens["validation"],
    seq_len=d.seq_len,
    batch=d.eval_batch,
    max_batches=d.eval_batches or None,
  )
  batch_shape = (d.global_batch, d.seq_len + 1)
  block, blocks = distributed.process_rows(s.batch_sharding, batch_shape)
  train_batches = data.train_batches(
    corpus.tokens["train"],
    seq_len=d.seq_len,
    global_batch=d.global_batch,
    seed=d.seed,
    start_step=start,
    process_index=block,
    process_count=blocks,
  )
  # Every process has checked the workdir before process 0 writes to it.
  distributed.barrier("inputs checked")
  if distributed.is_main():
    run_dir.create_workdir(out)
    if start < cfg.train.steps:  # a finished run's config is written already
      name = f"config.resumed_at_{start}.json" if start else "config.json"
      (out / name).write_text(json.dumps(cfg.to_dict(), indent=2))
  distributed.barrier("workdir created")
  if cfg.checkpoint.every and ckpt is None:
    ckpt = checkpoint.Checkpointer(out / "checkpoints", cfg, tokenizer)
  return Prepared(s, out, ckpt, start, state, init_s, train_batches, eval_batches, batch_shape)


def compile_steps(p: Prepared) -> Compiled:
  """The state (initialised now unless restored), the AOT-compiled train step, the eval step."""
  s = p.s
  peak = analysis.measure_matmul_peak(dtype=jnp.dtype(s.cfg.model.dtype))  # in the compute dtype
  state, init_s = p.state, p.init_s
  if state is None:
    t0 = time.perf_counter()
    state = setup.make_init(s)()
    init_s = time.perf_counter() - t0
  batch_struct = jax.ShapeDtypeStruct(p.batch_shape, jnp.int32, sharding=s.batch_sharding)
  t0 = time.perf_counter()
  train_step = step_functions.make_train_step(s).lower(state, batch_struct).compile()
  compile_s = time.perf_counter() - t0
  eval_step = step_functions.make_eval_step(s)
  memory = analysis.compiled_memory(train_step)
  return Compiled(state, train_step, eval_step, compile_s, init_s, memory, peak)


def train_loop(p: Prepared, c: Compiled) -> Trained:
  """Steps start+1..train.steps: each refused if non-finite, checkpointed, logged, evaluated, and
  stopped after a signal."""
  s, cfg, out, ckpt, state = p.s, p.s.cfg, p.out, p.ckpt, c.state
  main = distributed.is_main()
  logger = run_log.Logger(out, p.start) if main else run_log.NoLogger()
  logged = logger.records
  nonfinite = faults.NonFinite(cfg, logged[-1].get("skipped_steps", 0) if logged else 0)
  tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
  clock = LogClock(p.start)
  last, eval_metrics, saved = {}, {}, p.start
  bar = progress_bar(cfg, p.start, shown=main)
  signals = faults.StopSignals()
  run_start = time.perf_counter()
  try:
    for step in range(p.start + 1, cfg.train.steps + 1):
      rows = next(p.train_batches)
      batch = jax.make_array_from_process_local_data(s.batch_sharding, rows, p.batch_shape)
      state, metrics = c.train_step(state, batch)
      # Waits for the step: a refused step is known before anything is saved or logged.
      if not bool(metrics.pop("finite")):
        why = nonfinite.stops(step, metrics)
        if why:
          kept = faults.save_last_finite(ckpt, s, state, step - 1, saved)
          raise Diverged(f"{why}. {kept} {nonfinite.advice()}")
      else:
        nonfinite.in_a_row = 0
      # Asynchronous: the state is copied to host before this returns, then written in the
      # background.
      if ckpt and ckpt.save(step, state, s.schedule, force=step == cfg.train.steps):
        saved = step
      bar.update()
      is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
      if step % cfg.train.log_every == 0 or is_eval:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last.update(clock.lap(step, tokens_per_step), skipped_steps=nonfinite.skipped)
        record = dict(last)
        if is_eval:
          eval_metrics = run_log.validation_loss(
            c.eval_step, state.params, p.eval_batches, s.batch_sharding
          )
          record.update(eval_metrics)
        logger.write(step, record)
        val = {"val": f"{eval_metrics['eval_loss']:.4f}"} if is_eval else {}
        bar.set_postfix(loss=f"{last['loss']:.4f}", **val)
        clock.restart()
      signum = signals.received(step)
      if signum and step < cfg.train.steps:
        message = faults.stopped_message(ckpt, s, state, step, saved, signum, out)
        raise Stopped(message, signum)
  finally:
    signals.close()
    bar.close()
    logger.close()
    if ckpt:
      ckpt.close()  # waits for the last save
  wall_s = time.perf_counter() - run_start
  return Trained(state, last, eval_metrics, clock.train_time, wall_s, nonfinite.skipped)


def progress_bar(cfg: ml_collections.ConfigDict, start: int, shown: bool) -> tqdm.tqdm:
  return tqdm.tqdm(
    initial=start,
    total=cfg.train.steps,
    disable=not (cfg.train.progress and shown),
    mininterval=1.0,
    dynamic_ncols=True,
  )


class LogClock:
  """Training time between logged steps, which leaves out the evals and logging between them."""

  def __init__(self, start: int):
    self.train_time, self.since, self.since_step = 0.0, time.perf_counter(), start

  def lap(self, step: int, tokens_per_step: int) -> dict:
    interval = time.perf_counter() - self.since
    self.train_time += interval
    steps = step - self.since_step
    self.since_step = step
    return {"step_s": interval / steps, "tokens_per_s": tokens_per_step * steps / interval}

  def restart(self) -> None:
    self.since = time.perf_counter()


def summarise(p: Prepared, c: Compiled, t: Trained) -> dict:
  """summary.json (process 0): the run's final losses, speed, memory and costs."""
  s, cfg, d = p.s, p.s.cfg, p.s.cfg.data
  last, eval_metrics, train_time, wall_s = t.last, t.eval_metrics, t.train_time, t.wall_s
  trained = cfg.train.steps - p.start
  if p.start == cfg.train.steps:
    # Killed after its last checkpoint but before its summary: the numbers of the run as logged.
    eval_metrics = run_log.validation_loss(
      c.eval_step, t.state.params, p.eval_batches, s.batch_sharding
    )
    if not distributed.is_main():
      return {}
    logged = run_log.read_metrics(p.out / "metrics.jsonl", cfg.train.steps)
    last, train_time = run_log.logged_finish(p.out, logged, cfg.train.steps)
    wall_s, trained = train_time, cfg.train.steps
  tokens_per_step = d.global_batch * d.seq_len
  flops_per_token = analysis.flops_per_token(cfg.model, d.seq_len)
  tokens_per_s = tokens_per_step * trained / train_time
  summary = {
    **setup.describe(s),
    "steps": cfg.train.steps,
    "resumed_from_step": p.start,
    "tokens": tokens_per_step * cfg.train.steps,
    "final_loss": last["loss"],
    "final_eval_loss": eval_metrics["eval_loss"],
    "final_eval_perplexity": eval_metrics["eval_perplexity"],
    "skipped_steps": t.skipped,
    "tokens_per_s": tokens_per_s,
    "step_ms": 1000 * train_time / trained,
    "mfu": tokens_per_s * flops_per_token / c.peak,
    "matmul_peak_flops": c.peak,
    "compile_s": c.compile_s,
    "init_s": c.init_s,
    "train_wall_s": wall_s,
    "model_flops_per_step": flops_per_token * tokens_per_step,
    "memory_per_device_bytes": c.memory,
    **aot_plan.compiled_costs(s, c.train_step),
  }
  if distributed.is_main():
    (p.out / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
