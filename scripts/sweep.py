"""Hyperparameter search (grid or random) with k-fold cross-validation; resumable; the test set is never used.

    python scripts/sweep.py --data sample --arch tiny --epochs 1 --folds 3 -p lr=1e-3,3e-3
    python scripts/sweep.py --data sample --random 8 -p lr=1e-4:1e-2:log -p crop-pad=0,2,4 -p arch=resnet18,resnet34
    python scripts/sweep.py --data sample -p lr=1e-3,3e-3 --name my-sweep   # rerun the same command to resume
"""

from cifar_fastai.cli import sweep_app

if __name__ == "__main__":
    sweep_app()
