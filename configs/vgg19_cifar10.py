"""VGG-19 (batch norm) on CIFAR-10 (needs TFDS `cifar10` prepared in the data dir).

OpenLTH `cifar_vgg_19` defaults (models/cifar_vgg.py): SGD momentum 0.9, lr 0.1, weight decay 1e-4,
batch 128, 160 epochs with x0.1 at 80 and 120, flip+crop augmentation, fraction 0.2 global, output
layer `fc` not pruned. OpenLTH's init: Kaiming-normal kernels, PyTorch-default biases, BN scales
U[0, 1) (`bias_init='torch'`, `bn_init='uniform'`, the base defaults). Frankle et al. 2020 rewind
VGG-19 to iteration ~1-2K; set rewind='iteration'.
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "cifar10"
    c.model = "vgg19"
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.lr = 0.1
    c.weight_decay = 1e-4
    c.training_steps = "160ep"
    c.lr_schedule = "step"
    c.milestones = "80ep,120ep"
    c.augment = "cifar"
    c.levels = 20
    return c
