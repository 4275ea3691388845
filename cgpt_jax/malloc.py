"""The allocator setting every entry point runs under (launch.py and the benchmarks).

glibc hands XLA's large scratch buffers back to the OS after every step and page-faults them in
again on the next: up to seconds of system time per step at d=768 (docs/performance.md). Keeping
them mapped needs the tunables in the environment at process start, so an entry point re-execs
itself once with them set. Imports nothing heavy: it runs before jax is imported.
"""

import os
import sys

GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"


def reexec_with_tuned_malloc() -> None:
  """Restarts this process with GLIBC_TUNABLES set, unless it is set already (to any value: a
  benchmark comparing allocators sets its own)."""
  if "GLIBC_TUNABLES" not in os.environ:
    os.environ["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])
