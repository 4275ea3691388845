"""The search space: every factorisation of the devices into the mesh axes with the knobs that go
with it (layout variant, compute dtype, remat policy, gradient accumulation, pipeline schedule).
Pure arithmetic, no jax: the space is listed before anything is built."""

import dataclasses
import math

from cgpt_jax.parallel.layouts import AXES

DTYPES = ("bfloat16", "float32")
REMATS = ("full", "dots", "none")
# Pipeline schedules and their repeats R: the chunked ones run 2 chunks per stage.
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("zb_h1", 1), ("circular", 2), ("interleaved_1f1b", 2))
MICROBATCHES_PER_STAGE = (1, 2, 4)  # M = S, 2 S, 4 S
GRAD_ACCUM_CHOICES = 4  # the fewest micro-steps that divide the rows: more only cost time
TORUS_TENSOR_CAP = 16  # without nodes (a TPU torus) tensor ways stay within one torus dimension


@dataclasses.dataclass(frozen=True)
class Candidate:
  mesh: tuple[int, ...]  # sizes of layouts.AXES, in order
  layout: str  # "3d" (the shared rules), "zero1" or "sp" (layouts.LAYOUT_PRESETS)
  dtype: str
  remat: str
  grad_accum: int
  schedule: str | None = None  # pipelines only
  microbatches: int = 1
  repeats: int = 1

  @property
  def sizes(self) -> dict[str, int]:
    return dict(zip(AXES, self.mesh))

  @property
  def name(self) -> str:
    mesh = "".join(f"{a[0]}{n}" for a, n in zip(AXES, self.mesh))
    pipe = f"-{self.schedule}-m{self.microbatches}r{self.repeats}" if self.schedule else ""
    dtype = "bf16" if self.dtype == "bfloat16" else "f32"
    return f"{mesh}-{self.layout}-{dtype}-{self.remat}-k{self.grad_accum}{pipe}"

  def overrides(self) -> dict:
    """The --config.KEY=VALUE overrides that make a run of this candidate."""
    out = {
      "mesh.layout": self.layout,
      **{f"mesh.{a}": n for a, n in self.sizes.items()},
      "model.dtype": self.dtype,
      "model.remat": self.remat,
      "train.grad_accum": self.grad_accum,
    }
    if self.schedule:
      out.update(
        {
          "pipeline.schedule": self.schedule,
          "pipeline.microbatches": self.microbatches,
          "pipeline.repeats": self.repeats,
        }
      )
    return out

  def record(self) -> dict:
    return {"name": self.name, **dataclasses.asdict(self), "mesh": self.sizes}


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def meshes(devices: int, tensor_cap: int) -> list[tuple[int, ...]]:
  """Ordered factorisations of `devices` into len(AXES) sizes, tensor at most `tensor_cap` (the
  fast links' node: Megatron keeps tensor parallelism inside one). Context and pipe never both
  exceed 1: the ring does not combine with a pipeline (context.check refuses it)."""
  out = [()]
  for _ in AXES:
    out = [m + (d,) for m in out for d in divisors(devices // math.prod(m))]
  pipe, ring, tensor = (AXES.index(a) for a in ("pipe", "context", "tensor"))
  return [
    m
    for m in out
    if math.prod(m) == devices and m[tensor] <= tensor_cap and (m[pipe] == 1 or m[ring] == 1)
  ]


def layouts_for(sizes: dict[str, int]) -> list[str]:
  """The shared rules, ZeRO-1 for a mesh that is data parallel alone (its state rules put the
  moments on data, which only a replicated parameter leaves free), sp wherever tensor > 1."""
  out = ["3d"]
  if sizes["data"] > 1 and all(sizes[a] == 1 for a in ("fsdp", "tensor", "pipe")):
    out.append("zero1")
  if sizes["tensor"] > 1:
    out.append("sp")
  return out


def pipelines(stages: int) -> list[tuple[str | None, int, int]]:
  """(schedule, M, R) choices for `stages` pipe stages; (None, 1, 1) without a pipeline."""
  if stages == 1:
    return [(None, 1, 1)]
  return [(s, f * stages, r) for s, r in SCHEDULES for f in MICROBATCHES_PER_STAGE]


def enumerate_space(devices: int, batch: int, tensor_cap: int) -> list[Candidate]:
  """Every candidate. Gradient accumulation k runs over the GRAD_ACCUM_CHOICES smallest divisors of
  the rows a batch shard gets (1 when the batch axes do not divide the batch: the pruning says
  why)."""
  out = []
  for mesh in meshes(devices, tensor_cap):
    sizes = dict(zip(AXES, mesh))
    shards = sizes["data"] * sizes["fsdp"]
    ks = divisors(batch // shards)[:GRAD_ACCUM_CHOICES] if batch % shards == 0 else [1]
    for layout in layouts_for(sizes):
      for schedule, m, r in pipelines(sizes["pipe"]):
        for dtype in DTYPES:
          for remat in REMATS:
            out += [Candidate(mesh, layout, dtype, remat, k, schedule, m, r) for k in ks]
  return out
