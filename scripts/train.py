"""Train or fine-tune a ResNet on CIFAR-10; results go to runs/<name>/.

    python scripts/train.py --data sample --arch resnet18 --epochs 1
    python scripts/train.py --arch resnet50 --epochs 20
    python scripts/train.py --data ../shared/data/cifar10-jpeg75.tgz --lr-find
"""

from cifar_fastai.cli import train_app

if __name__ == "__main__":
    train_app()
