"""Layout searches (--mode=search, docs/search.md) over the Cerebras-GPT presets. The config is
experiments/cerebras_gpt.py's; the study is the command line:

  # 13B on 64 and 512 H100s
  python launch.py --config experiments/search_cerebras_gpt.py:13b --mode=search --devices 64 \
      --hardware=h100 --workdir runs/search_13b_64
  python launch.py --config experiments/search_cerebras_gpt.py:13b --mode=search --devices 512 \
      --hardware=h100 --workdir runs/search_13b_512 --search_top_k 12
  # 1.3B on 8 H100s, 111M on 8 TPU v5p chips
  python launch.py --config experiments/search_cerebras_gpt.py:1.3b --mode=search --devices 8 \
      --hardware=h100 --workdir runs/search_1.3b_8
  python launch.py --config experiments/search_cerebras_gpt.py:111m --mode=search --devices 8 \
      --hardware=v5p --workdir runs/search_111m_8

Each writes WORKDIR/search.json, report.md and pareto.png; rerunning resumes (compiled candidates
are kept in WORKDIR/candidates/NAME/).
"""

from cgpt_jax import config as config_lib
from cgpt_jax.errors import InputError


def get_config(arg="13b"):
  try:
    return config_lib.cerebras_gpt((arg or "13b").lower())
  except InputError as e:
    raise InputError(f"experiments/search_cerebras_gpt.py:{arg}: {e}") from None
