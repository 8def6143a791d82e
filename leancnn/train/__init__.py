from .trainer import EvalResult, Trainer, TrainState, evaluate, hold_out

__all__ = ["EvalResult", "TrainState", "Trainer", "evaluate", "hold_out"]
