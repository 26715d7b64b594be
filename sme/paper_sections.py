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
             "The paper's eps = 5e-3 is the P-E5-lr section (4,000 steps, t = 20)."]
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
        row(paper["lambda_max"][0], paper["lambda_max"][1], fmt_ci(lam, digits=3), verdict_sign(lam_log, -1, null="1")),
        row(paper["trace"][0], paper["trace"][1], fmt_ci(tr, digits=3), verdict_sign(tr_log, -1, null="1")),
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


def _alignment_series(out_dir: str, name: str) -> list[tuple[int, dict]]:
    """(step, alignment arrays) of every analysed checkpoint of run ``name``, by step."""
    import glob
    import os

    from sme import io
    from sme.paper_report import run_dir

    paths = glob.glob(os.path.join(run_dir(out_dir, name), "analysis", "alignment", "step_*.npz"))
    return sorted((int(os.path.basename(p)[5:-4]), io.load_arrays(p)) for p in paths)


def p_e2(out_dir: str, module, tiny: bool) -> dict:
    plan = module.get_plan(tiny)
    steps_total = plan[0]["config"].train.num_steps
    checkpoints = [0, steps_total // 2, steps_total] if tiny else [int(s) for s in module.CHECKPOINTS.split(",")]
    # series[variant][seed] = {step: arrays}; a run counts once its last checkpoint is analysed
    series: dict[str, list[dict]] = {"dropout": [], "sgd": []}
    for entry in plan:
        variant = entry["name"].split("/")[1].split("_")[0]
        by_step = dict(_alignment_series(out_dir, entry["name"]))
        if steps_total in by_step and finished_metrics(out_dir, entry["name"], steps_total) is not None:
            series[variant].append(by_step)
    done = sum(len(v) for v in series.values())

    def at(variant, step, key):
        return [scalar(s[step], key) for s in series[variant] if step in s]

    def minus(a, b):
        return [x - y for x, y in zip(a, b) if x is not None and y is not None]

    last = steps_total
    d_drop = minus(at("dropout", last, "dropout_alpha_unbiased"), at("dropout", last, "dropout_null_haar_unbiased_mean"))
    d_sgd = minus(at("sgd", last, "sgd_alpha_unbiased"), at("sgd", last, "sgd_null_haar_unbiased_mean"))
    d_same = minus(at("dropout", last, "sgd_alpha_unbiased"), at("dropout", last, "sgd_null_haar_unbiased_mean"))
    # conservative check: the plug-in alpha (biased low) against the null of the same plug-in Sigma_K
    p_drop = t_interval(minus(at("dropout", last, "dropout_alpha"), at("dropout", last, "dropout_null_haar_mean")))
    p_sgd = t_interval(minus(at("sgd", last, "sgd_alpha"), at("sgd", last, "sgd_null_haar_mean")))
    slope_drop, slope_sgd = at("dropout", last, "dropout_slope"), at("sgd", last, "sgd_slope")
    ci = {k: t_interval(v) for k, v in dict(d_drop=d_drop, d_sgd=d_sgd, d_same=d_same, slope_drop=slope_drop,
                                             slope_sgd=slope_sgd).items()}
    alpha = {k: t_interval(at(v, last, key)) for k, (v, key) in dict(
        drop=("dropout", "dropout_alpha_unbiased"), drop_null=("dropout", "dropout_null_haar_unbiased_mean"),
        same=("dropout", "sgd_alpha_unbiased"), sgd=("sgd", "sgd_alpha_unbiased"),
        sgd_null=("sgd", "sgd_null_haar_unbiased_mean")).items()}
    paper = module.PAPER
    rows = [
        row(paper["alpha_drop"][0], paper["alpha_drop"][1],
            f"{fmt_ci(ci['d_drop'], digits=3)}; alpha {fmt_ci(alpha['drop'], digits=3)}, null "
            f"{fmt_ci(alpha['drop_null'], digits=4)}; plug-in alpha - null {fmt_ci(p_drop, digits=3)}",
            verdict_sign(ci["d_drop"], +1)),
        row(paper["alpha_sgd"][0], paper["alpha_sgd"][1],
            f"{fmt_ci(ci['d_sgd'], digits=3)}; alpha {fmt_ci(alpha['sgd'], digits=3)}, null "
            f"{fmt_ci(alpha['sgd_null'], digits=4)}; plug-in alpha - null {fmt_ci(p_sgd, digits=3)}",
            verdict_sign(ci["d_sgd"], +1)),
        row("control: alpha(H, Sigma_SGD) - null at the dropout run's theta", "(control)",
            f"{fmt_ci(ci['d_same'], digits=3)}; alpha {fmt_ci(alpha['same'], digits=3)}",
            ("-", "SGD noise at the same theta, same H and K: is the alignment specific to dropout?")),
        row(paper["slope_drop"][0], paper["slope_drop"][1], fmt_ci(ci["slope_drop"]), verdict_sign(ci["slope_drop"], +1)),
        row(paper["slope_sgd"][0], paper["slope_sgd"][1], fmt_ci(ci["slope_sgd"]), verdict_sign(ci["slope_sgd"], +1)),
    ]
    table = []
    for step in checkpoints:
        table.append([step] + [fmt_ci(t_interval(at(v, step, key)), digits=3) for v, key in (
            ("dropout", "dropout_alpha_unbiased"), ("dropout", "dropout_null_haar_unbiased_mean"),
            ("dropout", "sgd_alpha_unbiased"), ("sgd", "sgd_alpha_unbiased"), ("sgd", "sgd_null_haar_unbiased_mean"),
            ("dropout", "dropout_slope"))])
    s = module.TINY_ALIGNMENT if tiny else module.ALIGNMENT
    cfg = plan[0]["config"]
    notes = [f"MNIST, 784-{cfg.model.hidden[0]}-{cfg.model.hidden[1]}-10 ReLU without biases, cross-entropy, SGD batch "
             f"{cfg.train.batch_size}, lr {cfg.optim.lr}, {steps_total} steps; dropout run: keep_prob "
             f"{cfg.model.keep_prob} on both hidden layers.",
             f"H = Hessian of R_S on the first {s['num_examples']} training images for every noise and run (top "
             f"{s['top_k']} eigenpairs by Lanczos, ||H||_F from them plus {s['num_probes']} Hutchinson probes); "
             f"Sigma from K = {s['num_masks']} mask gradients (dropout) or {s['sgd_examples']} single-example "
             "gradients (SGD); alpha with the unbiased ||Sigma||_F; null = the exact Haar mean for the same "
             "spectra. Intervals: Student-t over seeds of the per-seed difference alpha - null."]
    plug = {k: t_interval(at(v, last, key)) for k, (v, key) in dict(
        drop=("dropout", "dropout_alpha"), same=("dropout", "sgd_alpha"), sgd=("sgd", "sgd_alpha")).items()}
    notes.append("The unbiased ||Sigma||_F of K samples can fall below the true value, so alpha can exceed the "
                 "Cauchy-Schwarz bound 1 (most for the heavy-tailed single-example SGD gradients); the plug-in alpha "
                 f"(biased low, <= 1) at the last step: dropout noise {fmt_ci(plug['drop'], digits=3)}, SGD noise at "
                 f"the dropout run's theta {fmt_ci(plug['same'], digits=3)}, SGD run {fmt_ci(plug['sgd'], digits=3)}.")
    figures = []
    if done:
        plt, fig, axes = figure(1, 2, (4.6, 3.4))
        for variant, key, null, color, label in (
                ("dropout", "dropout_alpha_unbiased", "dropout_null_haar_unbiased_mean", "C0", "dropout noise, dropout run"),
                ("dropout", "sgd_alpha_unbiased", "sgd_null_haar_unbiased_mean", "C1", "SGD noise, dropout run"),
                ("sgd", "sgd_alpha_unbiased", "sgd_null_haar_unbiased_mean", "C3", "SGD noise, SGD run")):
            xs = [st for st in checkpoints if at(variant, st, key)]
            if not xs:
                continue
            means = [t_interval(at(variant, st, key))["mean"] for st in xs]
            axes[0].plot([max(x, 1) for x in xs], means, "o-", color=color, label=f"{label} ({len(series[variant])} seeds)")
            axes[0].plot([max(x, 1) for x in xs], [t_interval(at(variant, st, null))["mean"] for st in xs], ":",
                         color=color, lw=1)
            slopes = [t_interval(at(variant, st, key.replace("alpha_unbiased", "slope")))["mean"] for st in xs]
            axes[1].plot([max(x, 1) for x in xs], slopes, "o-", color=color, label=label)
        axes[0].set(xscale="log", yscale="log", xlabel="training step (0 shown at 1)", ylabel="alpha(H, Sigma)",
                    title="alignment (dotted: Haar null)")
        axes[0].legend(fontsize=6)
        axes[1].axhline(0.0, color="gray", lw=0.8)
        axes[1].set(xscale="log", xlabel="training step (0 shown at 1)", ylabel="slope of log u^T Sigma u vs log lambda",
                    title="projected variance vs lambda")
        figures.append(save(plt, fig, out_dir, "paper_p_e2_alignment.png"))
    return {"status": _status(done, len(plan)), "rows": rows, "notes": notes, "figures": figures,
            "tables": [{"title": "Along training (mean [95% CI] over seeds)",
                        "columns": ["step", "alpha drop (drop run)", "Haar null (drop)", "alpha SGD (drop run)",
                                    "alpha SGD (SGD run)", "Haar null (SGD run)", "slope drop"], "rows": table}]}


def fashion(out_dir: str, module, tiny: bool) -> dict:
    import math

    plan = module.get_plan(tiny)
    steps = plan[0]["config"].train.num_steps
    acc: dict[float, list[float]] = {}
    by_seed: dict[float, dict[int, float]] = {}
    objective: dict[float, dict[int, float]] = {}
    done = 0
    for entry in plan:
        final = finished_metrics(out_dir, entry["name"], steps)
        if final is None:
            continue
        done += 1
        lam = 0.0 if entry["config"].objective == "dropout" else float(entry["config"].penalty_lr)
        acc.setdefault(lam, []).append(100 * final["test/acc"])
        by_seed.setdefault(lam, {})[entry["config"].seed] = 100 * final["test/acc"]
        objective.setdefault(lam, {})[entry["config"].seed] = final.get("train/objective")
    ci = {lam: t_interval(v) for lam, v in sorted(acc.items())}
    eps = module.EPS
    penalised = {lam: c for lam, c in ci.items() if lam > 0 and c["mean"] is not None}
    rows = []
    if penalised and 0.0 in ci:
        def paired(lam):  # same seed = same initialisation, batches and masks: a paired difference
            return t_interval([v - by_seed[0.0][seed] for seed, v in by_seed.get(lam, {}).items() if seed in by_seed[0.0]])

        # the best lambda by its mean paired difference to the dropout line (seed effects cancel)
        best = max(penalised, key=lambda lam: -math.inf if paired(lam)["mean"] is None else paired(lam)["mean"])

        gain = paired(best)
        near = eps / 2 <= best <= 2 * eps
        beats = gain["low"] is not None and gain["low"] > 0
        verdict = ("reproduced", "best lambda within 2x of eps and above the dropout line") if near and beats else (
            ("partly", "best lambda within 2x of eps, but not above the dropout line") if near else
            ("partly", f"above the dropout line, but the best lambda is {best / eps:g} eps") if beats else
            ("not reproduced", f"the best lambda is {best / eps:g} eps and not above the dropout line"))
        if gain["low"] is None:
            verdict = ("not enough seeds", "one seed: no interval")
        rows.append(row(module.PAPER["best"][0], module.PAPER["best"][1],
                        f"lambda = {best:g} = {best / eps:g} eps ({fmt_ci(penalised[best], unit=' %')})", verdict))
        rows.append(row(module.PAPER["gain"][0], module.PAPER["gain"][1], fmt_ci(gain, unit=" pp"),
                        verdict_sign(gain, +1)))
        at_eps = paired(eps)
        rows.append(row("penalised at lambda = eps - dropout", "> 0", fmt_ci(at_eps, unit=" pp"),
                        verdict_sign(at_eps, +1)))
    cfg = plan[0]["config"]
    table = [["dropout (lambda = 0)" if lam == 0 else f"{lam:g} ({lam / eps:g} eps)", fmt_ci(c, unit=" %")]
             for lam, c in ci.items()]
    notes = [f"Fashion-MNIST, 784-{cfg.model.hidden[0]}-10 ReLU (the paper's width 4096 reduced for the CPU budget), "
             f"cross-entropy, SGD batch {cfg.train.batch_size}, lr eps = {eps:g}, {steps} steps, keep_prob "
             f"{cfg.model.keep_prob} after the hidden layer; test accuracy on {cfg.data.num_test or 10000} test images.",
             "Penalised runs: R^drop_S + (lambda/4)||grad R^drop_S||^2 (one mask draw per example, the minibatch's "
             "gradient), trained at the same eps; lambda = 0 is the dropout line. Differences to the dropout line "
             "are paired by seed (the same initialisation, batches and masks) with a Student-t interval."]
    if penalised and 0.0 in objective:  # the penalty's size: training objective minus the dropout run's (same seed)
        top = max(penalised)
        shares = [(objective[top][sd] - objective[0.0][sd]) / objective[0.0][sd] for sd in objective[top]
                  if sd in objective[0.0] and objective[top][sd] is not None and objective[0.0][sd]]
        if shares:
            notes.append(f"Size of the explicit term at the largest lambda = {top:g}: the training objective over the "
                         f"last {cfg.train.eval_every} steps exceeds the dropout run's by {100 * np.mean(shares):.1f} % "
                         "(mean over seeds), so the penalty is a small fraction of the loss at these lambda.")
    if 0.0 in by_seed:
        table = [row_ + [fmt_ci(t_interval([by_seed[lam][sd] - by_seed[0.0][sd] for sd in by_seed[lam]
                                            if sd in by_seed[0.0]]), digits=3, unit=" pp") if lam else ""]
                 for row_, lam in zip(table, ci)]
    else:
        table = [row_ + [""] for row_ in table]
    figures = []
    if penalised and 0.0 in by_seed:
        plt, fig, axes = figure(1, 1, (5.0, 3.4))
        lams = sorted(penalised)
        diffs = [t_interval([by_seed[lam][sd] - by_seed[0.0][sd] for sd in by_seed[lam] if sd in by_seed[0.0]])
                 for lam in lams]
        lows = [d["mean"] - d["low"] if d["low"] is not None else 0.0 for d in diffs]
        highs = [d["high"] - d["mean"] if d["high"] is not None else 0.0 for d in diffs]
        axes[0].errorbar(lams, [d["mean"] for d in diffs], yerr=[lows, highs], fmt="o-", capsize=3,
                         label="R^drop + (lambda/4)||grad R^drop||^2 minus dropout (paired by seed, 95 % CI)")
        axes[0].axhline(0.0, color="C1", label=f"dropout at eps = {eps:g} (mean {ci[0.0]['mean']:.2f} %)")
        axes[0].axvline(eps, color="gray", ls=":", label="lambda = eps")
        axes[0].xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on short decades
        axes[0].set(xscale="log", xlabel="lambda", ylabel="test accuracy difference (pp)",
                    title="Fashion-MNIST: explicit R_2 penalty vs dropout")
        axes[0].legend(fontsize=6)
        figures.append(save(plt, fig, out_dir, "paper_fashion_lambda.png"))
    return {"status": _status(done, len(plan)), "rows": rows, "notes": notes, "figures": figures,
            "accuracy_pct": {str(k): v for k, v in acc.items()},
            "tables": [{"title": "Final test accuracy (mean [95% CI] over seeds)", "columns": ["lambda", "test accuracy", "minus dropout (paired)"],
                        "rows": table}]}


def p_e1(out_dir: str, module, tiny: bool) -> dict:
    plan = module.get_plan(tiny)
    cfg = plan[0]["config"]
    a = last_artifact(out_dir, plan[0]["name"], "weak_error")
    if not a:
        return {"status": NOT_RUN, "rows": [], "notes": []}
    names = [str(n) for n in np.asarray(a["g_names"])]
    lrs = np.asarray(a["lr"], np.float64)
    rows, table = [], []
    order = lambda v, g: {"mean": scalar(a, f"order/{v}/{g}/p{cfg.model.keep_prob:g}"),  # noqa: E731
                          "low": scalar(a, f"order/{v}/{g}/p{cfg.model.keep_prob:g}_low"),
                          "high": scalar(a, f"order/{v}/{g}/p{cfg.model.keep_prob:g}_high"), "n": len(lrs)}
    for g in ("R_S", "f_probe0"):
        if g not in names:
            continue
        o, k = order("order1", g), names.index(g)
        err = np.asarray(a["order1/error"])[:, -1, k]
        floor = np.asarray(a["order1/floor"])[:, -1, k]
        unresolved = [f"{lr:g}" for lr, e, f in zip(lrs, err, floor) if not e > f]
        if o["mean"] is None:  # bias-corrected errors of 0 at some eps: no log-log fit
            ours = f"no fit: the SME's error is within its Monte Carlo floor at eps = {', '.join(unresolved)}"
            verdict = ("partly", "the SME matches dropout GD to Monte Carlo precision, so its order is not measurable")
        else:
            ours = f"{fmt_ci(o).replace('(n=', '(eps points: ')} (bootstrap over replica groups)"
            verdict = verdict_absolute(o if o["low"] is not None else dict(o, low=o["mean"], high=o["mean"]),
                                       (1.0, 1.0), (0.25, 0.5), unit="")
        rows.append(row(f"{module.PAPER['order1'][0]}, g = {g}", module.PAPER["order1"][1],
                        f"{ours}; ODE control: order {fmt_ci(order('ode1', g)).replace('(n=', '(eps points: ')}",
                        verdict))
    j = names.index("R_S") if "R_S" in names else 0
    small = int(np.argmin(lrs))
    if "ode1/beats/order1" in a:
        frac = float(np.asarray(a["order1/beats/ode1"])[small, -1, j]) if "order1/beats/ode1" in a else None
        e1, e0 = float(np.asarray(a["order1/error"])[small, -1, j]), float(np.asarray(a["ode1/error"])[small, -1, j])
        rows.append(row(module.PAPER["diffusion"][0] + f" (g = {names[j]})", module.PAPER["diffusion"][1],
                        f"SME {e1:.2e} vs ODE {e0:.2e}; SME below in {100 * frac:.0f} % of bootstrap draws"
                        if frac is not None else f"SME {e1:.2e} vs ODE {e0:.2e}",
                        ("reproduced", "SME below the ODE in >= 95 % of draws") if frac is not None and frac >= 0.95 else
                        ("not reproduced", "the SME's error is not resolved below the ODE's")))
    for c, lr in enumerate(lrs):
        cells = [f"{lr:g}"]
        for g in ("R_S", "f_probe0"):
            if g not in names:
                continue
            k = names.index(g)
            cells += [f"{float(np.asarray(a[f'{v}/{key}'])[c, -1, k]):.2e}" for v, key in
                      (("order1", "error"), ("order1", "floor"), ("ode1", "error"))]
        table.append(cells)
    s = cfg.sde
    notes = [f"MNIST-{cfg.data.num_train} inputs, two-layer 784-{cfg.model.hidden[0]}-10 ReLU without biases, "
             f"MSE, full-batch dropout GD (shared masks, keep_prob {cfg.model.keep_prob}), R = {s.num_replicas} "
             f"replicas in {s.num_batches} groups, SME time T = {s.horizon}, eps in {s.lr_grid}; diffusion "
             f"{s.diffusion} (K = {s.num_masks} mask gradients per step), coupling {s.coupling}.",
             "Monte Carlo floor = the standard error of the difference of replica means (the table's 'floor'); "
             "errors are bias-corrected and read at t = T. Order intervals: bootstrap over replica groups "
             "(one sweep: there are no seeds).",
             f"The floors grow with eps: for {names[j]} from {float(np.asarray(a['order1/floor'])[small, -1, j]):.1e} "
             f"at eps = {lrs[small]:g} to {float(np.asarray(a['order1/floor'])[int(np.argmax(lrs)), -1, j]):.1e} at "
             f"eps = {lrs.max():g}, where the replicas spread widely (dropout GD near its stability edge)."]
    figures = []
    plt, fig, axes = figure(1, 1, (5.0, 3.4))
    for v, color in (("order1", "C0"), ("ode1", "C3")):
        raw, err = np.asarray(a[f"{v}/raw"])[:, -1, j], np.asarray(a[f"{v}/error"])[:, -1, j]
        err = np.where(err > np.asarray(a[f"{v}/floor"])[:, -1, j], err, 0.0)  # resolved above the floor
        axes[0].loglog(lrs, raw, "-", color=color, label=f"{v} |E g - E g_discrete| ({names[j]}; hollow: below floor)")
        axes[0].scatter(lrs, raw, color=[color if e > 0 else "white" for e in err], edgecolors=color, zorder=3)
        axes[0].loglog(lrs, np.asarray(a[f"{v}/floor"])[:, -1, j], ":", color=color, label=f"{v} MC floor")
    axes[0].loglog(lrs, np.asarray(a["ode1/raw"])[small, -1, j] * lrs / lrs[small], "--", color="gray",
                   lw=0.8, label="slope 1")
    axes[0].set(xlabel="eps", ylabel=f"weak error of {names[j]} at t = T", title="P-E1: SME weak error, MNIST-1k")
    axes[0].legend(fontsize=7)
    figures.append(save(plt, fig, out_dir, "paper_p_e1_weak_error.png"))
    columns = ["eps"] + [f"{g}: {c}" for g in ("R_S", "f_probe0") if g in names
                         for c in ("order1 error", "order1 floor", "ode1 error")]
    return {"status": "complete", "rows": rows, "notes": notes, "figures": figures,
            "tables": [{"title": "Weak errors at t = T", "columns": columns, "rows": table}]}


def p_e5_lr(out_dir: str, module, tiny: bool) -> dict:
    plan = module.get_plan(tiny)
    steps = plan[0]["config"].train.num_steps
    acc, curves = {o: [] for o in module.OBJECTIVES}, {}
    for entry in plan:
        final = finished_metrics(out_dir, entry["name"], steps)
        if final is not None:
            objective = entry["name"].split("/")[1].rsplit("_", 1)[0]
            acc[objective].append(100 * final["test/acc"])
            curves.setdefault(objective, []).append(metrics(out_dir, entry["name"]))
    done = sum(len(v) for v in acc.values())
    ci = {k: t_interval(v) for k, v in acc.items()}
    gap, same = welch_interval(acc["dropout"], acc["rs"]), welch_interval(acc["l1"], acc["dropout"])
    paper = module.PAPER
    rows = [row(paper[k][0] + f" (eps {module.EPS:g}, step {steps})", paper[k][1], fmt_ci(ci[k], unit=" %"),
                verdict_absolute(ci[k], paper[k][2])) for k in ("dropout", "l1", "rs")]
    rows += [row(paper["gap"][0], paper["gap"][1], fmt_ci(gap, unit=" pp"), verdict_sign(gap, +1, 9.0)),
             row(paper["l1_vs_dropout"][0], paper["l1_vs_dropout"][1], fmt_ci(same, unit=" pp"), verdict_equal(same, 1.0))]
    cfg = plan[0]["config"]
    notes = [f"As P-E5 at eps = {cfg.optim.lr:g}: {steps} full-batch GD steps (t = {steps * cfg.optim.lr:g}; not the "
             "plateau), keep_prob 0.8, test on all 10,000 test images."]
    figures = []
    if curves:
        plt, fig, axes = figure(1, 1, (5.0, 3.4))
        labels = {"dropout": "dropout", "l1": "R_S + R_1", "rs": "R_S"}
        for objective, runs in curves.items():
            for i, run in enumerate(runs):
                axes[0].plot([r["step"] for r in run], [100 * r["test/acc"] for r in run], color=f"C{list(labels).index(objective)}",
                             label=f"{labels[objective]} ({len(runs)} seeds)" if i == 0 else None)
        axes[0].axhline(88.5, color="gray", ls=":", lw=1, label="paper: dropout, R_S + R_1")
        axes[0].axhline(79.0, color="gray", ls="--", lw=1, label="paper: R_S")
        axes[0].set(xlabel="GD step", ylabel="test accuracy (%)", title=f"P-E5 at eps = {cfg.optim.lr:g}", ylim=(60, 93))
        axes[0].legend(fontsize=7)
        figures.append(save(plt, fig, out_dir, "paper_p_e5_lr_accuracy.png"))
    return {"status": _status(done, len(plan)), "rows": rows, "notes": notes, "figures": figures,
            "accuracy_pct": acc}
