"""The planning-at-scale report (experiments/plan_cerebras_gpt.py): each AOT plan's memory and
collective bytes, judged on real accelerators with costs/roofline.py."""

from __future__ import annotations


# ----------------------------------------------------------------------------------------------
# Planning at scale (experiments/plan_cerebras_gpt.py): plans judged on real accelerators
# ----------------------------------------------------------------------------------------------
def _gb(n: float) -> str:
  return f"{n / 1e9:,.1f}"


def _ms(s: float) -> str:
  return f"{s * 1e3:,.0f}"


def plan_row(p: dict, plan: dict) -> dict:
  """The numbers of one planning row, from the sweep point `p` (its config_arg a Cerebras-GPT size)
  and its plan.json: memory, collective bytes measured and analytic, and roofline.analyse on each
  accelerator of roofline.HARDWARE."""
  from cgpt_jax import presets
  from cgpt_jax.costs import roofline

  m = plan["mesh"]
  return {
    "name": p["name"],
    "size": p["config_arg"],
    "layout": plan["layout"],
    "mesh": "×".join(str(m[a]) for a in roofline.AXES),
    "devices": plan["devices"],
    "batch": plan["tokens_per_step"] // plan["config"]["data"]["seq_len"],
    "paper_batch": presets.CEREBRAS_GPT[p["config_arg"]].batch,
    "grad_accum": plan["config"]["train"]["grad_accum"],
    "microbatches": plan.get("pipeline", {}).get("microbatches"),
    "memory_bytes": plan["memory_per_device_bytes"]["total_bytes"],
    "fits_80GB": plan["fits_80GB"],
    "bytes_measured": roofline.measured_bytes(plan),
    "bytes_analytic": plan["analytic_collective_bytes_per_step"],
    "hardware": {hw.name: roofline.analyse(plan, hw) for hw in roofline.HARDWARE},
  }


def _verdict(r: dict) -> str:
  tokens = f"{r['data']['tokens']:,.0f}/{r['data']['critical']:,.0f}" if r["data"] else "—"
  ways = f"{r['tensor']['ways']}/{r['tensor']['limit']:.1f}" if r["tensor"] else "—"
  ok = [c["compute_bound"] for c in (r["data"], r["tensor"]) if c]
  conditions = "compute" if all(ok) else "comm"
  return (
    f"{_ms(r['compute_s'])} | {_ms(r['comm_s'])} | **{r['bound']}** | "
    f"{_ms(r['comm_s_accelerator_wire'])} | {r['bound_accelerator_wire']} | {tokens} | "
    f"{ways} | {conditions if ok else '—'}"
  )


def plan_rows_tables(rows: list[dict]) -> list[str]:
  """Every plan's memory and bytes, then one verdict table per accelerator (plan_row's rows)."""
  from cgpt_jax.costs import roofline

  lines = [
    "| point | layout | data×pipe×fsdp×tensor | batch (paper) | k | M | GB/device | fits 80 GB | "
    "GB/step/device measured | analytic | ratio |",
    "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
  ]
  for r in rows:
    batch = f"{r['batch']}" + ("" if r["batch"] == r["paper_batch"] else f" ({r['paper_batch']})")
    ratio = r["bytes_measured"] / r["bytes_analytic"] if r["bytes_analytic"] else float("nan")
    lines.append(
      f"| {r['name']} | {r['layout']} | {r['mesh']} | {batch} | {r['grad_accum']} | "
      f"{r['microbatches'] or '—'} | {_gb(r['memory_bytes'])} | "
      f"{'yes' if r['fits_80GB'] else '**no**'} | {_gb(r['bytes_measured'])} | "
      f"{_gb(r['bytes_analytic'])} | {ratio:.2f} |"
    )
  for hw in roofline.HARDWARE:
    lines += [
      "",
      f"**{hw.name}** — compute = compiled matmul FLOPs per device / "
      f"{hw.peak_flops / 1e12:.0f} TFLOP/s; comm = the compiled program's bytes per device at "
      "the links their axes use (the verdict); beside it the formula's bytes with the bf16 "
      "compute dtype on the wire, as a GPU or TPU compile moves activations and gathered "
      "weights (gradients stay float32); §2 conditions: tokens per batch shard per weight pass "
      "vs C/W, tensor ways Y vs F·W/C.",
      "",
      "| point | compute ms | comm ms compiled | bound | comm ms bf16 wire | bound at bf16 wire | "
      "tokens / C/W | Y / F·W/C | §2 conditions |",
      "|---|---:|---:|---|---:|---|---:|---:|---|",
    ]
    lines += [f"| {r['name']} | {_verdict(r['hardware'][hw.name])} |" for r in rows]
  return lines


def hardware_lines() -> list[str]:
  """The accelerators assumed (roofline.HARDWARE), with C/W on their fast links and sources."""
  from cgpt_jax.costs import roofline

  lines = [
    "| accelerator | bf16 peak | HBM | fast links (per chip, one way) | between nodes | "
    "C/W | source |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for hw in roofline.HARDWARE:
    node = f"{hw.node_size} chips" if hw.node_size else "whole torus"
    lines.append(
      f"| {hw.name} | {hw.peak_flops / 1e12:.0f} TFLOP/s | "
      f"{hw.hbm_bytes / 1e9:.0f} GB | {hw.link_bytes_per_s / 1e9:.0f} GB/s ({node}) | "
      f"{hw.network_bytes_per_s / 1e9:.0f} GB/s | "
      f"{roofline.critical_tokens(hw, hw.link_bytes_per_s):,.0f} | {hw.source} |"
    )
  return lines


def plan_summary_lines(rows: list[dict], size: str = "13b") -> list[str]:
  """One line per plan of `size`: the answer to "what would it need on N devices laid out so"."""
  out = []
  for r in rows:
    if r["size"] != size:
      continue
    hw = r["hardware"]
    out.append(
      f"- {r['layout']} {r['mesh']} on {r['devices']}: {_gb(r['memory_bytes'])} GB/device "
      f"({'fits' if r['fits_80GB'] else 'does not fit'} 80 GB), "
      f"{_gb(r['bytes_measured'])} GB/step per device measured vs "
      f"{_gb(r['bytes_analytic'])} analytic; "
      + ", ".join(
        f"{name}: {a['bound']}-bound ({_ms(a['compute_s'])} ms compute, "
        f"{_ms(a['comm_s'])} ms comm as compiled, {_ms(a['comm_s_accelerator_wire'])} "
        "ms with bf16 on the wire)"
        for name, a in hw.items()
      )
    )
  return out


def plan_report(sweep: list[dict], results: dict[str, dict]) -> list[str]:
  """The planning sweep's report: the hardware assumed, the 13B's plans in a line each, then every
  plan's memory, bytes and per-accelerator verdict; failed points last."""
  rows = [plan_row(p, results[p["name"]]) for p in sweep if "error" not in results[p["name"]]]
  failed = [
    f"- {p['name']}: {results[p['name']]['error']}" for p in sweep if "error" in results[p["name"]]
  ]
  lines = [
    "# Planning Cerebras-GPT at scale",
    "",
    "## Hardware assumed",
    "",
    *hardware_lines(),
    "",
    "## 13B",
    "",
    *plan_summary_lines(rows),
    "",
    "## Every plan",
    "",
    "bf16 compute, full remat; k = gradient-accumulation micro-steps, M = pipeline "
    "microbatches; bytes are what one device sends per optimizer step, measured in the "
    "compiled HLO beside comm.py's formula for the same backend. The CPU compiler moves "
    "every collective as float32 (plan.json's collective_bytes_by_dtype), the bf16 "
    "activations and gathered weights included.",
    "",
    *plan_rows_tables(rows),
  ]
  if failed:
    lines += ["", "## Failed", "", *failed]
  return lines
