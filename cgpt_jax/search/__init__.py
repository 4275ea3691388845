"""--mode=search (issue 19): every layout of a model on N devices, pruned analytically, the most
promising compiled ahead of time, ranked by the roofline's step time (docs/search.md)."""
