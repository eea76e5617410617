"""Build the comparison from scored runs alone: means, intervals, the verdict, comparison.json.

    python evaluate.py                               # scores, then calls build() here
    python evaluate.py --compare-only --output-dir results/smollm2-135m   # build() alone
    python evaluate.py --output-dir outputs --publish results/<model>     # publish()

Reads <dir>/evaluation.json (which runs were compared and how they were
decoded), each compared run's per-question records and metrics.json, and
search/<method>.json; needs no model, tokenizer or data.  Writes
comparison.json, which report.py renders into every table, chart and page.

The per-question records are each run's predictions.jsonl, or, in a published
folder, one gzip file (PUBLISHED) holding the question table once and each
run's own columns beside it.  The forgetting figures come the same way from
each run's probe.json (its NLL on each document of the general-text probe,
forgetting.py), packed into the same file when published; a folder without
them is compared as before, forgetting shown as not measured.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

import common
import runpaths
import scoring
import settings
import verdict

COST_FIELDS = ("train_loss", "train_seconds", "train_tokens_per_s", "peak_memory_mb",
               "trainable_params", "trainable_percent", "size_on_disk_mb")
# Taken from the first seed's run: the same for every seed, or (peak memory) measured in a
# process that had loaded nothing before it but the discarded learning-rate search models.
SAME_FOR_EVERY_SEED = ("trainable_params", "trainable_percent", "size_on_disk_mb",
                       "peak_memory_mb")
PERPLEXITY_NOTE = ("answer perplexity: exp of the mean negative log-likelihood of the reference "
                   "answer's tokens given the prompt; the EOS token is not counted, for every "
                   "model alike")
# A published folder's per-question records of every run, in one file (see publish())
PUBLISHED = "predictions.json.gz"
NO_PROBE = ("this folder holds no general-text probe scores (evaluate.py scores "
            "probe/sotu.jsonl unless --no-probe; folders published before 2026-12-06 have none)")


def script_for(method: str) -> str:
    """The command that trains a method (settings.METHODS)."""
    return f"python {settings.command_for(method)}"


# --- Reading the scored runs ---------------------------------------------------


def read_evaluation(output_dir: Path) -> dict:
    """evaluation.json: which runs were compared, and how they were decoded."""
    path = runpaths.evaluation_file(output_dir)
    if not path.exists():
        raise common.PipelineError("no evaluation to compare: run `python evaluate.py` first",
                                   path)
    return common.read_json(path)


def compared_runs(output_dir: Path) -> tuple[dict, dict[str, list[list[dict]]]]:
    """evaluation.json and each compared model's per-question records, one list per seed."""
    output_dir = Path(output_dir)
    info = read_evaluation(output_dir)
    published = read_published(output_dir)
    runs: dict[str, list[list[dict]]] = {}
    for name, folders in info["runs"].items():
        for folder in folders:
            if published is not None and folder in published:
                runs.setdefault(name, []).append(published[folder])
                continue
            paths = runpaths.RunPaths(output_dir, name, folder)
            if not paths.predictions.exists():
                raise common.PipelineError(f"{runpaths.PREDICTIONS} is missing; re-run "
                                           "`python evaluate.py`", paths.run)
            runs.setdefault(name, []).append(common.read_jsonl(paths.predictions))
    return info, runs


def compared_probes(output_dir: Path, info: dict) -> dict[str, list[dict | None]]:
    """Each compared model's probe records (probe.json), one per seed; None where it has none.

    Only records made on the probe evaluation.json names count: an evaluation run with
    --no-probe (or before the probe existed) names none, and a record left from another
    probe, cut or scoring version is not read.
    """
    output_dir = Path(output_dir)
    wanted = info.get("probe")
    published = (read_published_probes(output_dir) or {}) if wanted else {}
    probes: dict[str, list[dict | None]] = {}
    for name, folders in info["runs"].items():
        for folder in folders:
            path = runpaths.RunPaths(output_dir, name, folder).probe
            record = published.get(folder) or (
                common.read_json(path) if wanted and path.exists() else None)
            probes.setdefault(name, []).append(
                record if record is not None and record.get("probe") == wanted else None)
    return probes


def compared_metrics(output_dir: Path, info: dict) -> dict[str, list[dict]]:
    """Each compared trained run's metrics.json, one list per method (seeds in order)."""
    return {name: [common.read_json(runpaths.RunPaths(output_dir, name, folder).metrics)
                   for folder in folders]
            for name, folders in info["runs"].items() if name != "base"}


def read_searches(output_dir: Path, methods) -> dict[str, dict]:
    """The learning-rate searches (search/<method>.json) of the given methods that ran one."""
    found = {}
    for name in methods:
        path = runpaths.search_file(output_dir, name)
        if path.exists():
            found[name] = common.read_json(path)
    return found


# --- The published form: one question table, each run's columns -----------------


def pack_records(runs: dict[str, list[dict]]) -> dict:
    """Runs' records (by folder) as one table: the fields every run shares, then each run's own.

    A field is shared at a question when every run holds the same value there (the
    question, reference, key, group...); absent fields stay absent, and "fields" keeps
    the records' field order, so unpack_records() gives back equal records.
    """
    folders = list(runs)
    n = len(runs[folders[0]])
    fields: list[str] = []
    for records in runs.values():
        for record in records:
            fields += [f for f in record if f not in fields]
    shared, own = [], {folder: [] for folder in folders}
    for i in range(n):
        rows = [runs[folder][i] for folder in folders]
        common_fields = {f: rows[0][f] for f in rows[0]
                         if all(f in r and r[f] == rows[0][f] and type(r[f]) is type(rows[0][f])
                                for r in rows)}
        shared.append(common_fields)
        for folder, row in zip(folders, rows):
            own[folder].append({f: v for f, v in row.items() if f not in common_fields})
    return {"fields": fields, "questions": shared, "runs": own}


def unpack_records(table: dict) -> dict[str, list[dict]]:
    """pack_records()'s table back as each run's records, fields in their original order."""
    order = {f: i for i, f in enumerate(table["fields"])}
    return {folder: [dict(sorted({**shared, **mine}.items(), key=lambda kv: order[kv[0]]))
                     for shared, mine in zip(table["questions"], rows)]
            for folder, rows in table["runs"].items()}


def pack_probes(probes: dict[str, dict]) -> dict:
    """Runs' probe records (by folder) as one table: the fields all share once, each run's own.

    The probe, its document ids and token counts are the same for every run, so each
    run adds little more than its NLL per document; unpack_probes() gives them back.
    """
    first = next(iter(probes.values()))
    shared = {k: v for k, v in first.items() if all(r.get(k) == v for r in probes.values())}
    return {"shared": shared, "runs": {folder: {k: v for k, v in record.items() if k not in shared}
                                       for folder, record in probes.items()}}


def unpack_probes(table: dict) -> dict[str, dict]:
    """pack_probes()'s table back as each run's probe record."""
    return {folder: {**table["shared"], **own} for folder, own in table["runs"].items()}


def _published_table(output_dir: Path) -> dict | None:
    """A published folder's PUBLISHED file, parsed; None when there is none.

    The records and the probe scores are both read from it, so the parsed table is kept
    for as long as the file is unchanged (same inode, size and modification time: the file
    is always replaced whole, so a rewrite comes with a new inode)."""
    path = Path(output_dir) / PUBLISHED
    if not path.exists():
        return None
    stat = path.stat()
    return _parse_published(str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _parse_published(path: str, inode: int, mtime_ns: int, size: int) -> dict:
    """The gzipped JSON table at path (the file's stamp is part of the cache key only)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def read_published(output_dir: Path) -> dict[str, list[dict]] | None:
    """Every run's records from a published folder's PUBLISHED file; None when there is none."""
    table = _published_table(output_dir)
    return None if table is None else unpack_records(table)


def read_published_probes(output_dir: Path) -> dict[str, dict] | None:
    """Every run's probe record from a published folder; None when it holds none."""
    table = _published_table(output_dir)
    return None if table is None or "probes" not in table else unpack_probes(table["probes"])


def write_published(path: Path, runs: dict[str, list[dict]],
                    probes: dict[str, dict] | None = None) -> None:
    """Write the packed records (and probe records, if any) gzipped, byte-reproducible (no
    name or time in the header); without probe records the file is what it was before them."""
    table = pack_records(runs)
    if probes:
        table["probes"] = pack_probes(probes)
    text = json.dumps(table, separators=(",", ":"), ensure_ascii=False)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="",
                                               mtime=0, compresslevel=9) as handle:
        handle.write(text.encode("utf-8"))
    os.replace(tmp, path)


def mean_summary(runs: list[list[dict]]) -> dict:
    """summarise() of each seed's records, averaged over seeds."""
    summaries = [scoring.summarise(records) for records in runs]
    out = {"n": summaries[0]["n"], "keyed": summaries[0]["keyed"]}
    for key in ("exact_match", "token_f1", "key_accuracy"):
        values = [s[key] for s in summaries]
        out[key] = None if values[0] is None else sum(values) / len(values)
    return out


def breakdown(runs: list[list[dict]], field: str) -> dict:
    """mean_summary() per value of a field (category, eval_kind), when the data has it."""
    values = sorted({r[field] for r in runs[0] if field in r})
    return {value: mean_summary([[r for r in records if r.get(field) == value]
                                 for records in runs]) for value in values}


def comparison_row(name: str, runs: list[list[dict]], metrics: list[dict] | None) -> dict:
    """One row of the comparison table: means over seeds (intervals are added later)."""
    ppl = [scoring.run_perplexity(records) for records in runs]
    row = {"method": name, "seeds": len(runs), "answer_perplexity": sum(ppl) / len(ppl),
           **mean_summary(runs), "note": ""}
    if metrics is None:
        row["note"] = "untuned base model"
        row["lr"] = None
        return row
    row["lr"] = metrics[0]["args"]["lr"]
    row["lr_source"] = ("search on the validation split" if metrics[0].get("lr_search")
                        else "fixed (--lr or the script's default)")
    row["seed_values"] = [m["args"]["seed"] for m in metrics]
    for field in COST_FIELDS:
        values = [m.get(field) for m in metrics if m.get(field) is not None]
        if field in SAME_FOR_EVERY_SEED:
            row[field] = values[0] if values else None
        else:
            row[field] = sum(values) / len(values) if values else None
    # the spread over seeds: verdict.py states a cost difference only when ranges do not meet
    for field in ("train_seconds", "peak_memory_mb"):
        values = [m[field] for m in metrics if m.get(field) is not None]
        row[f"{field}_range"] = [min(values), max(values)] if values else None
    details = metrics[0]["details"]
    if details.get("base_quantization") == "nf4":
        row["note"] = "evaluated on its 4-bit NF4 base, as trained"
    if details.get("added_biases"):
        row["note"] = f"{details['added_biases']} zero-initialised biases added"
    return row


def add_intervals(table: list[dict], all_runs: dict[str, list[list[dict]]]) -> None:
    """Add <metric>_interval to each row: clustered t intervals at verdict.INTERVAL_LEVEL with a
    seed component, one model at a time (no multiplicity adjustment; verdict.py)."""
    fields = {"exact_match": "exact_match", "token_f1": "token_f1"}
    if scoring.quality_key(table)[0] == "key_accuracy":
        fields["key_accuracy"] = "key_match"
    tokens = np.array([r["answer_tokens"] for r in next(iter(all_runs.values()))[0]], dtype=float)
    nll = {name: np.array([[r["answer_nll"] for r in records] for records in runs])
           for name, runs in all_runs.items()}
    intervals = verdict.method_intervals(all_runs, nll, tokens, list(fields.values()))
    for row in table:
        found = intervals[row["method"]]
        for field, record_field in fields.items():
            row[f"{field}_interval"] = found[record_field]
        row["answer_perplexity_interval"] = found["answer_perplexity"]
        row["seed_sd"] = found["seed_sd"]


def forgetting(probes: dict[str, list[dict | None]], best: dict,
               estimates: verdict.Estimates) -> dict:
    """What each method forgot: its NLL change on the probe against the base, and the flags.

    A method is measured when every seed's probe record matches the base's (the same
    probe, documents and tokens); the intervals and pairs are verdict.py's, the
    document being the cluster.  Each measured method also carries what it learned
    (its headline gain over the base, verdict.gain_intervals) for the chart.
    """
    reference = (probes.get("base") or [None])[0]
    if reference is None:
        return {"measured": False, "note": NO_PROBE, "rule": verdict.FORGETTING_RULE}
    same = ("probe", "ids", "tokens")
    nll, missing = {"base": np.array([reference["nll"]], dtype=float)}, []
    for name, records in probes.items():
        if name == "base":
            continue
        if all(r is not None and all(r.get(k) == reference[k] for k in same) for r in records):
            nll[name] = np.array([r["nll"] for r in records], dtype=float)
        else:
            missing.append(name)
    if len(nll) == 1:
        return {"measured": False, "note": "no fine-tuned run has probe scores matching the "
                "base's; run evaluate.py again", "rule": verdict.FORGETTING_RULE}
    tokens = np.array(reference["tokens"], dtype=float)
    methods = verdict.forgetting_intervals(nll, tokens)
    gains = verdict.gain_intervals(estimates)
    for name, entry in methods.items():
        entry["seeds"] = int(nll[name].shape[0])
        entry["learned"] = gains.get(name)
    pairs = verdict.forgetting_pairs(nll, tokens, best)
    return {"measured": True, "probe": reference["probe"],
            "base_nats_per_token": float(sum(reference["nll"]) / tokens.sum()),
            "unit": "document (each document of the probe is one cluster)",
            "interval_level": verdict.INTERVAL_LEVEL, "methods": methods,
            "not_measured": missing, "pairs": pairs,
            "flags": verdict.forgetting_flags(pairs, best), "rule": verdict.FORGETTING_RULE,
            "pair_bounds": "two-sided t bounds at the verdict's pair level (Bonferroni over "
                           "the pairs of methods, at alpha_best)"}


def add_forgetting(table: list[dict], found: dict) -> None:
    """Add each row's forgetting (nats per token) and probe perplexity ratio, with intervals;
    None for the base and for any method not measured."""
    methods = found.get("methods") or {}
    for row in table:
        entry = methods.get(row["method"])
        row["forgetting"] = None if entry is None else entry["change"]
        row["forgetting_interval"] = None if entry is None else entry["interval"]
        row["probe_ppl_ratio"] = None if entry is None else entry["ratio"]
        row["probe_ppl_ratio_interval"] = None if entry is None else entry["ratio_interval"]


# --- The comparison, from files alone -------------------------------------------


def build(output_dir: Path, alpha: float = verdict.ALPHA, margin: float = verdict.MARGIN) -> dict:
    """Measure the comparison from the saved per-run files alone and write comparison.json.

    Reads <output-dir>/evaluation.json, each compared run's records and metrics.json,
    and search/<method>.json; needs no model, tokenizer or data.  report.render() turns
    comparison.json into every table, chart and page.
    """
    output_dir = Path(output_dir)
    info, all_runs = compared_runs(output_dir)
    trained = compared_metrics(output_dir, info)

    # Means and intervals; the comparisons with the best, the gate, and what follows from them
    table = [comparison_row(name, runs, trained.get(name)) for name, runs in all_runs.items()]
    add_intervals(table, all_runs)
    key, record_key, label = scoring.quality_key(table)
    estimates = verdict.estimate(all_runs, record_key)
    pairs = verdict.pairwise(estimates)
    for pair in pairs:
        pair["metric"] = key
    best = verdict.compare_with_best(estimates, alpha=alpha, margin=margin)
    best["metric"] = key
    plan = verdict.settle_plan(estimates, best, verdict.cost_order(table))
    searches = read_searches(output_dir, trained)
    sensitivity = verdict.rate_sensitivity(searches)
    forgot = forgetting(compared_probes(output_dir, info), best, estimates)
    add_forgetting(table, forgot)
    decision = verdict.recommend(table, best, plan, label, verdict.rate_text(sensitivity),
                                 verdict.forgetting_lines(forgot, label, alpha))
    if plan is not None:
        plan["commands"] = plan_commands(output_dir, info, trained, plan)
    breakdowns = {name: {"eval_kind": breakdown(runs, "eval_kind"),
                         "category": breakdown(runs, "category")}
                  for name, runs in all_runs.items()}
    procedure = verdict.procedure(
        best, max(p["n_questions"] for p in pairs), max(p["n_groups"] for p in pairs),
        {name: len(runs) for name, runs in all_runs.items()}, key)
    comparison = {
        "model": info["model"], "base_model_path": info["base_model_path"],
        "questions": info["questions"], "max_new_tokens": info["max_new_tokens"],
        "stop": info["stop"], "precision": info.get("precision", "fp32"),
        "headline_metric": key, "headline_label": label, "alpha": alpha, "margin": margin,
        "perplexity": PERPLEXITY_NOTE,
        "intervals": "95% t intervals, cluster-robust over fact groups plus seed variance; "
                     "see verdict.py", "interval_level": verdict.INTERVAL_LEVEL,
        "procedure": procedure, "rows": table, "best": best, "pairwise": pairs, "plan": plan,
        "rate_sensitivity": sensitivity, "forgetting": forgot,
        "breakdowns": breakdowns,
        "lr_search": {name: {k: s.get(k) for k in ("grid", "chosen_lr", "metric", "budget")}
                      for name, s in searches.items()},
        "outcome": decision["outcome"], "recommended": decision["method"],
        "recommendation": decision["text"], "recommendation_lines": decision["lines"]}
    common.write_json(runpaths.comparison_file(output_dir), comparison)
    return comparison


def plan_commands(output_dir: Path, info: dict, trained: dict[str, list[dict]],
                  plan: dict | None) -> dict[str, dict[str, str]]:
    """The commands that run each option of the plan, per method: {"seeds": ..., "questions": ...}.

    Seeds: each method's script at the rate and settings its runs used, with --seeds K
    --resume, so the finished seeds are kept and only the new ones train; then evaluate.py,
    which re-scores only the new runs.  They run where the trained runs are: a published
    folder (scores only, no weights) names the folder its runs were trained in.
    Questions: the data stage with more facts (SIZE scales the rows, and so the facts and
    fact groups), then the whole comparison again.
    """
    commands: dict[str, dict[str, str]] = {}
    for option in (plan or {}).get("considered", []):
        target, found = option["method"], {}
        if option.get("seeds"):
            # where the runs were trained: here, or (a published folder holds no weights) the
            # folder their metrics.json records
            first = info["runs"][target][0]
            where = (output_dir if runpaths.is_complete(output_dir / first)
                     else Path(trained[target][0]["args"]["output_dir"]))
            steps = []
            for name in [target] + option["with"]:
                args = trained[name][0]["args"]
                steps.append(f"{script_for(name)} --model {info['model']} --lr {args['lr']:g} "
                             f"--epochs {args['epochs']:g} --precision {args['precision']} "
                             f"--data-dir {args['data_dir']} --output-dir {where} "
                             f"--seeds {option['seeds']['seeds']} --resume")
            found["seeds"] = " && ".join(steps + [
                f"python evaluate.py --data-dir {trained[target][0]['args']['data_dir']} "
                f"--output-dir {where}"])
        if option.get("questions"):
            first = trained[target][0]
            rows = (first.get("train_examples", 0) + first.get("valid_examples", 0)
                    + info["questions"])
            found["questions"] = (f"make all MODEL={info['model']} "
                                  f"SIZE={math.ceil(rows * option['questions']['factor'])} "
                                  f"SEEDS={option['questions']['seeds']} TUNE=1 "
                                  "DATA=data/larger OUT=outputs/larger")
        if found:
            commands[target] = found
    return commands


def publish(output_dir: Path, target: Path) -> None:
    """Copy what build() reads (no weights) to target, e.g. results/<model>/.

    That is evaluation.json, every compared run's records (and probe records) packed
    into one PUBLISHED file, each trained run's metrics.json and the compared methods' searches.
    """
    output_dir, target = Path(output_dir), Path(target)
    info, runs = compared_runs(output_dir)
    probes = compared_probes(output_dir, info)
    with common.staged_dir(target) as tmp:
        shutil.copy2(runpaths.evaluation_file(output_dir), runpaths.evaluation_file(tmp))
        write_published(tmp / PUBLISHED, {folder: records for name, folders in info["runs"].items()
                                          for folder, records in zip(folders, runs[name])},
                        {folder: record for name, folders in info["runs"].items()
                         for folder, record in zip(folders, probes[name]) if record is not None})
        for name, folders in info["runs"].items():
            if name == "base":
                continue
            for folder in folders:
                source, copy = (runpaths.RunPaths(root, name, folder) for root in (output_dir, tmp))
                copy.run.mkdir()
                shutil.copy2(source.metrics, copy.metrics)
            search = runpaths.search_file(output_dir, name)
            if search.exists():
                runpaths.search_file(tmp, name).parent.mkdir(exist_ok=True)
                shutil.copy2(search, runpaths.search_file(tmp, name))
    print(f"published the per-question scores and run records of {output_dir}/ to {target}/; "
          f"`python evaluate.py --compare-only --output-dir {target}` rebuilds the verdict")
