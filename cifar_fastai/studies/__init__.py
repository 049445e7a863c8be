"""The studies: the named ones (`study`: depth and width, augmentation, transfer, robustness, search), grids of
architectures (`compare`), hyperparameter search (`sweep`)."""
