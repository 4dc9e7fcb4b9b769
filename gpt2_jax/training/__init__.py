"""Fine-tuning: flags, the device mesh, the jitted step, AdamW, several processes, checkpoints, the loop.

config.py        `TrainConfig`: every flag, its default, and where each value came from
mesh.py          devices, the mesh, batch sharding, replicated or FSDP placement and its memory check
step.py          `TrainState`, the loss, and the jitted train/eval steps (with LoRA: adapters alone trained)
optim.py         AdamW with GPT-2's decay mask and the warmup + cosine schedule (`OptimizerConfig`)
events.py        what is due after each step (log, save, stop, validate, sample); stop signals
distributed.py   joining several processes (JAX's multi-controller runtime)
checkpoints.py   orbax checkpoints that resume exactly, with a fallback past damaged ones
run_dir.py       the run directory: lock, metrics.jsonl, loss plot, samples
start.py         how a run starts (fresh / resume / another checkpoint) and its resolved options
state.py         the state's shapes and shardings, the compiled steps, fresh or restored state
setup.py         building a training session (`Session`) from the flags
loop.py          the pipelined training loop
"""
