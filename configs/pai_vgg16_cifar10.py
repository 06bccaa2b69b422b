"""VGG-16 (batch norm) on CIFAR-10 pruned at initialization: the Synaptic Flow paper's setting.

Needs TFDS `cifar10` prepared in the data dir. Tanaka et al. 2020 (arXiv:2006.05467), Fig. 6, as
read from the reference code's single-shot runs
(`Results/data/singleshot/*/args.json`): SGD momentum 0.9, lr 0.1, weight decay 1e-4, batch 128,
160 epochs with lr x0.1 at epochs 60 and 120, flip + crop augmentation; scorers Random, Magnitude,
SNIP, GraSP and SynFlow, SynFlow in 100 rounds on the exponential schedule and the others in one
shot, global scope; SNIP/GraSP score on 10 x 10 = 100 augmented training examples; compression
10^0 ... 10^3 in quarter-decade steps (13 points), 3 seeds.
Compression ratio here = prunable weights / kept = 1 / density (the reference's `--compression`
is the log10 of it). Every conv and dense kernel is prunable, biases and BN parameters are not,
as in the reference. Init as the reference VGG (`Models/lottery_vgg.py`): Kaiming-normal kernels,
zero biases, BN scales 1 (`bias_init='zeros'`, `bn_init='ones'`; OpenLTH's cifar_vgg_16 layout).
"""

from lottery.pai import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.model = "vgg16"
    c.bias_init = "zeros"
    c.bn_init = "ones"
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.lr = 0.1
    c.weight_decay = 1e-4
    c.batch_size = 128
    c.training_steps = "160ep"
    c.lr_schedule = "step"
    c.milestones = "60ep,120ep"
    c.gamma = 0.1
    c.augment = "cifar"
    c.scorers = "random,magnitude,snip,grasp,synflow"
    c.compressions = ",".join(f"10^{k / 4:g}" for k in range(13))
    c.seeds = 3
    c.rounds = "synflow=100"
    c.prune_schedule = "exponential"
    c.prune_augment = True
    return c
