"""fastai callbacks, one family per module: progress and logs, checkpoints, TensorBoard, regularization, adversarial
training, the fast recipes' callbacks, the fine-tuning report."""
