"""The core that trains: a run assembled once (assembly: devices, data, model, optimizer, checkpoints),
the per-replica steps (steps), the outer loop (loop), the feature cache, and what a run leaves (run_dir).
It imports nothing from the jobs or the reports above it."""
