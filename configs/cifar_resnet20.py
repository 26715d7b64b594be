"""ResNet-20 with explicit-mask dropout on CIFAR-100 (arXiv 2111.01022), a Flax model (sme.flax_models).

A 3x3 stem conv, three stages of three basic blocks (16, 32, 64 channels), GroupNorm in place of
BatchNorm (so the net is a function of one example), global average pooling and the readout.
Dropout sites: after each stage and on the pooled features; keep_prob 0.9 at every site,
cross-entropy, SGD with momentum, batch 128. Needs the CIFAR-100 binary version (no pickle):
download cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it.

    python train.py --config=configs/cifar_resnet20.py --config.data.path=/data/cifar-100-binary
    python analyze.py --workdir=runs/cifar_resnet20 --analyses=hessian,covariance --steps=last

* ``cifar10``: the same net on CIFAR-10 (data_batch_*.bin / test_batch.bin).

``model.hidden`` is not used by resnet20 (the readout takes the pooled features). A GPU-scale run
(0.27 M parameters, convolutions at 32x32 resolution).
"""

from configs import base


def get_config(variant: str = "cifar100"):
    if variant not in ("cifar10", "cifar100"):
        raise ValueError(f"cifar_resnet20 variant {variant!r}: expected 'cifar10' or 'cifar100'")
    c = base.get_config()
    c.data.name = variant
    c.model.name = "resnet20"
    c.model.input_shape = (32, 32, 3)
    c.model.channels = (16, 32, 64)
    c.model.keep_prob = 0.9
    c.optim.name = "momentum"
    c.optim.lr = 0.05
    c.optim.momentum = 0.9
    c.optim.schedule = "cosine"
    c.train.batch_size = 128
    c.train.num_steps = 30000
    c.train.eval_every = 1000
    c.train.checkpoint_steps = "log:8"
    c.train.checkpoint_every = 1000
    return c
