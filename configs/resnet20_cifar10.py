"""ResNet-20 on CIFAR-10 with late rewinding (needs TFDS `cifar10` prepared in the data dir).

OpenLTH `cifar_resnet_20` defaults (models/cifar_resnet.py): SGD momentum 0.9, lr 0.1, weight decay
1e-4, batch 128, 160 epochs with x0.1 at 80 and 120, flip+crop augmentation, fraction 0.2 global,
NO layers ignored (the output layer is pruned). Late rewinding to iteration 500 as in Frankle et al.
2020 ("Linear mode connectivity and the lottery ticket hypothesis", ResNet-20: k = 500 iterations).
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "cifar10"
    c.model = "resnet20"
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.lr = 0.1
    c.weight_decay = 1e-4
    c.training_steps = "160ep"
    c.lr_schedule = "step"
    c.milestones = "80ep,120ep"
    c.augment = "cifar"
    c.exclude = ""
    c.rewind = "iteration"
    c.rewind_step = "500it"
    c.levels = 20
    return c
