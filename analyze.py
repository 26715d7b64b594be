"""Run analyses over the checkpoints of one or several training runs.

    python analyze.py --workdir=runs/default --analyses=hessian,covariance
    python analyze.py --workdir=runs/a,runs/b --analyses=hessian --steps=last --set=hessian.top_k=20 \
        --compare=runs/compare
    python analyze.py --workdir=runs/default --analyses=hessian,fisher --replica=all --batch_size=16
    python analyze.py --list
    python analyze.py --reproduce=cpu --report=reports/cpu     # E2-E6 end to end

The same command is installed as ``sme-analyze`` (works from any directory). Flags, artifacts and
behaviour: `sme.analyze_cli`.
"""

from sme.analyze_cli import main, parse_settings, run  # noqa: F401  (the entry point and its helpers)

if __name__ == "__main__":
    run()
