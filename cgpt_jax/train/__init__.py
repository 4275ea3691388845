"""Training, by concern: run_dir (the workdir's checks), setup (state, shardings, init, restore),
step_functions (loss, gradients, train and eval steps), aot_plan (--mode=plan), run_log (metrics and
validation), faults (signals, non-finite steps) and loop (run(): prepare, compile, loop, summarise).
"""
