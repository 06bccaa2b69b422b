"""ResNet-20 on CIFAR-10 with late rewinding (needs TFDS `cifar10` prepared in the data dir).

OpenLTH `cifar_resnet_20` defaults (models/cifar_resnet.py): SGD momentum 0.9, lr 0.1, weight decay
1e-4, batch 128, 160 epochs with x0.1 at 80 and 120, flip+crop augmentation, fraction 0.2 global,
NO layers ignored (the output layer is pruned). Late rewinding to iteration 500 as in Frankle et al.
2020 ("Linear mode connectivity and the lottery ticket hypothesis", ResNet-20: k = 500 iterations).
"""

import vgg19_cifar10  # the same OpenLTH CIFAR-10 training recipe


def get_config():
    c = vgg19_cifar10.get_config()
    c.model = "resnet20"
    c.exclude = ""
    c.rewind = "iteration"
    c.rewind_step = "500it"
    return c
