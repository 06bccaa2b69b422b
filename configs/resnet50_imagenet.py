"""ResNet-50 on ImageNet with late rewinding (needs TFDS `imagenet2012` prepared in the data dir).

OpenLTH `imagenet_resnet_50` defaults (models/imagenet_resnet.py, `default_hparams`, "76.1% top-1"):
SGD momentum 0.9, batch 1024, lr 0.4 with a linear warmup over 5 epochs, x0.1 at epochs 30, 60
and 80, 90 epochs, weight decay 1e-4; pruning `sparse_global` with fraction 0.2 and no layers
ignored (pruning/sparse_global.py: `pruning_layers_to_ignore` None, so the output layer is
pruned). Rewinding to epoch 6 follows Frankle et al. 2020 ("Linear mode connectivity and the
lottery ticket hypothesis", their ResNet-50 rewinding point; this value was not checked against
the paper's text here). Images: the standard policy, random-resized crop + flip to 224 for
training (augment='imagenet'), resize + central 224 crop for evaluation. What differs from OpenLTH:
the model's init is torchvision's (Kaiming-normal fan_out convs, BN scales 1; `models.imagenet`),
where OpenLTH's `kaiming_normal` / `uniform` BN init would apply; masks count with lottery's exact
rule (`count_rule='openlth'` for OpenLTH's).

Prepare the data once (TFDS needs the two ILSVRC2012 tars, downloaded by hand from
image-net.org, and TensorFlow to write the records; reading them needs neither):

  pip install tensorflow
  mkdir -p DIR/downloads/manual && mv ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar \\
      DIR/downloads/manual/
  lottery prepare imagenet2012 --data-dir DIR
  lottery find-ticket --config configs/resnet50_imagenet.py --config.data_dir=DIR

TensorBoard event files are on (`tensorboard`; pip install 'lottery[tensorboard]', or
--config.tensorboard=false): watch with `tensorboard --logdir runs/`.
"""

from lottery.config import base


def get_config():
    c = base()
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.model = "resnet50"
    c.batch_size = 1024
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.lr = 0.4
    c.warmup_steps = "5ep"
    c.lr_schedule = "step"
    c.milestones = "30ep,60ep,80ep"
    c.gamma = 0.1
    c.weight_decay = 1e-4
    c.training_steps = "90ep"
    c.augment = "imagenet"
    c.fraction = 0.2
    c.scope = "global"
    c.exclude = ""
    c.rewind = "iteration"
    c.rewind_step = "6ep"
    c.tensorboard = True
    return c
