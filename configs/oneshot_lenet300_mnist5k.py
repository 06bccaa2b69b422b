"""LeNet-300-100 on `mnist5k` trained, pruned once, fine-tuned: the README's schedule comparison.

Training recipe of configs/lenet300_mnist5k.py (OpenLTH `mnist_lenet_300_100`: SGD lr 0.1,
batch 128, no momentum, 40 epochs; global magnitude pruning, output layer `out` not pruned).
After the 40 dense epochs the network is pruned in one step to IMP level 14's density (its exact
kept count, 11,664 of 265,200 prunable weights) and fine-tuned for 560 epochs, so the total
training equals IMP's 15 levels x 40 epochs = 600 epochs. Fine-tuning keeps the original
training's final learning rate (constant 0.1 here), as fine-tuning is defined by Renda et al.
2020 (arXiv:2003.02389).
"""

from lottery.gradual import base_config


def get_config():
    c = base_config("oneshot")
    c.dataset = "mnist5k"
    c.model = "lenet300_100"
    c.final_density = 11664 / 265200
    c.training_steps = "40ep"
    c.finetune_steps = "560ep"
    c.finetune_lr = 0.1
    return c
