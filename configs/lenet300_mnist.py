"""LeNet-300-100 on full MNIST (needs TFDS `mnist` prepared in the data dir).

OpenLTH `mnist_lenet_300_100` (models/mnist_lenet.py): SGD lr 0.1, batch 128, 40 epochs, fraction 0.2,
global magnitude, output layer not pruned, rewinding to initialization; OpenLTH's init
(Kaiming-normal kernels, PyTorch-default biases: `bias_init='torch'`).
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "mnist"
    c.model = "lenet300_100"
    c.levels = 20
    return c
