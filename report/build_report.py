"""Typeset both reports from outputs/: ex1_report.pdf (HUJI Exercise 1, at most 5 pages) and
apml_lab_report.pdf (Uppsala lab, 3.1 to 3.5 and 4.1 to 4.10), with Typst.

The scripts compute every number and verdict into their metrics.json; this step only reads them,
formats them into one JSON of named values per report (<outputs>/report/ex1_values.json,
apml_lab_values.json) and typesets the Typst templates with it. The templates are copied into
<outputs>/report/ beside the PDFs; once you edit a copy (your name, your own words), it is kept
and used by every later build: run this script (or `make report`) again to rebuild.
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# utils imports torch only on first use, and this builder never uses it
from utils import (BUILT_FROM, EXPERIMENTS, OUTPUTS_DIR, OneLineParser, UsageError, display_path,  # noqa: E402
                   experiment_command, path_in, run_main, sha256, within_two_se, write_atomic)

TEMPLATES = ROOT / "report"
REPORTS = {  # template -> (PDF, the experiments whose metrics.json it reads)
    "ex1": ("ex1_report.pdf", ["sup_classification", "vae_amortized", "vae_latent_opt",
                               "log_likelihood", "vae_amortized_elbo", "log_likelihood_elbo"]),
    "apml_lab": ("apml_lab_report.pdf", ["ppca_pca"]),
}
EX1_MAX_PAGES = 5


# ----------------------------------------------------------------------------------------------
# Reading what the scripts computed
# ----------------------------------------------------------------------------------------------
class Metrics(dict):
    """A metrics.json object that names its script when a key is missing (an output written by
    an older or interrupted run), so the report says what to run instead of a traceback. Every
    read is noted in `reads` (shared by all the files of one build), so that a value of the
    wrong type can be traced to the file it came from: the one read last."""

    def __init__(self, data, path: Path, writer: str, reads: dict):
        super().__init__(data)
        self.path, self.writer, self.reads = path, writer, reads

    def __getitem__(self, key):
        self.reads["last"] = self
        try:
            return super().__getitem__(key)
        except KeyError:
            raise UsageError(f"{self.path} lacks {key!r} (written by an older or other version?): "
                             f"run {self.writer} again") from None


def refuse_constant(name: str):
    raise ValueError(f"it holds {name}")      # NaN or infinity: a script never writes them


def metrics_bytes(outputs: Path) -> dict:
    """Every experiment's metrics.json as bytes (the OSError where one cannot be read), read
    once: the --quick check, the report and the record of what the PDFs were typeset from
    (BUILT_FROM) all use these same bytes."""
    raw = {}
    for script in dict.fromkeys(s for _, scripts in REPORTS.values() for s in scripts):
        path = outputs / script / "metrics.json"
        try:
            if path.exists() and not path.is_file():    # a pipe would wait for a writer forever
                raise OSError("not a regular file")     # (the message names the path)
            raw[script] = path.read_bytes()
        except OSError as err:
            raw[script] = err
    return raw


def quick_outputs(outputs: Path, raw: dict) -> bool:
    """Whether `outputs` holds --quick runs (as its readable metrics.json files say), so that
    the advice to run a script again includes --quick. A folder that mixes --quick and full
    runs is refused: its report would answer from both."""
    quick = {}
    for script, data in raw.items():
        try:
            quick[script] = json.loads(data.decode("utf-8"))["args"]["quick"] is True
        except (AttributeError, ValueError, RecursionError, KeyError, TypeError):
            continue
    if len(set(quick.values())) > 1:
        odd = sorted(s for s, q in quick.items() if q != (sum(quick.values()) > len(quick) / 2))
        kind = "full" if sum(quick.values()) > len(quick) / 2 else "--quick"
        raise UsageError(f"{outputs} mixes --quick and full runs ({', '.join(odd)} "
                         f"{'is a' if len(odd) == 1 else 'are'} {kind}); run "
                         f"{'it' if len(odd) == 1 else 'them'} again like the others, or use "
                         f"another --outputs")
    return any(quick.values())


def read_metrics(outputs: Path, script: str, data, reads: dict, quick: bool = False) -> dict:
    """A script's metrics.json from its bytes (`metrics_bytes`; an OSError is raised here)."""
    path = outputs / script / "metrics.json"
    writer = experiment_command(script, display_path(outputs), quick)
    try:
        if isinstance(data, OSError):
            raise data
        metrics = json.loads(data.decode("utf-8"), parse_constant=refuse_constant,
                             object_hook=lambda d: Metrics(d, path, writer, reads))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: from the repository's folder, run {writer} first "
                         f"(or {make_command(outputs, quick)})")
    except RecursionError:
        raise UsageError(f"{path} is nested too deeply to be a metrics file: run {writer} again")
    except (OSError, UnicodeDecodeError, ValueError) as err:      # JSONDecodeError is one
        raise UsageError(f"{path} is unreadable ({' '.join(str(err).split())[:80]}): run "
                         f"{writer} again")
    if not isinstance(metrics, dict) or "args" not in metrics:
        raise UsageError(f"{path} is not a complete metrics file: run {writer} again")
    return metrics


def make_command(outputs: Path, quick: bool) -> str:
    """The make command that fills this outputs folder: make quick writes <OUT>/quick."""
    if quick and outputs.name == "quick":
        rest = outputs.parent
        return "make quick" + ("" if rest == OUTPUTS_DIR else f" OUT={display_path(rest)}")
    return ("make all" + ("" if outputs == OUTPUTS_DIR else f" OUT={display_path(outputs)}")
            + (" FLAGS=--quick" if quick else ""))


# Which run each folder must hold, beyond its script: the ablation's loss, and the VAE each Q4
# folder evaluates (the folder of its --checkpoint).
RUN_SETTINGS = {"vae_amortized": ("loss", "exercise"), "vae_amortized_elbo": ("loss", "elbo")}
Q4_VAE = {"log_likelihood": "vae_amortized", "log_likelihood_elbo": "vae_amortized_elbo"}


def runs_as_named(metrics: dict, outputs: Path, quick: bool) -> None:
    """One line where a folder holds another run than its name says (Q1's VAE trained on the
    ablation's loss, or a Q4 folder that evaluated the other VAE): its report would describe a
    run that was not made."""
    for folder, (key, wanted) in RUN_SETTINGS.items():
        got = metrics[folder]["args"].get(key, wanted)
        if got != wanted:
            raise UsageError(f"{outputs / folder} holds a run with --{key} {got}, where the report "
                             f"expects --{key} {wanted}: run "
                             f"{experiment_command(folder, display_path(outputs), quick)} --fresh")
    for folder, vae in Q4_VAE.items():
        checkpoint = metrics[folder]["args"].get("checkpoint")
        read = Path(checkpoint) if checkpoint else Path(vae) / "vae_final.pt"
        if (read.parent.name if read.suffix else read.name) != vae:
            raise UsageError(f"{outputs / folder} evaluated {checkpoint}, where the report "
                             f"expects {vae}'s VAE: run "
                             f"{experiment_command(folder, display_path(outputs), quick)}")


# ----------------------------------------------------------------------------------------------
# Formatting: every number in the reports is a string made here, negatives with a real minus
# ----------------------------------------------------------------------------------------------
MINUS = "\u2212"


def num(x, digits: int = 2, sign: bool = False) -> str:
    text = f"{x:+,.{digits}f}" if sign else f"{x:,.{digits}f}"
    if text.lstrip("+-").strip("0.,") == "":        # rounds to zero: no sign ('0.0', not '+0.0')
        text = text.lstrip("+-")
    return text.replace("-", MINUS)


def se_decimals(se: float) -> int:
    """Decimals that show a standard error to one significant figure, or to two where the first
    is a 1 (0.93 -> 0.9, 0.18 -> 0.18, 14.9 -> 15), so that rounding moves it by at most a
    third; a mean beside it gets the same decimals, no false precision."""
    if not (se > 0 and math.isfinite(se)):
        return 1
    exponent = math.floor(math.log10(se))
    return max(0, -exponent + (se / 10**exponent < 2))


def with_se(mean: float, se: float, sign: bool = False) -> tuple:
    """A mean and its standard error, both to the decimals the standard error supports."""
    decimals = se_decimals(se)
    return num(mean, decimals, sign=sign), num(se, decimals)


def sig_decimals(x: float, figures: int = 2) -> int:
    """The decimals that show x to `figures` significant figures."""
    return max(0, figures - 1 - math.floor(math.log10(abs(x))))


def sig(x, figures: int = 2) -> str:
    """x with `figures` significant figures (never a string of zeros: 3e-6 -> '0.0000030')."""
    if x == 0 or not math.isfinite(x):
        return num(x, 0)
    digits = sig_decimals(x, figures)
    return num(round(x, digits), digits)


def figures_apart(a: float, b: float, least: int = 4) -> int:
    """The significant figures that print a and b differently (at least `least`): one more than
    the decimal places of their relative difference (2.6e-6 -> 7)."""
    rel = abs(a - b) / max(abs(a), abs(b), 1e-300)
    return least if rel == 0 else max(least, 1 - math.floor(math.log10(rel)))


def small(x: float) -> str:
    """A small difference to two significant figures (0.0021, -0.013), signed."""
    return num(x, sig_decimals(x) if x else 1, sign=True)


def pct(x, digits: int = 2) -> str:
    return num(100 * x, digits) + "\u00a0%"     # never a line break before the %


SHARES = {0.25: "a quarter", 1 / 3: "a third", 0.5: "half", 2 / 3: "two thirds",
          0.75: "three quarters"}


def share_of(part: float, whole: float, part_se: float = 0.0, whole_se: float = 0.0):
    """part / whole in words, by the nearest of a quarter, a third, half, two thirds and three
    quarters ('about half'; 'little' below an eighth, 'nearly all' above seven eighths): both
    are differences of noisy means, so the share is uncertain by several points and no
    percentage would survive rounding the two printed numbers. 'More than' or 'less than'
    half only where the share lies beyond 4 points and beyond two of its standard errors
    (delta method, from the two standard errors given) of that fraction. Only where it is a
    share of it (the same sign, and not larger); None otherwise."""
    if whole == 0 or not 0 <= part / whole <= 1:
        return None
    share = part / whole
    if share < 1 / 8 or share > 7 / 8:
        return "little" if share < 1 / 8 else "nearly all"
    nearest = min(SHARES, key=lambda s: abs(s - share))
    se = share * math.hypot(part_se / part, whole_se / whole) if part else 0.0
    beyond = abs(share - nearest) > max(0.04, 2 * se)
    side = "about" if not beyond else "more than" if share > nearest else "less than"
    return f"{side} {SHARES[nearest]}"


def binomial_se(share: float, n: int) -> float:
    """The standard error of a share measured on n independent images."""
    return math.sqrt(share * (1 - share) / n)


def share(x) -> str:
    """A share in per cent, or 'n/a' where it could not be measured (k-hat needs M >= 21)."""
    return "n/a" if x is None else pct(x, 0)


def digit_list(ds) -> str:
    ds = [str(d) for d in ds]
    return ", ".join(ds[:-1]) + " and " + ds[-1] if len(ds) > 1 else ds[0]


# ----------------------------------------------------------------------------------------------
# HUJI Exercise 1
# ----------------------------------------------------------------------------------------------
def ex1_values(m: dict) -> dict:
    """Every value the Ex. 1 template reads, one group per question."""
    amortized, latent_opt = m["vae_amortized"], m["vae_latent_opt"]
    return {"quick": bool(m["sup_classification"]["args"]["quick"]),
            "part1": part1_values(m["sup_classification"]),
            "q1": q1_values(amortized),
            "q2": q2_values(amortized, latent_opt),
            "q3": q3_values(latent_opt, amortized),
            "q4": q4_values(m["log_likelihood"], m["log_likelihood_elbo"], amortized,
                            m["vae_amortized_elbo"]),
            "eq7": eq7_values(amortized["eq7"])}


def part1_values(classifier: dict) -> dict:
    acc, val_acc = classifier["test_accuracy"], classifier["val_accuracy"]
    best = max(range(len(val_acc)), key=val_acc.__getitem__)
    return {
        "params": f"{classifier['parameters']:,}", "epochs": classifier["args"]["epochs"],
        "train_images": f"{classifier['train_images']:,}",
        "per_class": f"{classifier['train_images'] // 10:,}",
        "lr": f"{classifier['args']['lr']:g}", "batch": classifier["args"]["batch_size"],
        "val_images": f"{classifier['val_images']:,}", "accuracy": pct(acc),
        # its binomial standard error over the test images, in percentage points
        "accuracy_se": with_se(100 * acc, 100 * binomial_se(acc, classifier["val_images"])),
        "above_bar": classifier["above_course_bar"], "bar": pct(classifier["course_bar"], 0),
        "best_accuracy": pct(val_acc[best]),
        "best_epoch": best + 1,
        # the training images outside the subset, seen by no training step and no tuning
        "held_out": None if "held_out_accuracy" not in classifier else {
            "images": f"{classifier['held_out_images']:,}",
            "accuracy_se": with_se(100 * classifier["held_out_accuracy"],
                                   100 * binomial_se(classifier["held_out_accuracy"],
                                                     classifier["held_out_images"]))}}


def q1_values(amortized: dict) -> dict:
    a, overfit = amortized, amortized["overfit"]
    values = {
        "latent_dim": a["latent_dim"], "lr": f"{a['args']['lr']:g}", "epochs": a["args"]["epochs"],
        "batch": a["args"]["batch_size"], "train_images": f"{a['train_images']:,}",
        "val_images": f"{a['args']['val_images']:,}",
        "monitor_train": f"{a['monitor_images']['train']:,}",
        "monitor_val": f"{a['monitor_images']['val']:,}",
        "loss_train": num(a["final_train"]["loss"], 4), "loss_val": num(a["final_val"]["loss"], 4),
        "recon_train": num(a["final_train"]["recon_mse"], 4),
        "recon_gap": num(100 * overfit["recon_gap"], 1, sign=True) + " %",
        "recon_gap_within": overfit["recon_gap_within_two_se"],
        "recon_gap_in_se": None if overfit.get("recon_gap_in_se") is None else num(overfit["recon_gap_in_se"], 1),
        "equal": None,
        "best_val_epoch": overfit["best_val_epoch"],
        "val_rise": num(100 * overfit["val_loss_rise"], 1) + " %",
        "verdict": overfit["verdict"], "steps": f"{a['steps']:,}",
        "val_fall_last5": (None if overfit["val_loss_fall_last5"] is None
                           else pct(overfit["val_loss_fall_last5"], 1)),
        "val_falling": overfit["still_improving"],
        "implied_sigma2": num(784 / (2 * a["latent_dim"])), "sigma_p": f"{a['sigma_p']:g}",
        # the KL part of the final training loss: per latent dimension and over all of them
        "kl_dim": sig(a["final_train"]["kl"], 3), "kl_total": num(a["final_train"]["kl"] * a["latent_dim"], 1),
        "read": None}
    # the overfitting comparison on equal digit shares, where the run measured it (older runs
    # compared the raw means); the raw validation mean beside it
    equal = q1_final_means(a)
    for split in ("train", "val"):
        e = equal[split]
        values[f"recon_{split}_se"] = (with_se(e["recon_mse"], e["recon_mse_se"])
                                       if e.get("recon_mse_se") is not None else (num(e["recon_mse"], 4), "n/a"))
    if "final_equal_digits" in a:
        per_digit = equal["val"]["per_digit"]
        easiest, hardest = min(per_digit, key=per_digit.get), max(per_digit, key=per_digit.get)
        counts = equal["val"]["images_per_digit"].values()
        values["equal"] = {"val_raw": num(a["final_val"]["recon_mse"], 4),
                           "easiest": easiest, "easiest_mse": num(per_digit[easiest], 3),
                           "hardest": hardest, "hardest_mse": num(per_digit[hardest], 3),
                           "fewest": f"{min(counts):,}", "most": f"{max(counts):,}"}
    read = a.get("reconstructions_read")
    if read:
        # shares weighted to equal digit shares where the run measured them
        val, train = (read[k].get("equal_digits", read[k]) for k in ("val", "train"))
        values["read"] = {
            "val": pct(val["accuracy"], 1), "val_se": pct(val["accuracy_se"], 1),
            "val_n": f"{read['val']['images']:,}", "equal": "equal_digits" in read["val"],
            "train": pct(train["accuracy"], 1), "train_se": pct(train["accuracy_se"], 1),
            "train_n": f"{read['train']['images']:,}",
            "val_orig": pct(read["val"]["original_accuracy"], 1), "same": read["train_val_tie"]}
        shown = read.get("shown_val", {})
        if shown:                   # Figure 3's ten validation images at the last epoch
            last, labels = shown[max(shown, key=int)], read["shown_val_labels"]
            wrong = [(t, r) for t, r in zip(labels, last) if t != r]
            # counts in words, so that "six" right is not read as the digit 6
            values["read"]["shown_right"] = small_count(len(labels) - len(wrong))
            values["read"]["shown_n"] = small_count(len(labels))
            values["read"]["shown_expected"] = small_count(round(len(labels) * val["accuracy"]))
            trained = read.get("shown_train", {})      # and the figure's ten training images
            values["read"]["shown_train_right"] = (None if not trained else small_count(sum(
                t == r for t, r in zip(read["shown_train_labels"], trained[max(trained, key=int)]))))
            values["read"]["shown_any_wrong"] = bool(wrong)
            # and which, grouped by the digit read, so that a reader can hold the figure against
            # it (graders read six or seven right by eye where the classifier reads five)
            values["read"]["shown_misread"] = misread_phrase(wrong)
    return values


def variety_row(name: str, variety: dict) -> dict:
    """One row of Table 1: a set of images and its variety (mean, with its standard error)."""
    return {"name": name, "variety": num(variety["mean"], 3), "variety_se": variety["se"]}


def top_digit(quality: dict) -> int:
    """The digit the classifier names most often in a set of samples."""
    return max(range(10), key=lambda d: quality["share"][d])


def q2_values(amortized: dict, latent_opt: dict) -> dict:
    """Q2's prior samples per snapshot epoch judged by their variety, which needs no classifier,
    beside real test images and two sets that are no clean digits (Table 1, with Q3's final
    generator after Q2's); and what the Part 1 classifier says of those non-digits, which Q1
    and Q3 quote to show how rough a judge it is."""
    variety = amortized.get("prior_variety") or {}
    references = amortized.get("variety_references") or {}
    epochs = [str(e) for e in amortized["snapshot_epochs"]]
    values = {"measured": bool(variety and references), "first_epoch": epochs[0],
              "last_epoch": epochs[-1],
              # the KL term after the first epoch, per latent dimension (the latents'
              # information about their images)
              "kl_first": sig(amortized["val_kl"][0], 1),
              "kl_first_small": amortized["val_kl"][0] < 0.1 * amortized["val_kl"][-1]}
    if values["measured"]:
        first, last = variety[epochs[0]]["mean"], variety[epochs[-1]]["mean"]
        real = references["real test images"]["mean"]
        lo_variety = (latent_opt.get("prior_vs_aggregate") or {}).get("variety", {}).get("prior")
        rows = [variety_row(f"amortized, epoch {e}", variety[e]) for e in epochs]
        if lo_variety is not None:          # Q3's generator right under Q2's
            rows.append(variety_row("latent optimization, final", lo_variety))
        rows += [variety_row(name, references[key]) for name, key in
                 (("real test images", "real test images"), ("Gaussian noise", "gaussian noise"),
                  ("blurred test images", "blurred test images"))]
        # Q1's final prior draws against real test images, by their mid-grey pixels (Q3's
        # measure of blur, Table 3): 'blurred' where clearly greyer
        am_prior = (latent_opt.get("amortized_prior_vs_aggregate") or {}).get("prior")
        real_grey = latent_opt.get("real_grey_per_image")
        values["blurred"] = bool(am_prior and real_grey and clearly_above(
            {"mean": am_prior["share"], "se": am_prior["se"]}, real_grey))
        values.update({
            "variety": {"moves": "rises" if last > first else "falls", "first": num(first, 3),
                        "last": num(last, 3), "real": num(real, 3),
                        "noise": num(references["gaussian noise"]["mean"], 3),
                        "blurred": num(references["blurred test images"]["mean"], 3),
                        "last_of_real": pct(last / real, 0)},
            # at the first epoch the samples are 'nearly the same image' when they vary less
            # than a tenth as much as real test images
            "first_alike": first < 0.1 * real,
            "rows": rows, "variety_se_max": sig(max(r["variety_se"] for r in rows), 1)})
    base = amortized.get("classifier_baselines")
    values["baseline"] = bool(base)
    if base:
        noise, blur = base["gaussian noise"], base["blurred test images"]
        blob = top_digit(base["mean training image"])       # the label it gives blur
        values.update({"noise_top": top_digit(noise), "noise_share": pct(max(noise["share"]), 0),
                       "blob_digit": blob,
                       # how often it gives that label to blurred test images and to noise
                       "blur_blob_share": pct(blur["share"][blob], 0),
                       "noise_blob_share": pct(noise["share"][blob], 0)})
    return values


def aggregate_values(agg: dict) -> dict:
    """The aggregate posterior of one method's latents, per dimension."""
    return {"var": num(agg["marginal_variance_mean"]), "var_min": num(agg["marginal_variance_min"]),
            "var_max": num(agg["marginal_variance_max"]), "mu_var": num(agg["mu_variance_mean"]),
            "sigma2": num(agg["sigma2_mean"]), "kl_marg": num(agg["kl_marginals_sum"], 1),
            "kl_dim": sig(agg["kl_per_dimension"], 2), "kl_dim_x": agg["kl_per_dimension"]}


def clearly_above(a: dict, b: dict) -> bool:
    """Mean a (with its standard error) above mean b, and not tied with it (`within_two_se`)."""
    return a["mean"] > b["mean"] and not within_two_se(a["mean"], b["mean"], a["se"], b["se"])


def q3_values(latent_opt: dict, amortized: dict) -> dict:
    return {**q3_proposal_values(latent_opt, amortized), **q3_prior_values(latent_opt, amortized)}


def q3_proposal_values(latent_opt: dict, amortized: dict) -> dict:
    """Q3 (a), which method proposed better q: the setup, the same-budget fits, the training
    curves at Figure 5's epochs and the image-by-image differences. Means over the few comparison images
    (a standard error near 0.005) show three decimals."""
    lo, same, verdicts = latent_opt, latent_opt["same_budget"], latent_opt["verdicts"]
    values = {
        "lr": f"{lo['args']['lr']:g}", "latent_lr": f"{lo['args']['latent_lr']:g}",
        "batch": lo["args"]["batch_size"],
        "epochs": lo["args"]["epochs"], "fit_steps": lo["args"]["fit_steps"],
        "fit_lr": f"{lo['args']['fit_lr']:g}",
        "loss_train": num(lo["final_train"]["loss"], 4),
        "recon_train": num(lo["final_train"]["recon_mse"], 4),
        "n_train": lo["same_budget_images"]["train"], "n_val": lo["same_budget_images"]["val"],
        "lo_proposed": num(same["latent_opt"]["proposed_train"], 3),
        "lo_fitted_train": num(same["latent_opt"]["fitted_train"], 3),
        "lo_fit_lowers": same["latent_opt"]["fitted_train"] < same["latent_opt"]["proposed_train"],
        "lo_fitted_val": num(same["latent_opt"]["fitted_val"], 3),
        "better_q": verdicts["better_q"], "better_decoder": verdicts["better_decoder"],
        "encoder_nearer_best": verdicts.get("encoder_nearer_best")}
    epochs = lo.get("snapshot_epochs") or []
    curve_lo, curve_am = lo.get("train_recon_mse") or [], amortized.get("train_recon_mse") or []
    if epochs and len(curve_lo) >= epochs[-1] and len(curve_am) >= epochs[-1]:
        # Figure 5's epochs on the same 1,000 training images (Q1's curves): since when the
        # encoder's mu(x) reconstruct better than the learned mu_i at every later snapshot
        lo_at, am_at = ([curve[e - 1] for e in epochs] for curve in (curve_lo, curve_am))
        ahead = [e for i, e in enumerate(epochs)
                 if all(a < b for a, b in zip(am_at[i:], lo_at[i:]))]
        values.update({"curve_lo": digit_list([num(x, 3) for x in lo_at]),
                       "curve_am": digit_list([num(x, 3) for x in am_at]),
                       "ahead_from": ahead[0] if ahead else None, "first_epoch": epochs[0],
                       "last_epoch": epochs[-1], "curve_lo_last": num(lo_at[-1], 3),
                       "curve_am_last": num(am_at[-1], 3),
                       "curve_images": f"{amortized['monitor_images']['train']:,}"})
    val10 = lo.get("val_fit_recon_mse", {}).get(str(epochs[-1])) if epochs else None
    if val10 is not None and lo.get("amortized_val10_recon_mse") is not None:
        # Figure 5's ten validation images at the last epoch: latent optimization's fit, Q1's
        values["val10"] = {"lo": num(val10, 3), "am": num(lo["amortized_val10_recon_mse"], 3)}
    if "paired" in same:            # latent optimization minus amortized, image by image
        values["paired"] = {k: dict(zip(("mean", "se"), with_se(v["mean"], v["se"], sign=True)))
                            for k, v in same["paired"].items()}
        # the decoders' difference (the same refit) as a share of the raw difference
        fitted, raw = same["paired"]["fitted_train"], same["paired"]["proposed_train"]
        values["decoders_share"] = share_of(fitted["mean"], raw["mean"], fitted["se"], raw["se"])
    if "amortized" in same:
        s = same["amortized"]
        values.update({"am_proposed": num(s["proposed_train"], 3),
                       # the whole q (mean and spread) by the loss both methods minimize
                       "am_loss": num(s["proposed_train_loss"], 3),
                       "lo_loss": num(same["latent_opt"]["proposed_train_loss"], 3),
                       "better_q_by_loss": verdicts["better_q_by_loss"],
                       "am_proposed_val": num(s["proposed_val"], 3),
                       # the encoder's one-pass proposals against latent optimization's fits on
                       # the validation images, which the question compares
                       # (paired, image by image, by two standard errors where measured)
                       "val_encoder_better": val_encoder_better(same),
                       "am_fitted_train": num(s["fitted_train"], 3),
                       # how far each method's own proposals fall short of the same refit to
                       # its own decoder: the proposals compared without their decoders
                       "shortfall": shortfalls(s, same["latent_opt"]),
                       "am_fitted_val": num(s["fitted_val"], 3),
                       # does the latent fit raise either method's training MSE (it lowers MSE + KL)?
                       "fit_raised_mse": any(same[k]["fitted_train"] > same[k]["proposed_train"]
                                             for k in ("amortized", "latent_opt"))})
    return values


def val_encoder_better(same: dict) -> bool:
    """Do the encoder's proposals reconstruct the validation images better than latent
    optimization's fits: by more than two standard errors of the paired difference where the
    run measured it, else by the means."""
    paired = same.get("paired", {}).get("val_fit_vs_encoder")
    if paired:
        return paired["mean"] > 2 * paired["se"]
    return same["amortized"]["proposed_val"] < same["latent_opt"]["fitted_val"]


def shortfalls(am: dict, lo: dict) -> dict:
    """How far each method's own proposals fall short of the same refit to its own decoder
    (mean ± standard error), both to the decimals of the finer standard error, so that the two
    read alike; older runs without standard errors: the plain difference."""
    if not ("shortfall" in am and "shortfall" in lo):
        return {key: num(r["proposed_train"] - r["fitted_train"], 3)
                for key, r in (("am", am), ("lo", lo))}
    decimals = max(se_decimals(r["shortfall"]["se"]) for r in (am, lo))
    return {key: f"{num(r['shortfall']['mean'], decimals)}\u00a0±\u00a0{num(r['shortfall']['se'], decimals)}"
            for key, r in (("am", am), ("lo", lo))}


def q3_prior_values(latent_opt: dict, amortized: dict) -> dict:
    """Q3 (b), whether the initialization established a good prior: where the training latents
    lie, prior draws against draws from them, how many prior draws land outside them, the
    control started wider, and the samples."""
    lo, verdicts = latent_opt, latent_opt["verdicts"]
    values = {
        "blur_mostly_decoder": verdicts.get("blur_mostly_decoder"),
        "prior": verdicts["prior"],
        "agg_kl_lo": num(lo["aggregate_posterior_kl"], 1),
        "agg_kl_lo_dim": num(lo["aggregate_posterior_kl"] / lo["latent_dim"], 3),
        # the same KL as a unit Gaussian's shift: KL(N(m, 1) || N(0, 1)) = m^2 / 2
        "agg_kl_shift": num(math.sqrt(2 * lo["aggregate_posterior_kl"] / lo["latent_dim"])),
        "agg_kl_amortized": num(amortized["aggregate_posterior_kl"], 1),
        # the same estimate with each dimension shuffled on its own: marginals plus sampling
        # noise, so the rest is the correlations' part (older runs: not measured)
        "agg_kl_uncorrelated": (num(lo["aggregate_posterior_kl_uncorrelated"], 1)
                                if "aggregate_posterior_kl_uncorrelated" in lo else None),
        "agg_kl_correlations": (num(lo["aggregate_posterior_kl"]
                                    - lo["aggregate_posterior_kl_uncorrelated"], 1)
                                if "aggregate_posterior_kl_uncorrelated" in lo else None),
        "agg_kl_lo_larger": lo["aggregate_posterior_kl"] > amortized["aggregate_posterior_kl"],
        "agg_kl_small": verdicts["aggregate_near_prior"],
        "codes_overlap": verdicts.get("codes_overlap"),
        "mu_norm": num(lo["latent_mu_mean_norm"], 1),
        "prior_norm": num(lo["expected_prior_norm"], 1),
        "norm_ratio": num(lo["latent_mu_mean_norm"] / lo["expected_prior_norm"]),
        "sigma2_mean": num(lo["latent_sigma2_mean"])}
    for key, method in (("lo", lo), ("am", amortized)):
        if method.get("aggregate_posterior"):
            values[f"{key}_agg"] = aggregate_values(method["aggregate_posterior"])
    if "lo_agg" in values and "am_agg" in values:
        values["kl_dim_ratio"] = num(values["am_agg"]["kl_dim_x"]
                                     / max(values["lo_agg"]["kl_dim_x"], 1e-12), 0)
    versus = lo.get("prior_vs_aggregate")
    values["vs_agg_ok"] = versus["prior_not_greyer"] if versus else None
    if versus:                      # mid-grey share per image, in per cent, with its SE
        values["vs_agg_z"] = num((versus["prior"]["share"] - versus["aggregate"]["share"])
                                 / math.hypot(versus["prior"]["se"], versus["aggregate"]["se"]), 0)
        values["vs_agg"] = {k: dict(zip(("share", "se"), with_se(100 * versus[k]["share"],
                                                                 100 * versus[k]["se"])),
                                    plain=num(100 * versus[k]["share"], 1))   # without its SE
                            for k in ("prior", "aggregate")}
        values["vs_agg_images"] = f"{versus['images']:,}"
        values["vs_agg_bands_same"] = versus["same_verdict_every_band"]
        values["vs_agg_bands"] = " or ".join(f"±{b}" for b in versus["other_bands_not_greyer"])
    versus_am = lo.get("amortized_prior_vs_aggregate")
    if versus and versus_am:        # the same test for Q1's decoder, fed its encoder's q
        values["am_vs_agg"] = {k: dict(zip(("share", "se"), with_se(100 * versus_am[k]["share"],
                                                                    100 * versus_am[k]["se"])),
                                       plain=num(100 * versus_am[k]["share"], 1))
                               for k in ("prior", "aggregate")}
        gaps = {k: 100 * v for k, v in lo["prior_gaps"].items()}     # in points of per cent
        values["vs_agg_bands_same"] &= verdicts["prior_gap_same_every_band"]
        values.update({"prior_gap": verdicts["prior_gap"],
                       "prior_gap_bands_same": verdicts["prior_gap_same_every_band"],
                       "decoder_greyer": verdicts["decoder_greyer"],
                       "gap_lo": num(gaps["latent_opt"], 1, sign=True),
                       "gap_am": num(gaps["amortized"], 1, sign=True),
                       "gap_diff": dict(zip(("mean", "se"), with_se(gaps["difference"],
                                                                    gaps["difference_se"],
                                                                    sign=True)))})
    if versus and versus_am and "variety_gap" in verdicts:    # Table 4: how varied, how labelled
        values.update(variety_values(lo, versus, versus_am),
                      variety_gap=verdicts["variety_gap"])
    outside = {"lo": lo.get("prior_outside"), "am": lo.get("amortized_prior_outside")}
    if all(outside.values()) and "outside_gap" in verdicts:    # Q3 (b): prior draws in the gaps
        values.update({
            "outside_gap": verdicts["outside_gap"],
            # counts of prior draws, exact where a share of 100 % would need a standard error
            "outside": {key: f"{round(v['outside']['mean'] * v['draws']):,}"
                        for key, v in outside.items()},
            "outside_draws": f"{outside['lo']['draws']:,}",
            "outside_chance": f"{round(outside['lo']['expected'] * outside['lo']['draws']):,}",
            "outside_quantile": pct(1 - outside["lo"]["expected"], 0),
            "outside_kl": {key: "\u00a0±\u00a0".join(with_se(v["kl_prior_to_latents"]["mean"],
                                                              v["kl_prior_to_latents"]["se"]))
                           for key, v in outside.items()}})
        if all("narrow_dimensions" in v for v in outside.values()):   # why they land outside
            means = {key: v["narrow_dimensions"]["mean"] for key, v in outside.items()}
            values["narrow"] = {key: num(m, 0 if m == round(m) or m >= 10 else 1)
                                for key, m in means.items()}
            values["narrow_variance"] = f"{outside['lo']['narrow_variance']:g}"
            values["narrow_any"] = {key: v.get("narrow_in_any_image") for key, v in outside.items()}
            # Q1's encoder: no q narrow anywhere, or every q narrow in the same dimensions
            any_am = outside["am"].get("narrow_in_any_image")
            values["narrow_am_none"] = any_am == 0
            values["narrow_am_same"] = any_am is not None and any_am > 0 and means["am"] == any_am
    wide = lo.get("wide_start")
    if wide and verdicts.get("start_decides") is not None:   # the control started wider (Q3 b)
        versus_wide = wide["prior_vs_aggregate"]
        values.update({"start_decides": verdicts["start_decides"],
                       "control_greyer": verdicts.get("control_prior_greyer"),
                       "wide_scale": f"{wide['start_scale']:g}",
                       "wide_kl": num(wide["aggregate_posterior_kl"], 0),
                       "wide_var": num(wide["marginal_variance_mean"], 1),
                       "wide_start_var": num(wide["at_start"]["marginal_variance_mean"], 0),
                       "start_var": num(wide["q3_at_start"]["marginal_variance_mean"], 1),
                       "start_kl": num(wide["q3_at_start"]["aggregate_posterior_kl"], 0),
                       "wide_gap": num(100 * (versus_wide["prior"]["share"]
                                              - versus_wide["aggregate"]["share"]), 1, sign=True)})
    unit = lo.get("unit_sigma_start")
    if unit and verdicts.get("unit_variety_gap") is not None:   # every sigma_i started at 1 (Q3 b)
        out = unit["prior_outside"]
        values["unit"] = {
            "outside": f"{round(out['outside']['mean'] * out['draws']):,}",
            "narrow": num(out["narrow_dimensions"]["mean"], 0),
            "ratio": pct(unit["prior_vs_aggregate"]["variety_ratio"]["ratio"], 0),
            "var": num(unit["marginal_variance_mean"], 2),
            "moment_kl": num(unit["aggregate_posterior_kl"], 1),
            "variety_gap": verdicts["unit_variety_gap"],
            "outside_gap": verdicts.get("unit_outside_gap"),
            # would a better start have helped: the control's prior draws more varied than Q3's,
            # by two standard errors, not only relative to its own training latents
            "prior_more_varied": clearly_above(unit["prior_vs_aggregate"]["variety"]["prior"],
                                               lo["prior_vs_aggregate"]["variety"]["prior"])}
    order = {"lo": lo.get("digit_order"), "am": lo.get("amortized_digit_order")}
    if all(order.values()):             # how much digit order each table of latents carries
        values["order"] = {key: pct(v["mean"], 0) for key, v in order.items()}
        values["order_neighbours"] = order["lo"]["neighbours"]
        values["order_lower"] = clearly_above(order["am"], order["lo"])
    start = lo.get("narrow_from_start")
    if start:                           # Q3's own narrow dimensions, then and now (Q3 b)
        values["narrow_start"] = {k: num(start[k], 0) for k in ("at_start", "at_end", "at_both")}
        values["narrow_start_share"] = pct(start["at_start"] / lo["latent_dim"], 0)
        values["narrow_widened"] = start["at_end"] < start["at_start"]
        # narrow at the end but not at the start, counted over all training images
        values["narrow_new"] = round((start["at_end"] - start["at_both"]) * lo["train_images"])
        values["narrow_new_words"] = (small_count(values["narrow_new"])
                                      + (" dimension" if values["narrow_new"] == 1 else " dimensions"))
        step = start.get("max_log_variance_change")
        values["narrow_step"] = None if step is None else {"r": num(step, 1),
                                                           "factor": num(math.exp(step), 1)}
    quality = lo.get("sample_quality") or {}
    grey = latent_opt.get("grey_share", {})
    if "amortized" in grey:
        values["grey"] = {k: pct(v, 0) for k, v in grey.items()}
        values["grey_band"] = f"{latent_opt['grey_band']:g}"
        values["grey_lo_more"] = verdicts.get("samples_greyer")
    lo_q, am_q = quality.get("latent_opt"), quality.get("amortized")
    if lo_q and am_q:
        lo_top = top_digit(lo_q)
        blob = (amortized.get("classifier_baselines") or {}).get("mean training image")
        values.update({"lo_top": lo_top, "lo_top_share": pct(max(lo_q["share"]), 0),
                       "lo_top_is_blob": blob is not None and blob["share"][lo_top] == 1,
                       "lo_entropy": num(lo_q["entropy_bits"]),
                       "am_entropy": num(am_q["entropy_bits"]),
                       "lo_conf": num(lo_q["mean_confidence"]),
                       "am_conf": num(am_q["mean_confidence"]),
                       "lo_covered": lo_q["digits_covered"], "am_covered": am_q["digits_covered"],
                       "lo_images": f"{lo_q['images']:,}"})
    return values


def variety_values(lo: dict, versus: dict, versus_am: dict) -> dict:
    """Q3 (b)'s direct test, per decoder: the variety of its decoded training-latent draws and
    prior draws (each with its standard error), prior over training as a share, and the
    mid-grey share; real test images for scale. (The classifier's labels of these draws stay
    in metrics.json: the report leaves them out, since the classifier labels blur as a digit.)"""
    rows = {}
    # ... and the control whose every sigma_i started at 1, where the run has it
    unit = (lo.get("unit_sigma_start") or {}).get("prior_vs_aggregate")
    for key, v in (("lo", versus), ("am", versus_am)) + ((("unit", unit),) if unit else ()):
        row = {}
        for draws in ("aggregate", "prior"):
            mean, se = with_se(v["variety"][draws]["mean"], v["variety"][draws]["se"])
            row[draws] = {"variety": f"{mean}\u00a0±\u00a0{se}", "grey": num(100 * v[draws]["share"], 1)}
        row["ratio"] = pct(v["variety_ratio"]["ratio"], 0)
        rows[key] = row
    real = lo["real_variety"]
    mean, se = with_se(real["mean"], real["se"])
    wide = (lo.get("wide_start") or {}).get("prior_vs_aggregate", {}).get("variety_ratio")
    # the mid-grey shares' standard errors, in points, where every row has one
    grey_se = [100 * v[draws]["se"] for v in (versus, versus_am) + ((unit,) if unit else ())
               for draws in ("aggregate", "prior")]
    if "real_grey_per_image" in lo:
        grey_se.append(100 * lo["real_grey_per_image"]["se"])
    # Q3 (b) compares its samples with Q2's: this decoder's prior draws against Q1's
    lo_prior, am_prior = versus["variety"]["prior"], versus_am["variety"]["prior"]
    vs_q2 = ("about as varied as" if within_two_se(lo_prior["mean"], am_prior["mean"],
                                                   lo_prior["se"], am_prior["se"])
             else "less varied than" if lo_prior["mean"] < am_prior["mean"] else "more varied than")
    # and by blur: the prior draws' mid-grey shares through either decoder (Table 3's column)
    lo_grey, am_grey = versus["prior"], versus_am["prior"]
    grey_vs_q2 = ("about as grey" if within_two_se(lo_grey["share"], am_grey["share"],
                                                   lo_grey["se"], am_grey["se"])
                  else "greyer" if lo_grey["share"] > am_grey["share"] else "less grey")
    return {"variety": rows, "vs_q2": vs_q2, "grey_vs_q2": grey_vs_q2,
            "grey_se_max": sig(max(grey_se), 1) if "real_grey_per_image" in lo else None,
            "real_variety": f"{mean}\u00a0±\u00a0{se}",
            "real_grey": num(100 * lo["grey_share"]["real"], 1),
            "wide_ratio": None if wide is None else pct(wide["ratio"], 0)}


def eq9_at_largest_m(convergence: dict) -> dict:
    """Figure 9's right ends: at the largest M, how many of its images Eq. 9 puts below the
    Laplace estimate and by how much at most, and how many above it (Eq. 9 is not always lower)."""
    ends = [eq9[-1] - laplace[-1] for eq9, laplace in zip(convergence["eq9"], convergence["laplace"])]
    below, above = [-e for e in ends if e < 0], [e for e in ends if e > 0]

    def nats(x):                    # one decimal, or one significant figure below 1 nat
        return num(x, 1) if x >= 1 else sig(x, 1)
    return {"n": len(ends), "below": len(below), "below_max": nats(max(below, default=0)),
            "above": len(above), "above_max": nats(max(above, default=0))}


def estimate_diagnostics(likelihood: dict) -> dict:
    """How far each Q4 estimate can be trusted: effective sample size, k-hat, bootstrap error,
    movement with M, the gap between the two estimates, and the proposal's mismatch."""
    diag, move = likelihood["diagnostics"], likelihood["convergence_movement"]
    mismatch, width = likelihood["proposal_mismatch"], likelihood["q_width"]
    return {
        "median_ess": num(diag["laplace"]["median_ess"], 0),
        "eq9_median_ess": num(diag["eq9"]["median_ess"], 1),
        "eq9_share_ess_below_2": pct(diag["eq9"]["share_ess_below_2"], 0),
        "share_khat": share(diag["laplace"]["share_khat_above_threshold"]),
        "eq9_share_khat": share(diag["eq9"]["share_khat_above_threshold"]),
        "khat_threshold": ("n/a" if diag["eq9"]["khat_threshold"] is None
                           else num(diag["eq9"]["khat_threshold"])),
        "median_sd": num(diag["laplace"]["median_sd"]), "max_sd": num(diag["laplace"]["max_sd"]),
        "eq9_median_sd": num(diag["eq9"]["median_sd"], 1),
        "eq9_max_sd": num(diag["eq9"]["max_sd"], 1),
        "gap_mean": num(likelihood["gap"]["mean"], 1),
        "gap_mean_abs": num(abs(likelihood["gap"]["mean"]), 1),
        "eq9_lower": likelihood["gap"]["mean"] > 0,     # as Jensen's inequality expects
        "gap_median": num(likelihood["gap"]["median"], 1),
        "gap_max": num(likelihood["gap"]["max"], 0),
        "move": None if move["laplace"] is None else num(move["laplace"]["max_abs"]),
        # whole nats for Eq. 9, whose single estimates differ by several nats between runs
        "eq9_move_abs": None if move["eq9"] is None else num(move["eq9"]["max_abs"], 0),
        # the same images' estimates from the curves' fresh samples against Figure 7's, at M
        "stream": None if likelihood["stream_disagreement"] is None else
            {k: num(v, 0 if k == "eq9" else 1) for k, v in likelihood["stream_disagreement"].items()},
        "train_mean": num(likelihood["train_mean"], 0), "test_mean": num(likelihood["test_mean"], 0),
        "mean_all": num((likelihood["train_mean"] + likelihood["test_mean"]) / 2, 0),
        "kl": num(mismatch["kl_median"], 1), "kl_mean_part": num(mismatch["kl_mean_part_median"], 1),
        "log_M": num(mismatch["log_M"], 1),
        "q_vs_conditional": num(width["vs_conditional"]),
        "q_vs_marginal": num(width["vs_marginal"]),
        "share_narrower": pct(width["share_narrower_than_marginal"], 0)}


def ranking_values(estimate: dict, prefix: str = "") -> dict:
    """Q4 (b) and (c) by one estimate: the most and least likely digit with their means and the
    digits tied with them, and train against test."""
    most, least = estimate["most_likely_digit"], estimate["least_likely_digit"]
    per = estimate["per_digit"]
    train = with_se(estimate["train_mean"], estimate["train_se"])
    test = with_se(estimate["test_mean"], estimate["test_se"])
    diff = with_se(estimate["train_minus_test"], estimate["train_minus_test_se"], sign=True)
    return {
        f"{prefix}most": most, f"{prefix}least": least,
        f"{prefix}most_mean": num(per[str(most)]["mean"], 0),
        f"{prefix}least_mean": num(per[str(least)]["mean"], 0),
        f"{prefix}most_tied": digit_list(estimate["most_likely_tied_with"])
                              if estimate["most_likely_tied_with"] else "",
        f"{prefix}least_tied": digit_list(estimate["least_likely_tied_with"])
                               if estimate["least_likely_tied_with"] else "",
        f"{prefix}train_mean": train[0], f"{prefix}train_se": train[1],
        f"{prefix}test_mean": test[0], f"{prefix}test_se": test[1],
        f"{prefix}diff": diff[0], f"{prefix}diff_se": diff[1],
        f"{prefix}train_lower": estimate["train_minus_test"] < 0,
        # the smallest difference these few images could have shown: two standard errors
        f"{prefix}detectable": num(2 * estimate["train_minus_test_se"], 0),
        f"{prefix}train_vs_test": estimate["train_vs_test"],
        # the same difference paired by digit (each digit's training mean minus its test mean)
        **dict(zip((f"{prefix}paired", f"{prefix}paired_se"),
                   with_se(estimate["paired_train_minus_test"],
                           estimate["paired_train_minus_test_se"], sign=True))),
        f"{prefix}paired_within": abs(estimate["paired_train_minus_test"])
                                  < 2 * estimate["paired_train_minus_test_se"]}


def q1_final_means(amortized: dict) -> dict:
    """Q1's final training and validation means on equal digit shares, where the run measured
    them (older runs: the raw means)."""
    if "final_equal_digits" in amortized:
        return amortized["final_equal_digits"]
    return {"train": amortized["final_train"], "val": amortized["final_val"]}


def q1_gap_in_nats(amortized: dict, likelihood: dict) -> dict:
    """Q4 (c): what Q1's gap in reconstruction error between validation and training images is
    worth in log p(x|z) at the mean of q: 784 pixels times the MSE difference over 2 sigma_p^2
    (the Gaussian decoder's exponent), beside the two standard errors Q4's images could show."""
    equal = q1_final_means(amortized)
    mse_gap = equal["val"]["recon_mse"] - equal["train"]["recon_mse"]
    nats = 784 * mse_gap / (2 * likelihood["sigma_p"] ** 2)
    return {"q1_gap_mse": sig(mse_gap, 2),
            "q1_gap_nats": "under 1" if 0 <= nats < 0.5 else num(nats, 0),
            # said only where it explains Q4's verdict: validation worse, by less than the two
            # standard errors of Eq. 9's training-minus-test difference that the text quotes
            "q1_gap_hidden": 0 < nats < 2 * likelihood["eq9"]["train_minus_test_se"]}


def moved_in_ranking(per_digit: dict, key: str, other: str) -> list:
    """The digits ranked at another place by `other` than by `key` (most likely first)."""
    order = {k: sorted(per_digit, key=lambda d: -per_digit[d][k]) for k in (key, other)}
    return [int(d) for d, e in zip(order[key], order[other]) if d != e]


def q4_values(likelihood: dict, likelihood_elbo: dict, amortized: dict,
              amortized_elbo: dict) -> dict:
    """Q4: the converged estimate, Eq. 9 beside it (the exercise's), and the ablation."""
    ll, eq9, per = likelihood, likelihood["eq9"], likelihood["per_digit"]
    implied_sigma2 = 784 / (2 * amortized["latent_dim"])
    return {
        **q1_gap_in_nats(amortized, ll),
        **estimate_diagnostics(ll),
        "eq9_end": eq9_at_largest_m(ll["convergence"]),
        **ranking_values(ll),
        **ranking_values(eq9, "eq9_"),
        "M": f"{ll['num_samples']:,}", "M_max": f"{ll['convergence']['M'][-1]:,}",
        "n_images": len(ll["images"]), "per_digit_n": ll["args"]["per_digit"],
        "vae_train_images": f"{amortized['train_images']:,}",
        "sigma_p": f"{ll['sigma_p']:g}", "adam_steps": ll["args"]["adam_steps"],
        "newton_steps": ll["args"]["newton_steps"], "bootstrap": f"{ll['args']['bootstrap']:,}",
        "seconds": num(ll["estimate_seconds"], 1),
        "peak_gb": "n/a" if ll["peak_rss_mb"] is None else num(ll["peak_rss_mb"] / 1024, 1),
        "device": ll["device"],
        "implied_sigma2": num(implied_sigma2), "implied_sigma": num(math.sqrt(implied_sigma2)),
        # whole nats, as standard errors of 15 to 45 nats support
        "table": [{"digit": d, "mean": num(per[str(d)]["mean"], 0), "se": num(per[str(d)]["se"], 0),
                   "eq9": num(per[str(d)]["eq9_mean"], 0), "gap": num(per[str(d)]["gap_mean"], 0),
                   "ink": num(ll["ink_per_digit"][str(d)], 0)} for d in range(10)],
        "same_ranking_ends": ll["agreement"]["most"] and ll["agreement"]["least"],
        # the digits whose place in the ranking of the ten means differs between the estimates
        "moved": digit_list(moved) if (moved := moved_in_ranking(per, "mean", "eq9_mean")) else "",
        "ink_corr": num(ll["ink_correlation"]),
        "least_ink_digit": min(range(10), key=lambda d: ll["ink_per_digit"][str(d)]),
        "most_ink_digit": ll["most_ink"]["digit"], "most_ink": num(ll["most_ink"]["lit_pixels"], 0),
        "most_ink_rank": ll["most_ink"]["rank"],
        "eq9_se": [num(eq9["per_digit"][str(d)]["se"], 0) for d in range(10)],
        "same_most": ll["agreement"]["most"], "same_least": ll["agreement"]["least"],
        "same_train_vs_test": ll["agreement"]["train_vs_test"],
        "changes_within_ties": ll["agreement"]["changes_within_ties"],
        "eq9_ink_corr": num(ll["eq9_ink_correlation"]), "eq9_trust": ll["trust"]["eq9"],
        # Is the ablation's model better by the converged estimate (its mean log p(x))?
        "ablation_better": (likelihood_elbo["train_mean"] + likelihood_elbo["test_mean"]
                            > ll["train_mean"] + ll["test_mean"]),
        # Did training the encoder for the sigma_p model make Eq. 9 converge? Only if its median
        # effective sample size rose tenfold and its gap halved.
        "ablation_cures": (likelihood_elbo["diagnostics"]["eq9"]["median_ess"]
                           >= 10 * ll["diagnostics"]["eq9"]["median_ess"]
                           and likelihood_elbo["gap"]["mean"] < ll["gap"]["mean"] / 2),
        "elbo": {**estimate_diagnostics(likelihood_elbo),
                 "recon_train": num(amortized_elbo["final_train"]["recon_mse"], 4),
                 "recon_val": num(amortized_elbo["final_val"]["recon_mse"], 4),
                 "agg_kl": num(amortized_elbo["aggregate_posterior_kl"], 1)},
    }


def eq7_values(eq7: dict) -> dict:
    return {"at_half": num(eq7["eq7_at_half"], 4), "kl_at_half": num(eq7["kl_at_half"], 4),
            # the minimizers are 1/2 and 1: three figures, shown without trailing zeros
            "eq7_min": f"{eq7['eq7_minimizer_sigma2']:.3g}",
            "kl_min": f"{eq7['kl_minimizer_sigma2']:.3g}"}


# ----------------------------------------------------------------------------------------------
# Uppsala lab
# ----------------------------------------------------------------------------------------------
def power_of_ten(x: float) -> dict:
    """1e-07 -> mantissa '1', exponent -7; 5e-06 -> '5', -6 (the template sets it as math)."""
    exponent = math.floor(math.log10(x))
    return {"mantissa": f"{round(x / 10 ** exponent, 3):g}", "exponent": exponent}


def both_ends(end: str, digits: list) -> dict:
    """The digits that both error measures (absolute and relative to ink) put at one end."""
    return {f"both_{end}": digit_list(digits) if digits else "", f"both_{end}_n": len(digits)}


def ordinal(n: int) -> str:
    return f"{n}" + ("th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th"))


def ties_with(ties: list, last: str) -> str:
    """'3 is within two standard errors of 8' or '3 and 5 are within ...'."""
    return (f"{digit_list(ties)} {'is' if len(ties) == 1 else 'are'} within two standard errors "
            f"of {last}")


def tie_note(ties: list, end: list, parens: bool = True) -> str:
    """' (3 is within two standard errors of 8)' for the digits just outside a ranking's end
    that it cannot tell from the end's last digit ('; 3 is ...' without parentheses); '' when
    there are none."""
    if not ties:
        return ""
    note = ties_with(ties, end[-1])
    return f" ({note})" if parens else f"; {note}"


# a kept digit is reconstructed 'well' when at least two thirds of its images are kept, and
# 'only partly' between half (kept at all) and two thirds
WELL_KEPT = 2 / 3


def kept_phrase(per: dict, kept: list) -> str:
    """'1 and 0 well and 9 only partly': the kept digits by whether WELL_KEPT of their images are."""
    well = [d for d in kept if per[d]["kept"] >= WELL_KEPT]
    partly = [d for d in kept if per[d]["kept"] < WELL_KEPT]
    return " and ".join(([f"{digit_list(well)} well"] if well else [])
                        + ([f"{digit_list(partly)} only partly"] if partly else []))


def survival(named: dict, lost: dict, order: list) -> dict:
    """Which digits a method's reconstructions keep (by the nearest training image), with the
    shares kept, and what the lost ones come back as most often, grouped by what they become."""
    per = named["per_digit"]
    kept = [d for d in order if d not in lost]
    partly = [d for d in kept if per[d]["kept"] < WELL_KEPT]
    near_half = [d for d in order if "images" in per[d]
                 and abs(per[d]["kept"] - 0.5) < 2 * binomial_se(per[d]["kept"], per[d]["images"])]
    into = {}
    for d in order:
        if d in lost and lost[d] != int(d):     # a digit read as itself by a plurality turns into none
            into.setdefault(lost[d], []).append(d)
    # kept digits that lost ones come back as: the naming rule may favour them
    targets = [d for d in kept if int(d) in into]
    groups = sorted(into.items(), key=lambda item: -len(item[1]))
    return {"share": pct(named["kept"], 0), "kept": digit_list(kept) if kept else "",
            "kept_how": kept_phrase(per, kept),
            # kept, but not well (Q4.1's 'only partly'), with their shares
            "partly": digit_list(partly) if partly else "",
            "partly_shares": digit_list([num(100 * per[d]["kept"], 0) for d in partly]) if partly else "",
            "lost_n": len(lost), "lost_words": count_word(len(lost)),
            "kept_words": count_word(len(kept)),
            "lost": digit_list([d for d in order if d in lost]) if lost else "",
            "targets": digit_list(targets) if targets else "",
            # how many of the images named as each of those show it (older runs: not stored)
            "target_precision": (digit_list([num(100 * per[d]["precision"], 0) for d in targets])
                                 if targets and all(per[d].get("precision") is not None
                                                    for d in targets) else ""),
            "kept_shares": digit_list([num(100 * per[d]["kept"], 0) for d in kept]) if kept else "",
            "lost_max": pct(max((per[d]["kept"] for d in lost), default=0), 0),
            # digits whose share kept is within two binomial standard errors of the half that
            # decides kept or lost: one run cannot say which side they are on (older runs: no
            # image counts, none named)
            "borderline": digit_list(near_half) if near_half else "",
            "borderline_shares": digit_list([num(100 * per[d]["kept"], 0) for d in near_half])
                                 if near_half else "",
            # the lost digits split so: clearly lost, and lost only just (on the edge)
            "shares_by_digit": {d: num(100 * per[d]["kept"], 0) for d in order},
            "lost_clear": [d for d in order if d in lost and d not in near_half],
            "lost_edge": [d for d in order if d in lost and d in near_half],
            "into": "; ".join(f"{digit_list(ds)} as {a_digit(t)}" for t, ds in groups)}


def a_digit(digit) -> str:
    """'a 9', but 'an 8' (said "eight")."""
    return f"{'an' if int(digit) == 8 else 'a'} {digit}"


def count_word(n: int) -> str:
    return ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"][n]


def misread_phrase(wrong) -> str:
    """[(true digit, digit read), ...] as 'the 3 and 6 as an 8, the 4, 5 and 7 as a 9'."""
    by_read = {}
    for true, read in wrong:
        by_read.setdefault(read, []).append(true)
    return ", ".join(f"the {digit_list(sorted(ts))} as {a_digit(r)}"
                     for r, ts in sorted(by_read.items()))


def small_count(n: int) -> str:
    """A count in words up to ten ('six'), in figures above ('1,000')."""
    return count_word(n) if 0 <= n <= 10 else f"{n:,}"


def some_of(k: int, n: int, things: str) -> str:
    """'both digits that lie apart', 'all three ...', 'one of the eight ...', 'none of the ...'."""
    if k == n:
        return f"both {things}" if n == 2 else f"the {things}" if n == 1 else f"all {count_word(n)} {things}"
    return f"{'none' if k == 0 else count_word(k)} of the {count_word(n)} {things}"


def apml_values(m: dict) -> dict:
    """Every value of the lab report, from ppca_pca's metrics, question by question."""
    p = m["ppca_pca"]
    return {"quick": bool(p["args"]["quick"]),
            "train_images": f"{p['train_images']:,}", "test_images": f"{p['test_images']:,}",
            "lattice": p["lattice"], "scatter_points": f"{p['scatter_points']:,}",
            **lab_tables(p), **lab_pca_values(p), **lab_ppca_values(p), **lab_code_values(p),
            **lab_vae_values(p), "decoded": decoded_values(p)}


def decoded_values(p: dict):
    """4.1, 4.5, 4.9, 'decoded': per method, the digits whose mean code decodes to an image of
    themselves ('1, 0 and 9', '' for none) and how many; None for a run from before this
    measure."""
    if "decoded_mean_codes" not in p:
        return None
    values = {name: {"own": digit_list(d["own"]) if d["own"] else "", "n": len(d["own"])}
              for name, d in p["decoded_mean_codes"].items()}
    # 4.9: the digits the VAE loses whose mean code decodes to another digit ('4 and 5' as
    # 'a 9 and a 3'): their codes lie among other digits'
    named = p["decoded_mean_codes"]["vae"]["named"]
    lost = [d for d in sorted(p["answers"]["lost"]["vae"], key=int) if named[int(d)] != int(d)]
    values["vae_lost_codes"] = None if not lost else {
        "digits": digit_list(lost), "as": digit_list([a_digit(named[int(d)]) for d in lost]),
        "one": len(lost) == 1}
    return values


def lab_tables(p: dict) -> dict:
    """Tables 1 to 3: squared error per digit (and each digit's ink), the share of each digit's
    test images kept by the rule of Q4.1, and what each digit is read as."""
    pca, pg, pc, vae = p["pca"], p["ppca_gradient"], p["ppca_closed_form"], p["vae"]
    errors = [("PCA", pca), ("PPCA, gradient fit", pg), ("PPCA, closed form", pc),
              ("VAE, 2-D latent", vae)]
    kept_rows = [("test images", p["original_images"]), ("test images, blurred", p["blurred_test_images"]),
                 ("PCA", pca), ("PPCA, gradient fit", pg), ("VAE, 2-D latent", vae)]
    return {
        "error_table": [{"method": name, "total": num(r["test_sq_error"]),
                         "per_digit": [num(r["test_sq_error_per_digit"][str(d)], 1)
                                       for d in range(10)]} for name, r in errors],
        "se_range_all": "{} to {}".format(*(sig(f(se for _, r in errors for se in
                                                   r["test_sq_error_se_per_digit"].values()), 1)
                                            for f in (min, max))),
        # the overall means' standard errors (over the test images), where the run stored them
        "se_overall": (None if any("test_sq_error_se" not in r for _, r in errors) else
                       "{} to {}".format(*(num(se, se_decimals(se)) for se in (
                           f(r["test_sq_error_se"] for _, r in errors) for f in (min, max))))),
        "closed_max_diff": sig(max(abs(pg["test_sq_error_per_digit"][str(d)] - pc["test_sq_error_per_digit"][str(d)])
                                   for d in range(10)), 1),
        # each digit's ink, the mean over its test images of the summed squared pixels (Q4.1)
        "ink_row": [num(p["test_ink_per_digit"][str(d)], 0) for d in range(10)],
        # Table 2: the share kept per method; the blurred copies go to Table 3 (the rule's checks)
        "kept_table": [kept_row(name, r) for name, r in kept_rows if name != "test images, blurred"],
        # the shares' largest binomial standard error, in points (older runs: counts not stored)
        "kept_se_max": (None if any("images" not in v for _, r in kept_rows
                                    for v in r["nearest_digit"]["per_digit"].values()) else
                        num(100 * max(binomial_se(v["kept"], v["images"]) for _, r in kept_rows
                                      for v in r["nearest_digit"]["per_digit"].values()), 1)),
        # Table 3, Q4.1's checks on the naming rule: blurred copies kept, beside PCA's
        # reconstructions, and for PCA (older runs: not stored) of the images named as each
        # digit, the share that show it, and each digit's share kept minus its false alarms, in
        # points (these rows have no overall value: "all" is blank)
        "check_table": [kept_row("test images, blurred", p["blurred_test_images"]),
                        kept_row("PCA", pca)] + ([] if "beyond_false_alarms" not in p["answers"] else [
            {"label": "PCA: precision", "all": "", "per_digit": [
                "—" if pca["nearest_digit"]["per_digit"][str(d)].get("precision") is None else
                num(100 * pca["nearest_digit"]["per_digit"][str(d)]["precision"], 0)
                for d in range(10)]},
            {"label": "PCA: kept − false alarms", "all": "", "per_digit": [
                num(100 * p["answers"]["beyond_false_alarms"]["pca"][str(d)], 0)
                for d in range(10)]}]),
        # ...and the digit that each digit's reconstructions are read as most often (what its
        # mean code decodes to is in Figure 1's mean rows)
        "read_as_table": [{"label": f"named most often, {name}", "per_digit": [
            str(r["nearest_digit"]["per_digit"][str(d)]["named_most"]) for d in range(10)]}
            for name, r in (("PCA", pca), ("VAE, 2-D latent", vae))],
    }


def kept_row(label: str, result: dict) -> dict:
    """A row of the lab's Tables 2 and 3: the share (%) kept by the naming rule, overall and
    per digit."""
    kept = result["nearest_digit"]
    return {"label": label, "all": num(100 * kept["kept"], 0),
            "per_digit": [num(100 * kept["per_digit"][str(d)]["kept"], 0) for d in range(10)]}


def points_between(a: float, b: float) -> str:
    """Share a minus share b in points, as the difference of the two whole percentages shown."""
    return num(round(100 * a) - round(100 * b), 0)


def blur_control(blurred: dict, pca: dict) -> dict:
    """How Q4.1's blurred test images were made. This run's: each image by the box whose
    squared error is nearest PCA's for that image (`per_image`), with the largest gap between
    the blurred copies' mean error and PCA's over the ten digits. Older runs: one box for every
    image (5 x 5 where the run did not store it), with its mean error where stored."""
    if "box_counts" in blurred:
        gaps = [abs(blurred["test_sq_error_per_digit"][d] - pca["test_sq_error_per_digit"][d])
                for d in map(str, range(10))]
        return {"per_image": True, "error": num(blurred["test_sq_error"], 1),
                "digit_gap": num(max(gaps), 1)}
    return {"per_image": False, "box": blurred.get("box", 5),
            "error": None if "sq_error" not in blurred else num(blurred["sq_error"], 1)}


def max_blur_cost(p: dict) -> dict:
    """The digit whose share kept blur lowers most (the original test images' share minus the
    blurred copies'), and by how many points."""
    original = p["original_images"]["nearest_digit"]["per_digit"]
    blurred = p["blurred_test_images"]["nearest_digit"]["per_digit"]
    digit = max(original, key=lambda d: original[d]["kept"] - blurred[d]["kept"])
    return {"digit": digit, "points": points_between(original[digit]["kept"], blurred[digit]["kept"])}


def beyond_false_alarms(ans: dict, method: str):
    """Q4.1's control for the naming rule's bias: the three digits whose share kept exceeds
    their false alarms most, in points, with their ties, the largest excess of any other digit,
    and whether they are the digits the method keeps; None for runs that did not store it."""
    if "beyond_false_alarms" not in ans:
        return None
    score, best = ans["beyond_false_alarms"][method], ans["beyond_false_alarms_best"][method]
    ties = ans["beyond_false_alarms_ties"][method]
    kept = {d for d in ans["kept_order"][method] if d not in ans["lost"][method]}
    rest = [v for d, v in score.items() if d not in best + ties]
    return {"best": digit_list(best), "points": digit_list([num(100 * score[d], 0) for d in best]),
            "ties": tie_note(ties, best, parens=False),
            "rest_max": num(100 * max(rest), 0) if rest else None,
            "same_as_kept": set(best) == kept}


def lab_pca_values(p: dict) -> dict:
    """Q4.1 and Q4.2 (and the rankings 4.5 and 4.9 share): best and worst digits with their
    ties, which digits survive (kept or lost by the nearest training image, the rule's own
    accuracy and its bias on blur), and the error's link with ink."""
    ans, pca, ink = p["answers"], p["pca"], p["test_ink_per_digit"]
    pca_se = pca["test_sq_error_se_per_digit"].values()

    def ties(k):
        return {end: tie_note(ans["ties"][k][end], ans[end][k]) for end in ("best", "worst")}
    return {
        "pca_error": num(pca["test_sq_error"]), "explained": pct(pca["explained_variance"], 1),
        "pca_kept_all": pct(pca["nearest_digit"]["kept"], 0),
        # Q4.1's blur control per digit: lost beyond blur, or kept about as often as blur allows
        "beyond_blur": (digit_list(ans["pca_lost_beyond_blur"])
                        if ans.get("pca_lost_beyond_blur") else ""),
        "as_blur": digit_list(ans["pca_lost_as_blur"]) if ans.get("pca_lost_as_blur") else "",
        "se_range": f"{num(min(pca_se), 1)} to {num(max(pca_se), 1)}",
        "best": {k: digit_list(v) for k, v in ans["best"].items()},
        "worst": {k: digit_list(v) for k, v in ans["worst"].items()},
        "ties": {k: ties(k) for k in ("pca", "ppca_gradient", "vae")},
        "ink_corr": num(ans["pca_ink_correlation"]), "ink1": num(ink["1"], 0),
        # the p-value as a power of ten it is below (p < 10^-3), or to two figures
        "ink_corr_p_exp": (math.ceil(math.log10(ans["pca_ink_correlation_p"]))
                           if ans["pca_ink_correlation_p"] < 0.001 else None),
        "ink_corr_p": sig(ans["pca_ink_correlation_p"], 2),
        "ink0": num(ink["0"], 0),
        "rel_best": digit_list(ans["pca_relative_best"]),
        # the kept digits are the best relative to ink too: two measures with other biases agree
        "kept_are_rel_best": ({str(d) for d in ans["pca_relative_best"]}
                              == {d for d in ans["kept_order"]["pca"] if d not in ans["lost"]["pca"]}),
        # the control for the rule's false alarms (older runs: not stored)
        "beyond_false_alarms": beyond_false_alarms(ans, "pca"),
        "rel_worst": digit_list(ans["pca_relative_worst"]),
        "rel_ties": {end: tie_note(ans["relative_ties"]["pca"][end], ans[f"pca_relative_{end}"])
                     for end in ("best", "worst")},
        # every method's ranking relative to ink (Q4.5, Q4.9), with its ties
        "rel": {k: {"best": digit_list(ans["relative_best"][k]),
                    "worst": digit_list(ans["relative_worst"][k]),
                    "ties": {end: tie_note(ans["relative_ties"][k][end], ans[f"relative_{end}"][k])
                             for end in ("best", "worst")}}
                for k in ("pca", "ppca_gradient", "vae")},
        "ppca_rel_same_as_pca": (ans["relative_best"]["ppca_gradient"] == ans["relative_best"]["pca"]
                                 and ans["relative_worst"]["ppca_gradient"] == ans["relative_worst"]["pca"]),
        **both_ends("best", ans["pca_best_by_both"]), **both_ends("worst", ans["pca_worst_by_both"]),
        "neighbour_images": f"{p['original_images']['reference_images']:,}",
        "namer_accuracy": pct(p["original_images"]["nearest_digit"]["kept"], 0),
        # the rule's bias on blurs: the same test images box-blurred to PCA's squared error
        "namer_blur_ok": ans["namer_keeps_blurred_digits"],
        "blur": blur_control(p["blurred_test_images"], pca),
        "pca_error_1": num(pca["test_sq_error"], 1),
        "blur_accuracy": pct(p["blurred_test_images"]["nearest_digit"]["kept"], 0),
        "blur_min": pct(min(v["kept"] for v in p["blurred_test_images"]["nearest_digit"]["per_digit"].values()), 0),
        # what blur alone costs the rule: overall, and for the digit it costs most, in points
        # (differences of the whole percentages shown, so that the text adds up as printed)
        "blur_cost": points_between(p["original_images"]["nearest_digit"]["kept"],
                                    p["blurred_test_images"]["nearest_digit"]["kept"]),
        "blur_cost_max": max_blur_cost(p),
        "survival": {k: survival(p[k]["nearest_digit"], ans["lost"][k], ans["kept_order"][k])
                     for k in ("pca", "ppca_gradient", "vae")},
        "best_but_lost": digit_list(ans["pca_best_error_but_lost"]) if ans["pca_best_error_but_lost"] else "",
        "worst_but_kept": digit_list(ans["pca_worst_error_but_kept"]) if ans["pca_worst_error_but_kept"] else "",
    }


def lab_ppca_values(p: dict) -> dict:
    """Q4.3, Q4.5 and Q4.6: the gradient fit against the closed form, and PPCA's error
    against PCA's (the shrinkage of its posterior mean)."""
    ans, pca, pg, pc = p["answers"], p["pca"], p["ppca_gradient"], p["ppca_closed_form"]
    angles, comparison = p["ppca_comparison"]["subspace_angles_deg"], p["ppca_comparison"]
    return {
        "init": pg["initialization"], "tol": power_of_ten(p["args"]["ppca_tol"]),
        "max_iter": f"{p['args']['ppca_max_iter']:,}", "iterations": f"{pg['iterations']:,}",
        "converged": pg["converged"], "ppca_lr": f"{pg['lr']:g}",
        "ll_grad": num(pg["test_log_likelihood"], 3), "ll_closed": num(pc["test_log_likelihood"], 3),
        "train_ll_gap": sig(pc["train_log_likelihood"] - pg["train_log_likelihood"], 2),
        # four figures, so that Q4.10's D/2 log of the two sigma^2's ratio can be checked from them
        "sigma2_ppca": sig(pc["sigma2"], 4),
        "eig_grad": " and ".join(num(e, 3) for e in pg["w_eigenvalues"]),
        "eig_closed": " and ".join(num(e, 3) for e in pc["w_eigenvalues"]),
        "eig_err": sig(100 * max(map(abs, comparison["w_eigenvalue_relative_errors"])), 1) + " %",
        "sigma2_err": sig(100 * abs(comparison["sigma2_relative_error"]), 1) + " %",
        # both sigma^2 to the figures that show their difference, so that its size can be checked
        "sigma2_pair": " against ".join(sig(v, figures_apart(pg["sigma2"], pc["sigma2"]))
                                        for v in (pg["sigma2"], pc["sigma2"])),
        "ll_diff": sig(abs(pg["test_log_likelihood"] - pc["test_log_likelihood"]), 1),
        "matches_closed": ans["gradient_reaches_closed_form"],
        "data_eig": " and ".join(num(e, 2) for e in pc["data_eigenvalues"]),
        "angles": f"{num(angles[0])} and {num(angles[1])}", "max_angle": num(max(angles)),
        "ppca_same_as_pca": ans["ppca_same_as_pca"],
        "ppca_loses_same": ans["ppca_loses_the_same_as_pca"],
        "ppca_error": num(pg["test_sq_error"]), "ppca_closed_error": num(pc["test_sq_error"]),
        "ppca_not_below_pca": ans["ppca_error_not_below_pca"],
        # the gaps to PCA are a few thousandths: two significant figures show them
        "ppca_gap": small(pg["test_sq_error"] - pca["test_sq_error"]),
        # Table 1 shows two decimals: a smaller difference that rounds to two different ones
        "ppca_gap_hidden": (abs(pg["test_sq_error"] - pca["test_sq_error"]) < 0.01
                            and num(pg["test_sq_error"]) != num(pca["test_sq_error"])),
        "closed_gap": small(pc["test_sq_error"] - pca["test_sq_error"]),
        # the same gap paired on the same images, with its standard error (far below either mean's)
        "ppca_paired": (None if "ppca_minus_pca_sq_error" not in comparison else
                        with_se(comparison["ppca_minus_pca_sq_error"]["mean"],
                                comparison["ppca_minus_pca_sq_error"]["se"], sign=True)),
        "closed_gap_predicted": small(comparison["closed_form_shrinkage_error"]),
    }


def lab_code_values(p: dict) -> dict:
    """Q4.4, Q4.7 and Q4.8: the codes' ranges and scales, the closest digit means and the groups
    they crowd into, whether the lost digits follow them, and how well each method separates
    the digits."""
    ans, enc, groups = p["answers"], p["encodings"], p["answers"]["code_groups"]
    apart = [g[0] for g in groups["pca"] if len(g) == 1]

    def span(k):
        lo, hi, sd = enc[k]["range_min"], enc[k]["range_max"], enc[k]["std"]
        return {"x": f"[{num(lo[0], 1)}, {num(hi[0], 1)}]",
                "y": f"[{num(lo[1], 1)}, {num(hi[1], 1)}]", "sd": f"{num(sd[0], 1)} and {num(sd[1], 1)}"}

    def pair(q):                    # '4–9'
        return "–".join(map(str, q["digits"]))

    def pairs(k):                   # distances relative to the mean distance between digit means
        return ", ".join(f"{pair(q)} ({num(q['relative'])})" for q in enc[k]["closest_pairs"][:3])

    return {
        "span": {k: span(k) for k in ("pca", "ppca", "vae")},
        "kurtosis": {k: " and ".join(num(v, 1) for v in enc[k]["excess_kurtosis"])
                     for k in ("ppca", "vae")},
        "vae_heavy_tails": ans["vae_heavy_tails"],
        "axis_ratio": num(ans["ppca_second_axis_shrink_ratio"]),
        "pairs": {k: pairs(k) for k in ("pca", "ppca", "vae")},
        "pairs_plain": {k: digit_list([pair(q) for q in enc[k]["closest_pairs"][:3]])
                        for k in ("pca", "ppca")},
        "pairs_shared": ans["closest_pairs_shared_pca_ppca"],
        # 4.7's crowded groups ('{2, 3, 5, 6, 8} and {4, 7, 9}') and the digits apart ('0 and 1')
        "groups": {k: digit_list(["{" + ", ".join(map(str, g)) + "}" for g in groups[k] if len(g) > 1])
                   for k in ("pca", "ppca")},
        "groups_same": groups["pca"] == groups["ppca"],
        "apart": digit_list(apart) if apart else "",
        "apart_kept": some_of(ans["pca_apart_kept"], len(apart), "digits that lie apart"),
        "crowded_kept": some_of(ans["pca_crowded_kept"], 10 - len(apart), "crowded ones"),
        "apart_p": num(ans["pca_apart_kept_p"]),
        "apart_survive": ans["pca_apart_kept_more"],
        "crowd_rho": num(ans["pca_crowding_spearman"], sign=True),
        "crowd_p": num(ans["pca_crowding_p"]),
        # does either of the tests 4.7 prints find a link between crowding and loss (p < 0.05)?
        "crowding_link_found": min(ans["pca_apart_kept_p"], ans["pca_crowding_p"]) < 0.05,
        "crowded_are_worst": ans["pca_crowded_are_worst"],
        # the lost digits that come back most often as another digit
        "lost_n": len(ans["pca_lost_neighbour_rank"]),
        "lost_n_words": count_word(len(ans["pca_lost_neighbour_rank"])),
        "lost_to_nearest": count_word(ans["pca_lost_to_nearest"]),
        "lost_to_nearest_which": digit_list(
            [f"{d} as {a_digit(ans['lost']['pca'][d])}" for d, rank in
             ans["pca_lost_neighbour_rank"].items() if rank == 1]) if ans["pca_lost_to_nearest"] else "",
        "separation": {k: num(enc[k]["separation"], 1) for k in ("pca", "ppca", "vae")},
        "vae_separates_better": ans["vae_separates_better"],
        "vae_on_prior_scale": ans["vae_on_prior_scale"],
        # 4.7 against 4.1 and 4.5: the closest pairs whose two mean codes decode to one digit
        "merged": None if "pairs_decoded_as_one" not in ans else {
            k: {"n": len(ans["pairs_decoded_as_one"][k]),
                "of_all": ans.get("pairs_decoded_as_one_of_all", {}).get(k),
                "which": "; ".join(f"{a} and {b} as {a_digit(d)}"
                                   for a, b, d in ans["pairs_decoded_as_one"][k])}
            for k in ("pca", "ppca")},
    }


def lab_vae_values(p: dict) -> dict:
    """The lab VAE (its training) and Q4.9 and Q4.10: its gains over PPCA per digit, the
    digits it loses, its prior samples' blur, and the two models as densities."""
    ans, vae = p["answers"], p["vae"]
    gains, gains_se = ans["vae_gains_over_ppca"], ans["vae_gains_over_ppca_se"]
    elbo_curve = vae["train_elbo_per_epoch"]
    # Q4.10: the VAE's lower bound minus PPCA's exact log-likelihood, and the part of it that
    # the noise variances do not explain
    lead = vae["test_elbo"] - p["ppca_closed_form"]["test_log_likelihood"]
    terms = ans["elbo_lead_terms"]
    blur = p["prior_sample_mid_grey"]

    def gain_list(digits):
        return ", ".join("{} ± {}".format(*with_se(gains[d], gains_se[d])) for d in digits)
    return {
        # Q4.10's split of the density gap: four figures, so that D/2 log(ratio) recomputed
        # from the printed variances gives the printed nats
        "vae_sigma2": sig(vae["sigma2"], 4),
        "vae_lr": f"{p['args']['lr']:g}",
        "vae_batch": p["args"]["batch_size"], "vae_epochs": vae["epochs"],
        # with its standard error over the test images (and the one z drawn for each)
        "vae_elbo": "{} ± {}".format(*with_se(vae["test_elbo"], vae["test_elbo_se"])),
        "vae_error": num(vae["test_sq_error"]),
        # the overall means with their standard errors over the test images, where stored
        "errors_se": (None if "test_sq_error_se" not in vae else
                      {k: with_se(p[k]["test_sq_error"], p[k]["test_sq_error_se"])
                       for k in ("pca", "ppca_gradient", "vae")}),
        # the VAE's lower bound minus PPCA's exact log-likelihood, to the ELBO's precision
        "density_gap": num(lead, se_decimals(vae["test_elbo_se"])),
        # the rest of that gap, term by term (Q4.10; with the noise variances' they sum to it)
        "lead_terms": {"wider": num(terms["ppca_principal_directions"], 0),
                       "kl": num(-terms["kl"], 0), "misfit": num(abs(terms["misfit"]), 0),
                       "vae_misfit_larger": terms["misfit"] < 0},
        "vae_epoch_rise_last": sig(elbo_curve[-1] - elbo_curve[-2], 2) if len(elbo_curve) > 1 else "",
        "vae_epoch_rise_first": num(elbo_curve[1] - elbo_curve[0], 0) if len(elbo_curve) > 1 else "",
        "vae_epoch_ordinals": [ordinal(len(elbo_curve) - 1), ordinal(len(elbo_curve))],
        "improved": ans["vae_improved_digits"],
        "largest_gains": digit_list(ans["vae_largest_gains"]),
        "largest_gain_values": gain_list(ans["vae_largest_gains"]),
        "smallest_gains": digit_list(ans["vae_smallest_gains"]),
        "smallest_gain_values": gain_list(ans["vae_smallest_gains"]),
        "gain_ties": tie_note(ans["vae_gain_ties"]["best"], ans["vae_smallest_gains"], parens=False),
        "gain_ties_largest": "" if not ans["vae_gain_ties"]["worst"] else
            f" Among the largest gains, digit{'s' if len(ans['vae_gain_ties']['worst']) > 1 else ''} "
            f"{ties_with(ans['vae_gain_ties']['worst'], ans['vae_largest_gains'][-1])}.",
        # Q4.10: the prior samples' blur, by their mid-grey pixels
        "grey": {k: pct(blur[k], 0) for k in ("ppca", "vae", "test_images")},
        "grey_band": num(blur["band"], 1), "grey_samples": f"{blur['samples']:,}",
        "vae_samples_sharper": blur["vae"] < blur["ppca"],
        "vae_below_ppca": ans["vae_below_ppca"],
        "vae_better_density": ans.get("vae_better_density"),
        "vae_change": (num(abs(100 * ans["vae_error_relative_to_ppca"]), 0) + "\u00a0% "
                       + ("lower" if ans["vae_error_relative_to_ppca"] <= 0 else "higher")),
        "noise_nats": num(ans["noise_variance_nats"], 0),
    }


# ----------------------------------------------------------------------------------------------
# Typesetting
# ----------------------------------------------------------------------------------------------
def install_template(name: str, out: Path) -> tuple:
    """Copy report/<name>.typ to <out>/<name>.typ unless the copy there was edited since we last
    wrote it (its hash is kept in .<name>.typ.sha256): a student's edits are never overwritten.
    A copy equal to the repository's template is ours even if the stamp was lost.
    Returns (path, kept_edits)."""
    source, target = TEMPLATES / f"{name}.typ", out / f"{name}.typ"
    stamp = out / f".{name}.typ.sha256"
    template = source.read_bytes()
    if target.is_file():
        ours = {sha256(template)}
        if stamp.is_file():
            ours.add(stamp.read_bytes().strip().decode(errors="replace"))
        if sha256(target.read_bytes()) not in ours:
            return target, True
    write_bytes(target, template)
    write_bytes(stamp, (sha256(template) + "\n").encode())
    return target, False


def write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def typst_error_line(err: Exception, template: Path, edited: bool = True) -> str:
    """One line from a Typst error: where in the template it is (line and column, from the first
    diagnostic Typst prints as '┌─ file:line:col'), what it is, and what to do: in a template
    the student edited, fix it (or move the copy aside: deleting it would lose the edits); in
    the repository's own, a value it reads is at fault, from a metrics.json edited by hand."""
    message = " ".join(str(getattr(err, "message", None) or err).split())[:200]
    diagnostic = getattr(err, "diagnostic", None) or ""
    where = re.search(r"┌─ (.+?):(\d+):(\d+)", diagnostic)
    if where:
        file = Path(where.group(1)).name
        place = (f"line {where.group(2)}, column {where.group(3)}" if file == template.name
                 else f"{file} line {where.group(2)}, column {where.group(3)}")
        if not edited:
            return (f"{template}: {place}: {message} (the template is the repository's own, so "
                    f"a value it reads from {template.stem}_values.json is wrong: a metrics.json "
                    f"was edited or is another version's; run its script again, or make -B all)")
        return (f"{template}: {place}: {message} (fix it there, or move your edited copy aside "
                f"to get the repository's template back)")
    return f"Typst could not typeset {template}: {message}"


def missing_figure(template: Path, outputs: Path, quick: bool) -> None:
    """One line naming a figure the template shows that is not there (a deleted PNG), and the
    command that draws it again, before Typst would stop on it."""
    try:
        text = template.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:           # an editor that saved it as Latin-1 or cp1252
        raise UsageError(f"{template} is not UTF-8 text (byte {err.start}); save it again as "
                         f"UTF-8 (your editor's encoding setting), then run the same command")
    for figure in re.findall(r'image\("\.\./([^"]+)"\)', text):
        path = outputs / figure
        if not path.is_file():
            folder = Path(figure).parts[0]
            again = (f"run {experiment_command(folder, display_path(outputs), quick)} again"
                     if folder in EXPERIMENTS else "restore it")
            raise UsageError(f"{path} is missing: {again}")


def typeset(template: Path, root: Path, edited: bool) -> tuple:
    """Compile with Typst (the project root is the outputs folder, so the template reaches every
    figure). Returns (the PDF's bytes, its number of pages); writes nothing."""
    import typst

    try:
        data = typst.compile(str(template), root=str(root))
        counts = json.loads(typst.query(str(template), "<page-count>", field="value",
                                        root=str(root)))
    except Exception as err:  # noqa: BLE001 - Typst reports a syntax or missing-file problem
        raise UsageError(typst_error_line(err, template, edited))
    pages = counts[0] if isinstance(counts, list) and len(counts) == 1 else None
    if type(pages) is not int:                  # the template's last line was edited or lost
        raise UsageError(f"{template}: its last line must stay "
                         f"'#context [#metadata(counter(page).final().first()) <page-count>]' "
                         f"(it counts the pages); restore it, then run the same command")
    return data, pages


def parse_args(argv=None):
    first_paragraph = " ".join(__doc__.split("\n\n")[0].split())
    parser = OneLineParser(prog="build_report.py", description=first_paragraph)
    parser.add_argument("--outputs", type=path_in, default=ROOT / "outputs",
                        help="folder holding the scripts' output folders")
    return parser.parse_args(argv)


def main(argv=None, run=None) -> dict:
    args = parse_args(argv)
    outputs = args.outputs.resolve()
    # Read and check everything first: a missing or broken input changes nothing on disk.
    reads, raw = {}, metrics_bytes(outputs)
    quick = quick_outputs(outputs, raw)
    metrics = {s: read_metrics(outputs, s, raw[s], reads, quick) for s in raw}
    runs_as_named(metrics, outputs, quick)
    try:
        values = {"ex1": ex1_values(metrics), "apml_lab": apml_values(metrics)}
    except (TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as err:
        source = reads["last"]          # a hand-edited or damaged file: name it, not a traceback
        raise UsageError(f"{source.path} holds a value of the wrong type or size "
                         f"({' '.join(str(err).split())[:80]}): run {source.writer} again")
    out = outputs / "report"
    if run is not None:     # the command line: lock the folder (a second build waits its turn)
        run.claim(out)      # and remove what a killed build left
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write to {out}: {err.strerror or err}; choose another --outputs")
    pages, pdfs = {}, {}
    for name, (pdf, _) in REPORTS.items():
        write_bytes(out / f"{name}_values.json",
                     (json.dumps(values[name], indent=1, ensure_ascii=False) + "\n").encode())
        template, kept = install_template(name, out)
        missing_figure(template, outputs, quick)
        if kept:
            print(f"note: kept your edited {template} (move it aside to get the repository's "
                  f"template)")
        pdfs[name], pages[name] = typeset(template, outputs, edited=kept)
    # Both compiled: only now is either PDF replaced, so an error leaves both as they were.
    built_from = {}
    for name, (pdf, scripts) in REPORTS.items():     # what each PDF was typeset from, by content
        built_from[name] = {"template": sha256((out / f"{name}.typ").read_bytes()),
                            "metrics": {s: sha256(raw[s]) for s in scripts},
                            "pages": pages[name]}
    written = []
    for name, (pdf, _) in REPORTS.items():
        write_bytes(out / pdf, pdfs[name])
        print(f"wrote {out / pdf} ({pages[name]} pages)")
        written.append(pdf)
        if run is not None:         # what an interruption from here on leaves undone
            run.product = (f"the rest ({', '.join(written)} already new: run it again so that "
                           f"both reports match)")
    write_bytes(out / BUILT_FROM, (json.dumps(built_from, indent=1) + "\n").encode())
    if pages["ex1"] > EX1_MAX_PAGES:
        print(f"warning: {REPORTS['ex1'][0]} has {pages['ex1']} pages; the exercise allows "
              f"{EX1_MAX_PAGES}", file=sys.stderr)
    return pages


if __name__ == "__main__":
    run_main(lambda run, argv: main(argv, run), product="the reports", out_flag="--outputs")
