"""Training: pure step functions (`step`), the parallel strategies (`parallel`), the loop (`loop`).

`from jaxgpt.train import train_step, ...` re-exports the step module; the loop is imported as
`jaxgpt.train.loop` (it pulls in checkpoints, data and metrics).
"""

from jaxgpt.train.step import (AXIS, build_optimizer, classify_loss_sums, decay_mask,  # noqa: F401
                               eval_step, flops_per_token, init_train_state, lm_loss_sums,
                               loss_fn_for, lr_schedule, param_groups, replace_model, shard_batch,
                               train_step)
