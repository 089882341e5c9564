"""workers: one process per GPU (or a CPU worker) that runs each task in a child process.

`worker` pulls assignments and reports, `supervisor`/`forkserver`/`child` run a task in its own
process, `gpus` finds the GPUs, and `kinds` is the thin glue from a task's params to a `bem` recipe.
"""
