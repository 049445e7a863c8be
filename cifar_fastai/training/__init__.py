"""Training: resolve the settings (`resolve`), the run flow (`run`), learner, fine-tuning, weights files, optimizers,
recipes, time budget, hardware and multi-process."""
