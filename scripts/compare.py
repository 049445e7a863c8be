"""Train a grid of architectures x widths under one budget; writes study.csv, study.md and study.png.

    python scripts/compare.py --data sample --grid tiny,resnet20 --epochs 1
    python scripts/compare.py --data path/to/cifar10.tgz --grid resnet20,resnet56,resnet110 --epochs 5
    python scripts/compare.py --data path/to/cifar10.tgz --grid resnet20 --widths 1,2,4 --study width
"""

from cifar_fastai.cli import compare_app

if __name__ == "__main__":
    compare_app()
