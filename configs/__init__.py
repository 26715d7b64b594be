"""Run configs (`python train.py --config=configs/NAME.py`), one file each.

Installed as a package (pyproject.toml), so ``from configs import base`` inside every config and
``--config=configs/NAME.py`` (resolved by `sme.cli.config_path`) work from any directory.
"""
