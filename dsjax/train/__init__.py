"""Training: the loss, the step with its bias update, AdamW, data, checkpoints and the loop."""

from dsjax.train.checkpoint import restore_model
from dsjax.train.loop import TrainingError, evaluate, train
from dsjax.train.step import TrainState, init_state, make_eval_step, make_train_step

__all__ = [
    "TrainState",
    "TrainingError",
    "evaluate",
    "init_state",
    "make_eval_step",
    "make_train_step",
    "restore_model",
    "train",
]
