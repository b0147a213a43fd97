"""Training: how any data reaches any model (``batches``: batches, outputs, evaluation, progress)
and fine-tuning with knowledge distillation (``fit``)."""
