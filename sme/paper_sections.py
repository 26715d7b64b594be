"""One report section per paper-scale experiment (see `sme.paper_report` for the verdict rules).

Each ``<experiment>(out_dir, module, tiny) -> dict`` reads the runs that the experiment's
config module plans, and returns ``status``, ``rows`` (claim | paper | ours | verdict | reason),
optional ``tables``, ``notes`` and ``figures``. Runs that have not finished count as not run.
Cost: reading the runs' metrics and artifacts, and one figure per section.
"""

from __future__ import annotations

import numpy as np

from sme.paper_report import (figure, finished_metrics, fmt_ci, last_artifact, metrics, row, save, scalar,
                              t_interval, verdict_absolute, verdict_equal, verdict_sign, welch_interval)

NOT_RUN = "not run in this budget"


def _status(done: int, planned: int) -> str:
    if done == 0:
        return NOT_RUN
    return "complete" if done == planned else f"partial: {done} of {planned} runs finished"


def _pct(values):
    return [100.0 * v for v in values]


def p_e5(out_dir: str, module, tiny: bool) -> dict:
    plan = module.get_plan(tiny)
    steps = plan[0]["config"].train.num_steps
    p = module.KEEP_PROB
    acc, curves = {}, {}
    for objective in ("dropout", "l1", "rs", "l2"):
        finals = []
        for seed in module.common.SEEDS:
            name = module.run_name(objective, p, seed)
            final = finished_metrics(out_dir, name, steps)
            if final is not None:
                finals.append(final["test/acc"])
                curves.setdefault(objective, []).append(metrics(out_dir, name))
        acc[objective] = _pct(finals)
    done = sum(finished_metrics(out_dir, e["name"], steps) is not None for e in plan)
    ci = {k: t_interval(v) for k, v in acc.items()}
    gap = welch_interval(acc["dropout"], acc["rs"])
    same = welch_interval(acc["l1"], acc["dropout"])
    paper = module.PAPER
    rows = [
        row(paper["dropout"][0], paper["dropout"][1], fmt_ci(ci["dropout"], unit=" %"),
            verdict_absolute(ci["dropout"], paper["dropout"][2])),
        row(paper["l1"][0], paper["l1"][1], fmt_ci(ci["l1"], unit=" %"), verdict_absolute(ci["l1"], paper["l1"][2])),
        row(paper["rs"][0], paper["rs"][1], fmt_ci(ci["rs"], unit=" %"), verdict_absolute(ci["rs"], paper["rs"][2])),
        row(paper["gap"][0], paper["gap"][1], fmt_ci(gap, unit=" pp"), verdict_sign(gap, +1, 9.0)),
        row(paper["l1_vs_dropout"][0], paper["l1_vs_dropout"][1], fmt_ci(same, unit=" pp"), verdict_equal(same, 1.0)),
        row(paper["l2"][0], paper["l2"][1], fmt_ci(ci["l2"], unit=" %"), ("-", "no paper number to compare")),
    ]
    # the keep_prob sweep (trained by P-E6's plan; one seed)
    sweep_rows = []
    for q in (0.6, 0.7, 0.8, 0.9):
        cells = []
        for objective in ("dropout", "l1"):
            final = finished_metrics(out_dir, module.run_name(objective, q, 0), steps)
            cells.append(f"{100 * final['test/acc']:.2f} %" if final else "not run")
        sweep_rows.append([q, *cells])
    rs0 = finished_metrics(out_dir, module.run_name("rs", p, 0), steps)
    sweep_rows.append(["1 (R_S)", f"{100 * rs0['test/acc']:.2f} %" if rs0 else "not run", ""])
    cfg = plan[0]["config"]
    notes = [f"MNIST-{cfg.data.num_train}, 784-{cfg.model.hidden[0]}-10 ReLU, MSE, full-batch GD, eps = "
             f"{cfg.optim.lr}, {steps} steps, keep_prob {p}, test on {cfg.data.num_test or 10000} images.",
             "The paper's eps = 5e-3 was not run in this budget (it needs 10x the steps)."]
    figures = []
    if curves:
        plt, fig, axes = figure(1, 2, (4.6, 3.4))
        labels = {"dropout": "dropout", "l1": "R_S + R_1", "rs": "R_S", "l2": "R_S + R~_2"}
        for objective, runs in curves.items():
            stepss = [r["step"] for r in runs[0]]
            mean = np.mean([[100 * r["test/acc"] for r in run] for run in runs], axis=0)
            axes[0].plot(stepss, mean, label=f"{labels[objective]} ({len(runs)} seeds)")
        axes[0].axhline(88.5, color="gray", ls=":", lw=1, label="paper: dropout, R_S + R_1")
        axes[0].axhline(79.0, color="gray", ls="--", lw=1, label="paper: R_S")
        axes[0].set(xlabel="GD step", ylabel="test accuracy (%)", title=f"P-E5, keep_prob {p}", ylim=(75, 93))
        axes[0].legend(fontsize=7)
        for k, objective in enumerate(("dropout", "l1")):
            qs = [r[0] for r in sweep_rows[:4] if r[1 + k] != "not run"]
            ys = [float(r[1 + k].split()[0]) for r in sweep_rows[:4] if r[1 + k] != "not run"]
            axes[1].plot(qs, ys, "o-", label=labels[objective])
        if ci["rs"]["mean"] is not None:
            axes[1].axhline(ci["rs"]["mean"], color="C2", ls="--", label="R_S")
        axes[1].set(xlabel="keep_prob p", ylabel="final test accuracy (%)", title="keep_prob sweep (seed 0)")
        axes[1].legend(fontsize=7)
        figures.append(save(plt, fig, out_dir, "paper_p_e5_accuracy.png"))
    return {"status": _status(done, len(plan)), "rows": rows, "accuracy_pct": acc, "notes": notes,
            "tables": [{"title": "Final test accuracy against keep_prob (seed 0)",
                        "columns": ["keep_prob", "dropout", "R_S + R_1"], "rows": sweep_rows}],
            "figures": figures}


def p_e4(out_dir: str, module, tiny: bool) -> dict:
    plan = module.get_plan(tiny)
    steps = plan[0]["config"].train.num_steps
    values = {v: {"acc": [], "lambda_max": [], "trace": [], "trace_se": []} for v in ("dropout", "plain")}
    profiles, curves = {}, {}
    done = 0
    for entry in plan:
        variant = entry["name"].split("/")[1].split("_")[0]
        final = finished_metrics(out_dir, entry["name"], steps)
        if final is None:
            continue
        done += 1
        values[variant]["acc"].append(100 * final["test/acc"])
        values[variant].setdefault("train_risk", []).append(final["train/risk"])
        curves.setdefault(variant, []).append(metrics(out_dir, entry["name"]))
        hess = last_artifact(out_dir, entry["name"], "hessian")
        values[variant]["lambda_max"].append(scalar(hess, "top_values", 0))
        values[variant]["trace"].append(scalar(hess, "trace_hutchinson"))
        values[variant]["trace_se"].append(scalar(hess, "trace_hutchinson_se"))
        prof = last_artifact(out_dir, entry["name"], "profile")
        if prof:
            profiles.setdefault(variant, []).append((np.asarray(prof["alphas"]), np.asarray(prof["train_losses"])))
    ci = {v: {k: t_interval(x) for k, x in d.items() if k != "trace_se"} for v, d in values.items()}
    risk = {v: t_interval(values[v].get("train_risk", [])) for v in values}
    acc_diff = welch_interval(values["dropout"]["acc"], values["plain"]["acc"])
    paper = module.PAPER

    def log_ratio(key):  # ratio dropout / plain on the log scale: exp of the Welch interval of log values
        logs = {v: [np.log(x) for x in values[v][key] if x is not None and x > 0] for v in values}
        d = welch_interval(logs["dropout"], logs["plain"])
        exp = {k: (float(np.exp(d[k])) if d[k] is not None else None) for k in ("mean", "low", "high")}
        return d, dict(exp, n=d["n"])

    lam_log, lam = log_ratio("lambda_max")
    tr_log, tr = log_ratio("trace")
    rows = [
        row("test accuracy with dropout", "98.7 %", fmt_ci(ci["dropout"]["acc"], unit=" %"),
            verdict_absolute(ci["dropout"]["acc"], (98.7, 98.7))),
        row("test accuracy without dropout", "98.1 %", fmt_ci(ci["plain"]["acc"], unit=" %"),
            verdict_absolute(ci["plain"]["acc"], (98.1, 98.1))),
        row(paper["acc"][0], paper["acc"][1], fmt_ci(acc_diff, unit=" pp"), verdict_sign(acc_diff, +1, 0.6)),
        row(paper["lambda_max"][0], paper["lambda_max"][1], fmt_ci(lam, digits=3), verdict_sign(lam_log, -1)),
        row(paper["trace"][0], paper["trace"][1], fmt_ci(tr, digits=3), verdict_sign(tr_log, -1)),
    ]
    table_rows = []
    for v in ("dropout", "plain"):
        table_rows.append([v, fmt_ci(ci[v]["acc"], unit=" %"), fmt_ci(ci[v]["lambda_max"], digits=3),
                           fmt_ci(ci[v]["trace"], digits=1)])
    cfg = plan[0]["config"]
    notes = [f"MNIST ({cfg.data.num_train or 60000} training images), 784-1024-1024-10 ReLU, cross-entropy, Adam "
             f"lr {cfg.optim.lr}, batch {cfg.train.batch_size}, {steps} steps; dropout keep_prob 0.8 / 0.5 after "
             "hidden layers 1 / 2.",
             f"Flatness like-for-like: Hessian of R_S (no dropout) on the same first "
             f"{module.HESSIAN['num_examples']} training images for both nets; Tr H by "
             f"{module.HESSIAN['num_probes']} Hutchinson probes (per-net standard errors in report.json).",
             "Ratios dropout / no dropout: exp of Welch's interval on log values.",
             f"Final training risk R_S (all training images): dropout {fmt_ci(risk['dropout'], digits=4)}, "
             f"no dropout {fmt_ci(risk['plain'], digits=4)}: the nets are compared at the same step, not at the "
             "same loss."]
    figures = []
    if profiles or curves:
        plt, fig, axes = figure(1, 2, (4.6, 3.4))
        for k, (variant, runs) in enumerate(sorted(profiles.items())):
            for i, (alphas, losses) in enumerate(runs):
                axes[0].plot(alphas, losses.mean(0), color=f"C{k}", alpha=0.8,
                             label=f"{variant} ({len(runs)} seeds)" if i == 0 else None)
        axes[0].set(xlabel="filter-normalised step alpha", ylabel=f"R_S (first {module.FLAT_EXAMPLES} training images)",
                    yscale="log", title="1-D profiles (mean over directions)")
        axes[0].legend(fontsize=7)
        for k, (variant, runs) in enumerate(sorted(curves.items())):
            for i, run in enumerate(runs):
                axes[1].plot([r["step"] for r in run], [100 * r["test/acc"] for r in run], color=f"C{k}",
                             label=variant if i == 0 else None)
        axes[1].set(xlabel="Adam step", ylabel="test accuracy (%)", ylim=(90, 100), title="P-E4 test accuracy")
        axes[1].legend(fontsize=7)
        figures.append(save(plt, fig, out_dir, "paper_p_e4.png"))
    return {"status": _status(done, len(plan)), "rows": rows, "values": values, "notes": notes,
            "tables": [{"title": "Per variant (mean [95% CI] over seeds)",
                        "columns": ["net", "test accuracy", "lambda_max(R_S)", "Tr H(R_S)"], "rows": table_rows}],
            "figures": figures}


def p_e6(out_dir: str, module, tiny: bool) -> dict:
    plan = [e for e in module.get_plan(tiny) if e.get("analyses")]
    found = []
    for entry in plan:
        arrays = last_artifact(out_dir, entry["name"], "fisher")
        if arrays:
            trained_p = 1.0 if entry["config"].objective == "r_s" else float(entry["config"].model.keep_prob)
            found.append((trained_p, arrays))
    found.sort(key=lambda item: item[0])
    table = []
    for q, a in found:
        table.append([q, f"{scalar(a, 'true_fisher_trace'):.4g}", f"{scalar(a, 'empirical_fisher_trace'):.4g}",
                      f"{scalar(a, 'true_fisher_eigenvalues', 0):.4g}",
                      f"{scalar(a, 'r1') or float('nan'):.4g}", f"{scalar(a, 'r1_quadratic') or float('nan'):.4g}"])
    rows, notes = [], ["One seed per keep_prob; p = 1 is the net trained on R_S (its R_1 is evaluated at p = 0.8)."]
    if len(found) >= 3:
        from scipy.stats import spearmanr

        qs = [q for q, _ in found]
        traces = [scalar(a, "true_fisher_trace") for _, a in found]
        rho = float(spearmanr(qs, traces).statistic)
        verdict = ("reproduced", "the trace rises monotonically with p") if rho > 0.999 else (
            ("partly", f"Spearman rho = {rho:.2f}: rising, not monotone") if rho > 0 else
            ("not reproduced", f"Spearman rho = {rho:.2f}"))
        rows.append(row(module.PAPER["trend"][0], module.PAPER["trend"][1], f"Spearman rho(p, Tr F) = {rho:.2f} "
                        f"over {len(qs)} nets (no interval: one seed each)", verdict))
        rel = [abs(scalar(a, "r1") - scalar(a, "r1_quadratic")) / max(abs(scalar(a, "r1")), 1e-30)
               for _, a in found if scalar(a, "r1") is not None and scalar(a, "r1_quadratic") is not None]
        if rel:
            rows.append(row(module.PAPER["identity"][0], module.PAPER["identity"][1],
                            f"max relative difference {max(rel):.1e}",
                            ("reproduced", "equal to float32 rounding") if max(rel) < 1e-3 else
                            ("not reproduced", "the two computations differ")))
    figures = []
    if found:
        plt, fig, axes = figure(1, 1, (5.0, 3.4))
        qs = [q for q, _ in found]
        for key, label in (("true_fisher_trace", "Tr true Fisher (= GGN, MSE)"),
                           ("empirical_fisher_trace", "Tr empirical Fisher"), ("r1", "R_1")):
            axes[0].plot(qs, [scalar(a, key) or np.nan for _, a in found], "o-", label=label)
        axes[0].set(xlabel="keep_prob p of training (1 = R_S)", yscale="log", title="P-E6: Fisher vs keep_prob")
        axes[0].legend(fontsize=7)
        figures.append(save(plt, fig, out_dir, "paper_p_e6_fisher.png"))
    return {"status": _status(len(found), len(plan)), "rows": rows, "notes": notes, "figures": figures,
            "tables": [{"title": "Fisher quantities of the trained nets (1,000 training images)",
                        "columns": ["keep_prob", "Tr F (true)", "Tr F (empirical)", "top eig F (true)", "R_1",
                                    "Fisher form of R_1"], "rows": table}] if table else []}


def p_e3(out_dir: str, module, tiny: bool) -> dict:
    import math
    import os

    from sme import paper_e3
    from sme.paper_report import run_dir

    settings = dict(module.analysis_settings(tiny), factors=(2.0, math.e))
    results = {"sgd": [], "dropout": []}
    plan = module.get_plan(tiny)
    for entry in plan:
        path = os.path.join(run_dir(out_dir, entry["name"]), paper_e3.RESULT)
        if os.path.exists(path):
            results[entry["name"].split("/")[1].split("_")[0]].append(paper_e3.analyse_block(
                run_dir(out_dir, entry["name"]), module.analysis_settings(tiny), block=module.BLOCK))
    done = sum(len(v) for v in results.values())
    head = (settings["headline_components"], settings["max_trend"], round(settings["headline_factor"], 4))
    psi = {v: [r["fits"][head]["psi"] for r in rs] for v, rs in results.items()}
    ci = {v: t_interval(x) for v, x in psi.items()}
    rows = [row(module.PAPER["psi_sgd"][0], module.PAPER["psi_sgd"][1], fmt_ci(ci["sgd"]),
                verdict_absolute(ci["sgd"], (4.0, 4.0), (0.5, 1.5), unit="")),
            row(module.PAPER["psi_dropout"][0], module.PAPER["psi_dropout"][1], fmt_ci(ci["dropout"]),
                ("-", "no paper number to compare")),
            row("psi > 0 (an inverse relation), SGD", "yes", fmt_ci(ci["sgd"]), verdict_sign(ci["sgd"], +1)),
            row("psi > 0 (an inverse relation), dropout SGD", "yes (2305.15850)", fmt_ci(ci["dropout"]),
                verdict_sign(ci["dropout"], +1))]
    decay = {v: t_interval([r["decay"]["exponent"] for r in rs]) for v, rs in results.items()}
    notes = [f"theta* = the last snapshot; F_i of R_S on the first {settings['num_examples']} training images; "
             f"headline: PCs 1-{head[0]}, PC 1 and PCs with trend fraction > {head[1]} excluded, c = e; "
             "capped widths left out. Per-seed bootstrap intervals in report.json.",
             "Spectrum decay sigma_i^2 ~ i^-a over PCs 2-60: a = " + ", ".join(
                 f"{v} {fmt_ci(decay[v])}" for v in decay)]
    table = []
    for k in settings["sensitivity_components"]:
        for max_trend in settings["sensitivity_trend"]:
            cells = [k, "off" if max_trend >= 1 else max_trend]
            for v in ("sgd", "dropout"):
                for factor in (math.e, 2.0):
                    vals = [r["fits"][(k, max_trend, round(factor, 4))]["psi"] for r in results[v]]
                    cells.append(fmt_ci(t_interval(vals)))
            table.append(cells)
    figures = []
    if done:
        plt, fig, axes = figure(1, 2, (4.4, 3.4))
        for ax, v in zip(axes, ("sgd", "dropout")):
            if not results[v]:
                ax.set_axis_off()
                continue
            r = results[v][0]
            k = r["width"].shape[1]
            excluded = (np.arange(k) < settings["num_excluded"]) | (r["trend"][:k] > settings["max_trend"])
            used = ~excluded & ~r["capped"][1]
            ax.loglog(r["width"][1][used], r["variances"][:k][used], "o", ms=3, label="fitted PCs")
            ax.loglog(r["width"][1][excluded], r["variances"][:k][excluded], "x", color="red", label="drift PCs")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on short decades
            ax.set(xlabel="interval flatness F_i (c = e)", ylabel="sigma_i^2",
                   title=f"P-E3 {v}, seed 0: psi = {r['fits'][head]['psi']:.2f}")
            ax.legend(fontsize=7)
        figures.append(save(plt, fig, out_dir, "paper_p_e3_variance_flatness.png"))
    return {"status": _status(done, len(plan)), "rows": rows, "notes": notes, "figures": figures,
            "psi": psi, "tables": [{"title": "psi sensitivity (mean [95% CI] over seeds)",
                                    "columns": ["PCs", "max_trend", "SGD c=e", "SGD c=2", "dropout c=e",
                                                "dropout c=2"], "rows": table}]}
