"""Run a named study of docs/studies.md (depth-width, augment, robust, ...): a CSV, a Markdown table and a plot.

    python scripts/study.py --list
    python scripts/study.py depth-width --data path/to/cifar10.tgz
    python scripts/study.py augment --data sample --epochs 1 --train-per-class 20 --name augment-smoke
"""

from cifar_fastai.cli import study_app

if __name__ == "__main__":
    study_app()
