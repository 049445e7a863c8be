"""Transfer study: from scratch vs fine-tuned from our own pretrained run, at equal training time, per data size.

    python scripts/transfer_study.py --data path/to/cifar10.tgz
    python scripts/transfer_study.py --data sample --per-class 20,all --pretrain-epochs 2
"""

from cifar_fastai.cli import transfer_app

if __name__ == "__main__":
    transfer_app()
