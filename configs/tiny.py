# Seconds, not minutes: for tests and smoke runs.
overrides = {
    "out": "out/tiny",
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.block_size": 32,
    "batch_size": 8,
    "max_steps": 20,
    "warmup_steps": 2,
    "log_interval": 5,
    "eval_interval": 10,
    "eval_steps": 2,
    "save_interval": 10,
}
