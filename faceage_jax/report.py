"""The evaluation's report: metrics.json, report.md, per-face CSVs and plots (matplotlib)."""

import csv
import io
import json

import numpy as np
from etils import epath
from PIL import Image

from faceage_jax import faces, samples

GRID_FACES = 8
TITLES = {"young_to_old": "young → old", "old_to_young": "old → young"}
SETS = {"young_to_old": ("young", "old"), "old_to_young": ("old", "young")}


def _format(entry, percent=False, digits=1) -> str:
    """'12.3 [10.1, 14.2]' (an interval when there is one); '–' when not measured."""
    if not entry or entry.get("value") is None:
        return "–"
    scale, unit = (100, " %") if percent else (1, "")
    text = f"{entry['value'] * scale:.{digits}f}{unit}"
    if "low" in entry:
        text += f" [{entry['low'] * scale:.{digits}f}, {entry['high'] * scale:.{digits}f}]"
    return text


def _n(row: dict) -> str:
    counts = sorted(
        {entry["n"] for entry in row.values() if isinstance(entry, dict) and "n" in entry}
    )
    return "/".join(str(c) for c in counts)


def _headline_rows(direction, figures, config):
    """(label, figures-by-column, percent?, digits) of the card's headline table."""
    rows = [("predicted age (years)", figures["predicted_age"], False, 1)]
    rows.append(("age shift, mean (years)", figures["age_shift_mean"], False, 1))
    rows.append(("age shift, median (years)", figures["age_shift_median"], False, 1))
    sign = "+" if direction == "young_to_old" else "−"
    for threshold in (10, 20, 30):
        rows.append(
            (f"shifted by {sign}{threshold} or more", figures[f"shifted_by_{threshold}"], True, 0)
        )
    for name, entry in figures.items():
        if name.startswith("reads_"):
            words = name.replace("reads_at_least_", "reads ≥ ").replace("reads_under_", "reads < ")
            rows.append((words, entry, True, 0))
    rows.append(("same person (dlib distance < 0.6)", figures["same_person"], True, 0))
    rows.append(("identity distance, mean", figures["identity_distance"], False, 3))
    rows.append(("gender flipped (gender model)", figures["gender_flip"], True, 1))
    rows.append(("skin colour change, CIEDE2000", figures["skin_delta_e"], False, 2))
    rows.append(("border colour change, CIEDE2000", figures["border_delta_e"], False, 2))
    rows.append(("mean RGB shift, |ΔR, ΔG, ΔB| (0-255)", figures["rgb_shift"], False, 2))
    rows.append(("cycle reconstruction L1 (0-255)", figures["cycle_l1"], False, 2))
    if "hair_greyness" in figures:
        rows.append(
            (
                "synthetic faces' hair greyness (0.1 dark - 0.9 white)",
                figures["hair_greyness"],
                False,
                3,
            )
        )
    return rows


def headline(metrics) -> list[str]:
    """Short lines for the console: per direction, the figures a reader looks at first."""
    lines = []
    for direction in SETS:
        f = metrics[direction]["all"]
        source, target = SETS[direction]
        reads = [name for name in f if name.startswith("reads_")][-1]
        words = reads.replace("reads_at_least_", "reads ≥ ").replace("reads_under_", "reads < ")
        line = (
            f"{TITLES[direction]}: predicted age {_format(f['predicted_age']['floor'])} -> "
            f"{_format(f['predicted_age']['model'])} (real {target}: "
            f"{_format(f['predicted_age']['ceiling'])}); {words}: "
            f"{_format(f[reads]['model'], True, 0)} (real {target}: "
            f"{_format(f[reads]['ceiling'], True, 0)}); same person: "
            f"{_format(f['same_person']['model'], True, 0)}; skin ΔE "
            f"{_format(f['skin_delta_e']['model'], digits=1)}, border ΔE "
            f"{_format(f['border_delta_e']['model'], digits=1)}; N={f['faces']}, no face "
            f"in {f['no_face_in_input']} inputs / {f['no_face_in_output']} outputs"
        )
        if "hair_greyness" in f:
            g = f["hair_greyness"]
            line += (
                f"\n  synthetic faces' hair greyness: {_format(g['floor'], digits=2)} -> "
                f"{_format(g['model'], digits=2)} "
                f"(real {target}: {_format(g['ceiling'], digits=2)})"
            )
        lines.append(line)
        for space, label in (("embedding", "face-embedding Fréchet"), ("inception", "FID")):
            block = metrics[direction][space]
            block = block.get("fid", block) if space == "inception" else block
            if "missing" in block:
                lines.append(f"  {label}: not computed ({block['missing']})")
                continue
            lines.append(
                f"  {label}: {_format(block['model'], digits=2)} "
                f"(floor {_format(block['floor'], digits=2)}, "
                f"ceiling {_format(block['ceiling'], digits=2)}), N={block['model']['n']}"
                + (
                    " (under 2,048: biased upward; compare only at equal N)"
                    if space == "inception" and block["model"]["n"] < 2048
                    else ""
                )
            )
    return lines


def _markdown(metrics, config) -> str:
    out = [f"# Evaluation of step {metrics['step']}", ""]
    out.append(
        f"Dataset `{config.dataset}` at {config.image_size}x{config.image_size}; held-out faces "
        "(test split). Columns: **floor** = the inputs unchanged (a model that does nothing), "
        "**model** = the generator's outputs, **ceiling** = real faces of the target age "
        "(the train split's, as many as the held-out target faces; for the age rows, the "
        "held-out target faces). 95 % bootstrap intervals in brackets; N is the number of "
        "faces scored (a face in which dlib detects no face is not scored)."
    )
    if config.dataset == "synthetic":
        out += [
            "",
            "These are synthetic faces (the demo's): the floor and ceiling come from the "
            "synthetic faces too. The face models were trained on photos: on these drawings the "
            "age model reads young and old alike and dlib's embeddings put different drawn "
            "people within 0.6 of each other, so the synthetic faces' own age measure, the "
            "greyness of the hair, is given too. The figures show the method working, not a "
            "photo model's quality.",
        ]
    out += [
        "",
        f"- Age and gender models: {metrics['age_gender_model']}",
        f"- FID: {metrics['inception']}",
    ]
    found = ", ".join(f"{name} {k}/{n}" for name, (k, n) in metrics["faces_found"].items())
    stages = ", ".join(f"{name} {sec:.1f} s" for name, sec in metrics["seconds_by_stage"].items())
    out += [
        f"- Faces detected: {found}",
        f"- Evaluation time: {metrics['seconds']} s ({stages})",
        "",
    ]
    for direction in SETS:
        f = metrics[direction]
        source, target = SETS[direction]
        out += [f"## {TITLES[direction]} ({f['all']['faces']} held-out {source} faces)", ""]
        out += ["| measure | floor (do nothing) | model | ceiling (real " + target + ") | N |"]
        out += ["| --- | --- | --- | --- | --- |"]
        for label, row, percent, digits in _headline_rows(direction, f["all"], config):
            cells = [_format(row.get(c), percent, digits) for c in ("floor", "model", "ceiling")]
            if "impostor" in row:
                cells[2] = "impostors: " + _format(row["impostor"], percent, digits)
            out.append(f"| {label} | {' | '.join(cells)} | {_n(row)} |")
        of_ceiling = [
            r for n, r in f["all"].items() if n.startswith("reads_") and "model_of_ceiling" in r
        ]
        if of_ceiling:
            out += [
                "",
                f"The model's last 'reads' share is "
                f"{_format(of_ceiling[-1]['model_of_ceiling'], True, 0)} of the ceiling's.",
            ]
        out += [""]
        for space, label in (
            ("embedding", "Fréchet distance of dlib face embeddings (128-d)"),
            ("inception", "FID / KID (Inception pool features)"),
        ):
            block = f[space]
            if "missing" in block:
                out += [f"{label}: not computed: {block['missing']}.", ""]
                continue
            rows = (
                [("Fréchet", block)]
                if space == "embedding"
                else [("FID", block["fid"]), ("KID", block["kid"])]
            )
            out += [f"**{label}**, against the held-out {target} faces:", ""]
            out += ["| | floor | model | ceiling | N |", "| --- | --- | --- | --- | --- |"]
            for name, row in rows:
                digits = 4 if name == "KID" else 2
                cells = [_format(row[c], digits=digits) for c in ("floor", "model", "ceiling")]
                out.append(f"| {name} | {' | '.join(cells)} | {_n(row)} |")
            small = min(row["model"]["n"] for _, row in rows)
            if space == "inception" and small < 2048:
                out += [
                    "",
                    f"N = {small} is under 2,048: FID is biased upward at small N; compare "
                    "only figures of equal N.",
                ]
            out += [""]
        out += ["By UTKFace gender x race of the inputs:", ""]
        out += [
            "| group | N | no face | age shift | "
            + ("reads target")
            + " | same person | gender flip | skin ΔE | border ΔE |"
        ]
        out += ["| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, g in f["subgroups"].items():
            reads = [n for n in g if n.startswith("reads_")][-1]
            out.append(
                f"| {name} | {g['faces']} | {g['no_face_in_input']} | "
                f"{_format(g['age_shift_mean']['model'])} | "
                f"{_format(g[reads]['model'], True, 0)} | "
                f"{_format(g['same_person']['model'], True, 0)} | "
                f"{_format(g['gender_flip']['model'], True, 0)} | "
                f"{_format(g['skin_delta_e']['model'])} | "
                f"{_format(g['border_delta_e']['model'])} |"
            )
        out += ["", f"Per face: [faces_{direction}.csv](faces_{direction}.csv).", ""]
    out += [
        "## Plots",
        "",
        "![inputs, translated, reconstructed](grid.png)",
        "",
        "![predicted ages](ages.png)",
        "",
        "![identity](identity.png)",
        "",
    ]
    return "\n".join(out)


def _write_csv(path: epath.Path, table: dict) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = [c for c in table if c != "rgb_shift"] + ["rgb_shift_r", "rgb_shift_g", "rgb_shift_b"]
    writer.writerow(columns)
    for i in range(len(table["file_name"])):
        row = [table[c][i] for c in columns[:-3]] + list(table["rgb_shift"][i])
        writer.writerow([f"{v:.4g}" if isinstance(v, float | np.floating) else v for v in row])
    path.write_text(buffer.getvalue())


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _plots(directory, metrics, tables, analysis):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    bins = np.arange(0, 101, 4)
    for axis, direction in zip(axes, SETS, strict=True):
        source, target = SETS[direction]
        t = tables[direction]
        target_ages = analysis["test", target].ages
        for values, label in [
            (t["age_in"], f"inputs (real {source})"),
            (t["age_out"], "outputs"),
            (target_ages, f"real {target} (held out)"),
        ]:
            values = values[np.isfinite(values)]
            axis.hist(values, bins=bins, alpha=0.5, label=f"{label}, N={len(values)}")
        axis.set(title=f"{TITLES[direction]}: predicted age", xlabel="years", ylabel="faces")
        axis.legend(fontsize=8)
    (directory / "ages.png").write_bytes(_figure_png(figure))
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for axis, direction in zip(axes, SETS, strict=True):
        genuine = tables[direction]["identity_distance"]
        genuine = genuine[np.isfinite(genuine)]
        impostor = np.asarray(metrics[direction]["impostor_distances"])
        bins = np.linspace(0, 1.2, 41)
        for values, label in [(impostor, "different people"), (genuine, "input vs output")]:
            if len(values):  # The density of nothing is undefined.
                label = f"{label}, N={len(values)}"
                axis.hist(values, bins=bins, alpha=0.5, density=True, label=label)
        axis.axvline(
            faces.SAME_PERSON_DISTANCE, color="k", linestyle="--", label="dlib's 0.6 threshold"
        )
        axis.set(
            title=f"{TITLES[direction]}: identity", xlabel="embedding distance", ylabel="density"
        )
        axis.legend(fontsize=8)
    (directory / "identity.png").write_bytes(_figure_png(figure))
    plt.close(figure)


def write(
    directory,
    metrics,
    tables,
    held_out,
    generated,
    cycles,
    analysis,
    config,
):
    """Writes the report files into `directory`; returns the headline lines."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default))
    for direction, table in tables.items():
        _write_csv(directory / f"faces_{direction}.csv", table)
    count = min(GRID_FACES, len(held_out["young"]), len(held_out["old"]))
    rows = {
        "young": held_out["young"].images[:count],
        "young_to_old": generated["young_to_old"][:count],
        "young_cycle": cycles["young_to_old"][:count],
        "old": held_out["old"].images[:count],
        "old_to_young": generated["old_to_young"][:count],
        "old_cycle": cycles["old_to_young"][:count],
    }
    grid = samples.to_grid({k: v.astype(np.float32) / 127.5 - 1 for k, v in rows.items()})
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    (directory / "grid.png").write_bytes(buffer.getvalue())
    _plots(directory, metrics, tables, analysis)
    (directory / "report.md").write_text(_markdown(metrics, config))
    return headline(metrics)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value)}")
