"""Pruning at initialization on the offline `mnist5k` digits: the README's scorer sweep.

LeNet-300-100 with OpenLTH's `mnist_lenet_300_100` recipe (SGD lr 0.1, batch 128, no momentum)
shortened to 20 epochs so the whole sweep (5 scorers x 7 compression ratios 10^0 ... 10^3 in
half-decade steps x 3 seeds) runs in a few minutes on a laptop CPU. Pruning as in Synaptic
Flow's paper runs (the Synaptic-Flow code's Results/data/singleshot args.json): global scope, every kernel prunable
(the output layer too), SynFlow 100 rounds on the exponential schedule, the other scorers
one-shot, SNIP/GraSP on 10 x 10 = 100 training examples.
Compression ratio = prunable weights / kept (1 / density): 1000 keeps 266 of 266,200 weights.
"""

from lottery.pai import base_config


def get_config():
    c = base_config()
    c.dataset = "mnist5k"
    c.model = "lenet300_100"
    c.training_steps = "20ep"
    c.scorers = "snip,grasp,synflow,magnitude,random"
    c.compressions = "1,10^0.5,10,10^1.5,100,10^2.5,1000"
    c.seeds = 3
    return c
