from .trainer import EvalResult, Trainer, TrainState, evaluate

__all__ = ["EvalResult", "TrainState", "Trainer", "evaluate"]
