"""Configs of the paper-scale experiments (`python analyze.py --reproduce=paper`), one file each."""
