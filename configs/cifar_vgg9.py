"""VGG-9 with explicit-mask dropout on CIFAR-10 (arXiv 2207.05952 §A), a Flax model (sme.flax_models).

Six 3x3 convs in three blocks (64, 64 | 128, 128 | 256, 256, each block ending in a 2x2 max-pool
and a dropout site), dense 512-512 with dropout, the readout; keep_prob 0.8 at every site,
cross-entropy, SGD with momentum, batch 128. Needs the CIFAR-10 binary version (no pickle):
download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it.

    python train.py --config=configs/cifar_vgg9.py --config.data.path=/data/cifar-10-batches-bin
    python analyze.py --workdir=runs/cifar_vgg9 --analyses=hessian,covariance --steps=last

* ``cifar100``: the same net on CIFAR-100 (train.bin / test.bin of cifar-100-binary.tar.gz).

A GPU-scale run: 3.5 M parameters, and every evaluation passes over all 60,000 images. For a
quick look on a CPU, shrink it, e.g. ``--config.data.num_train=2000 --config.data.num_test=500
--config.model.channels="(16,16,32,32,64,64)" --config.model.hidden="(128,128)"``.
"""

from configs import base


def get_config(variant: str = "cifar10"):
    if variant not in ("cifar10", "cifar100"):
        raise ValueError(f"cifar_vgg9 variant {variant!r}: expected 'cifar10' or 'cifar100'")
    c = base.get_config()
    c.data.name = variant
    c.model.name = "vgg9"
    c.model.input_shape = (32, 32, 3)
    c.model.channels = (64, 64, 128, 128, 256, 256)
    c.model.hidden = (512, 512)
    c.model.keep_prob = 0.8
    c.optim.name = "momentum"
    c.optim.lr = 0.01
    c.optim.momentum = 0.9
    c.optim.schedule = "cosine"
    c.train.batch_size = 128
    c.train.num_steps = 20000
    c.train.eval_every = 1000
    c.train.checkpoint_steps = "log:8"
    c.train.checkpoint_every = 1000
    return c
