"""The studies: depth and width (`compare`), hyperparameter search (`sweep`), fine-tuning vs from scratch (`transfer`)."""
