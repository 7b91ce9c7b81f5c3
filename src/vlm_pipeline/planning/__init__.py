"""Know before you launch: step arithmetic, checkpoints and an estimate of peak GPU memory per device.

``steps`` does the arithmetic transformers' Trainer will do (steps per epoch, warm-up, eval and save steps, the
checkpoints ``save_total_limit`` keeps); ``model_shape`` reads a model's dimensions from ``config.json`` on the
meta device (no weights); ``memory`` turns shape and settings into a per-GPU estimate, term by term; ``plan``
joins them for a run's ``conf/`` and gives the verdict against ``plan.gpu_memory_gb``.
"""
