"""The device mesh, layouts, and the logical->mesh axis rules.

One mesh with a fixed list of axes (`AXES`). A layout is data: the size of each axis (1 = off, one -1 =
"the rest of the devices") and a table mapping the model's logical axis names to mesh axes. The model
only ever names logical axes (`constrain(x, ("batch", "seq", "embed"))`); which devices hold what is
decided here and nowhere else.
"""
import contextlib
import contextvars
import dataclasses
import math
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cgpt_jax.errors import InputError

AXES = ("data", "pipe", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # FSDP is data parallelism whose state is sharded too

# Logical axis -> mesh axes. A logical name missing from a table is replicated.
Rules = Mapping[str, tuple[str, ...]]

LAYOUT_PRESETS: dict[str, tuple[dict[str, int], Rules]] = {
    # The reference: one device, nothing sharded.
    "single": ({}, {}),
    # Batch split over every device; parameters and optimizer state replicated; XLA all-reduces the
    # gradients (2 P b (n-1)/n bytes per device per step, REFERENCE.md §2).
    "dp": ({"data": -1}, {"batch": BATCH_AXES}),
}


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  mesh: Mesh
  rules: Rules

  def spec(self, names: Sequence[str | None]) -> P:
    """Logical axis names -> PartitionSpec over this mesh (axes of size 1 dropped)."""
    out = []
    for name in names:
      axes = tuple(a for a in self.rules.get(name, ()) if self.mesh.shape[a] > 1) if name else ()
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)

  def sharding(self, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_size_divisor(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.rules.get("batch", ()))

  @property
  def axis_sizes(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  @contextlib.contextmanager
  def active(self) -> Iterator[None]:
    """Makes `constrain` use this layout while a step function is traced."""
    token = _ACTIVE.set(self)
    try:
      yield
    finally:
      _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `Layout.active()` or on one device."""
  layout = _ACTIVE.get()
  if layout is None or layout.mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, layout.sharding(names))


def make_layout(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Layout:
  """Builds the layout named by `mesh_cfg.layout` with any axis sizes the config overrides.

  Raises InputError (before anything compiles) when the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  if mesh_cfg.layout not in LAYOUT_PRESETS:
    raise InputError(f"config mesh.layout={mesh_cfg.layout!r}: unknown layout. "
                     f"Choose one of: {', '.join(LAYOUT_PRESETS)}.")
  preset_sizes, rules = LAYOUT_PRESETS[mesh_cfg.layout]
  if mesh_cfg.layout == "single":
    devices = devices[:1]
  sizes = {a: preset_sizes.get(a, 1) for a in AXES}
  for a in AXES:
    if mesh_cfg.get(a) is not None:
      sizes[a] = mesh_cfg[a]
  for a, n in sizes.items():
    if n == 0 or n < -1:
      raise InputError(f"config mesh.{a}={n}: an axis size must be a positive integer or -1 "
                       "(the rest of the devices).")
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1:
    raise InputError(f"config mesh: axes {', '.join(free)} are all -1; at most one axis may take "
                     "'the rest of the devices'. Give the others explicit sizes.")
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if len(devices) % fixed:
      raise InputError(f"layout {mesh_cfg.layout}: the fixed axes ({_fmt(sizes)}) use {fixed} devices, "
                       f"which does not divide the {len(devices)} devices available. "
                       f"Use --devices as a multiple of {fixed} or change the axis sizes.")
    sizes[free[0]] = len(devices) // fixed
  total = math.prod(sizes.values())
  if total != len(devices):
    raise InputError(f"layout {mesh_cfg.layout}: mesh {_fmt(sizes)} needs {total} devices but "
                     f"{len(devices)} are available. Use --devices {total} or set one axis to -1.")
  unused = [a for a in AXES if sizes[a] > 1 and not any(a in axes for axes in rules.values())]
  if unused:
    raise InputError(f"layout {mesh_cfg.layout} does not use mesh axes {', '.join(unused)}, so "
                     f"devices on them would only repeat work ({_fmt(sizes)}). Set them to 1 or "
                     "choose a layout that shards over them.")
  mesh = Mesh(np.asarray(devices).reshape([sizes[a] for a in AXES]), AXES,
              axis_types=(AxisType.Auto,) * len(AXES))
  return Layout(mesh_cfg.layout, mesh, dict(rules))


def _fmt(sizes: Mapping[str, int]) -> str:
  return " x ".join(f"{a}={sizes[a]}" for a in AXES)
