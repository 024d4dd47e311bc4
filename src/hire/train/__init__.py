"""Training for sparsity: models trained from scratch with top-k FFNs (``hire train``)."""

from hire.train.scratch import TrainConfig, build_model, train, validate

__all__ = ["TrainConfig", "build_model", "train", "validate"]
