"""Evaluate the untuned base model and every fine-tuned method on held-out questions.

    python evaluate.py                        # score what changed; compare every finished method
    python evaluate.py --methods lora         # re-score only LoRA (if it changed)
    python evaluate.py --force                # re-score everything
    python evaluate.py --limit 50             # a quick look at 50 questions

The everyday loop: edit finetune_lora.py, run it, run evaluate.py.  Each
run's predictions are kept with a fingerprint of what produced them (its
weights and metrics, the eval rows, the template, the decoding settings and
the scoring code's version); only runs whose fingerprint changed are scored
again, and the comparison is rebuilt from every finished method plus base.

Every model gets the same data (data/eval.jsonl), the same greedy decoding
(batched, stopping at EOS or at a new user turn, new tokens bounded by the
longest reference) and the same metrics:
  answer perplexity  exp of the mean loss over the answer's own tokens; the EOS
                     token is not scored (the untuned base was never taught it);
  exact match        prediction == reference after normalisation;
  key accuracy       the key (the short answer) appears as whole words in the
                     prediction, not merely inside an echo of the question;
  token F1           overlap of normalised answer tokens (SQuAD's F1).
QLoRA is evaluated as it was trained: its adapter on the 4-bit NF4 base.

A method trained with several seeds (outputs/<method>/ plus
outputs/<method>-seed<N>/, made by --seeds) is reported as the mean over its
seeds, with 95% intervals over questions and seeds; every pair of methods, and
each method against the base, is compared with a paired test (see verdict.py).

Forgetting: every model is also scored on the general-text probe
(probe/sotu.jsonl, forgetting.py): its NLL per document of real English prose,
against the base's on the same tokens, in the same precision, on the same
(merged or 4-bit) model as the questions.  Each run keeps these in
outputs/<run>/probe.json with their own fingerprint (the model files, the
probe's checksum and cut, the precision), so they too are scored once.

Writes outputs/<run>/predictions.jsonl and probe.json (outputs/base/ for the untuned model),
outputs/evaluation.json (what was compared); compare.py builds
outputs/comparison.json (the means, intervals, paired tests and the
recommendation computed from them), it prints the recommendation, then
report.py renders comparison.{md,csv,png},
quality_vs_cost.png, lr_search.png (when --tune-lr ran) and report.html from
those files (`python report.py outputs/` redraws them alone).
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch

import answer_loss
import common
import compare
import forgetting
import generation
import models
import report
import runpaths
import scoring
import settings
import verdict
from report import fmt

METHODS = tuple(settings.METHODS)  # the order of every table and plot
# Bump when scoring, decoding or metric code changes what a run's predictions hold: every
# saved prediction file then counts as stale and is scored again.
SCORING_VERSION = "2026-12-04.1"


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs", help="where the methods' folders are")
    parser.add_argument("--data-dir", default="data", help="folder with eval.jsonl, template.json")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to re-score when they changed (default: "
                             f"any of {', '.join(METHODS)}); the comparison always covers every "
                             "finished method whose predictions are up to date, plus base")
    parser.add_argument("--force", action="store_true",
                        help="re-score every run, even those whose predictions are up to date")
    parser.add_argument("--limit", type=settings.positive_int, default=None,
                        help="evaluate only the first N eval questions (a quick look)")
    parser.add_argument("--batch-size", type=settings.positive_int, default=None,
                        help="questions per batch (default: generation.BATCH_BY_DEVICE, 64 on "
                             "the CPU and 256 on CUDA); answers do not depend on it")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when present, else CPU")
    parser.add_argument("--precision", default=settings.DEFAULT_PRECISION,
                        choices=list(settings.PRECISIONS),
                        help="auto: bf16 autocast where the hardware computes bf16 natively "
                             "(CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32; fp32 "
                             "gives exactly the answers of an fp32 evaluation, bf16 insists "
                             "(answers may differ where two tokens nearly tie); default "
                             f"{settings.DEFAULT_PRECISION}")
    parser.add_argument("--alpha", type=float, default=verdict.ALPHA,
                        help="every statement of the verdict holds together with probability "
                             f"1 - alpha (default {verdict.ALPHA:g})")
    parser.add_argument("--margin", type=float, default=verdict.MARGIN,
                        help="points of the headline score you would give up for a cheaper "
                             "method, declared before looking: a method is recommended only "
                             "when it is shown at most this far below the best (default "
                             f"{verdict.MARGIN:g}; README, 'The verdict')")
    parser.add_argument("--probe", default=str(forgetting.PROBE),
                        help="the general-text probe that measures forgetting: one JSON object "
                             "a line with id and text (default: the shipped probe/sotu.jsonl; "
                             "probe/README.md)")
    parser.add_argument("--no-probe", action="store_true",
                        help="do not measure forgetting (the comparison shows it as not "
                             "measured)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the Hub to run (off by default)")
    parser.add_argument("--compare-only", action="store_true",
                        help="score nothing: rebuild the verdict, tables, charts and report from "
                             "the per-question predictions already in --output-dir (e.g. "
                             "results/smollm2-135m, which holds no model); needs no model or data")
    parser.add_argument("--publish", metavar="DIR", default=None,
                        help="copy what --compare-only reads (evaluation.json, every compared "
                             "run's records packed in one file, metrics.json, search/) from "
                             "--output-dir to DIR, without the weights, and stop")
    return parser.parse_args(argv)


# --- Finding and loading what was trained ------------------------------------


def seed_folders(output_dir: Path, method: str, primary: dict) -> list[Path]:
    """A method's extra seed runs: outputs/<method>-seed<N>/ with the primary run's settings."""
    folders = []
    for folder in runpaths.seed_folders(output_dir, method):
        if not runpaths.is_complete(folder):
            print(f"warning: skipping {folder}: no COMPLETED marker (its run did not finish)")
            continue
        metrics = common.read_json(runpaths.RunPaths(output_dir, method, folder.name).metrics)
        if metrics.get("run_id") != primary.get("run_id"):
            print(f"warning: skipping {folder}: trained with other settings than "
                  f"{output_dir / method} (re-run {compare.script_for(method)} --seeds N)")
            continue
        folders.append(folder)
    return folders


def requested_methods(requested: str | None) -> list[str]:
    """--methods as a list of known method names (all of them when not given)."""
    if not requested:
        return list(METHODS)
    names = [m.strip() for m in requested.split(",") if m.strip()]
    for name in names:
        if name not in METHODS:
            raise common.PipelineError(f"--methods: unknown method {name!r}; expected some of "
                                       f"{', '.join(METHODS)}")
    return names


def find_methods(output_dir: Path, requested: str | None) -> dict[str, list[tuple[Path, dict]]]:
    """The finished methods' runs (folder, metrics), one per seed, by name, in METHODS order.

    Every finished method is found; one named in requested must be finished.
    """
    wanted = requested_methods(requested) if requested else []
    names = [m for m in METHODS if (output_dir / m).exists() or m in wanted]
    found = {}
    for name in names:
        folder = output_dir / name
        holder = runpaths.live_holder(runpaths.lock_file(output_dir, name))
        if holder is not None:  # its runs are being written: read none of them half-way
            print(f"warning: skipping {name}: a run is writing it now "
                  f"({runpaths.describe(holder)}); evaluate again when it has finished")
            continue
        if not runpaths.is_complete(folder):
            message = (f"{folder} has no COMPLETED marker: its run did not finish; re-run "
                       f"{compare.script_for(name)} (add --resume to continue from its checkpoint)")
            if name in wanted:
                raise common.PipelineError(message)
            print(f"warning: skipping {message}")
            continue
        primary = common.read_json(runpaths.RunPaths(output_dir, name).metrics)
        found[name] = [(folder, primary)] + [
            (extra, common.read_json(runpaths.RunPaths(output_dir, name, extra.name).metrics))
            for extra in seed_folders(output_dir, name, primary)]
    if not found:
        raise common.PipelineError(
            f"no finished fine-tuning runs in {output_dir}/; train one first, e.g. "
            "`python finetune_lora.py` (or finetune.py, finetune_qlora.py, finetune_bitfit.py)")
    return found


def load_for_eval(name: str, folder: Path, base_path: str, metrics: dict | None, device,
                  trust_remote_code: bool, precision: str = "fp32"):
    """A model ready to answer: the base, a full model folder, or an adapter on its base.

    An adapter on an unquantised base (LoRA and its variants, DoRA, LoKr, IA3) is merged
    into it (W + B·A once), so each forward runs one matmul a layer instead of two.
    Prompt tuning keeps PEFT's wrapper, whose prompt answer_loss and generation put
    first.  QLoRA keeps its adapter on the 4-bit base, as it was trained, whose 4-bit
    layers dequantise to the precision's dtype.
    At bf16 the matmul weights are then stored in bf16 (models.store_frozen_in_bf16).
    """
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "use_safetensors": True,
              "trust_remote_code": trust_remote_code}
    if name == "base":
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs).to(device)
    elif not (folder / "adapter_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
    elif metrics["details"].get("base_quantization") == "nf4":
        kwargs.update(models.nf4_load_kwargs(device, precision))
        model = AutoPeftModelForCausalLM.from_pretrained(folder, **kwargs)
    else:  # merged in fp32, cast below: W + B·A rounded once, as autocast would round it
        model = AutoPeftModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
        if not models.virtual_tokens(model):  # a learned prompt has no weights to merge into
            model = model.merge_and_unload()
    # Nothing trains here: at bf16 every matmul weight is stored as the bf16 copy autocast uses
    models.store_frozen_in_bf16(model.requires_grad_(False), precision)
    return model


# --- Fingerprints: score again only what changed ------------------------------

PREDICTIONS = runpaths.PREDICTIONS
FINGERPRINT = runpaths.FINGERPRINT
MODEL_FILES = ("*.safetensors", "config.json", "adapter_config.json", runpaths.METRICS)


def folder_digest(folder: Path) -> str:
    """Checksum of a model folder's weights, configuration and metrics (what produced a run)."""
    digest = hashlib.sha256()
    files = sorted({path for pattern in MODEL_FILES for path in Path(folder).glob(pattern)})
    for path in files:
        digest.update(path.name.encode() + b"\0" + common.file_sha256(path).encode())
    return digest.hexdigest()


def fingerprint(model_digest: str, rows: list[dict], template: dict, decoding: dict) -> str:
    """What a run's predictions depend on: model files (folder_digest), eval rows, template,
    decoding, scorer."""
    blob = json.dumps({"model": model_digest, "rows": rows, "template": template,
                       "decoding": decoding, "scoring": SCORING_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_records(folder: Path, expected: str) -> list[dict] | None:
    """A run's saved predictions, if they were made with this fingerprint; else None."""
    marker, predictions = folder / FINGERPRINT, folder / PREDICTIONS
    if not (marker.exists() and predictions.exists()):
        return None
    if common.read_json(marker).get("fingerprint") != expected:
        return None
    return common.read_jsonl(predictions)


def save_records(folder: Path, records: list[dict], value: str) -> None:
    """Write a run's predictions, then (last) the fingerprint that vouches for them."""
    (folder / FINGERPRINT).unlink(missing_ok=True)
    try:
        # Atomic: on a failed write the previous predictions.jsonl stays whole (and, with
        # no fingerprint, is scored again next time).
        common.write_jsonl(folder / PREDICTIONS, records)
        common.write_json(folder / FINGERPRINT, {"fingerprint": value,
                                                 "scoring_version": SCORING_VERSION})
    except OSError as exc:
        raise common.write_failed(folder / PREDICTIONS, exc) from None


def save_probe(folder: Path, record: dict) -> None:
    """Write a run's probe record (its fingerprint inside), atomically."""
    try:
        common.write_json(folder / runpaths.PROBE, record)
    except OSError as exc:
        raise common.write_failed(folder / runpaths.PROBE, exc) from None


# --- Scoring -----------------------------------------------------------------


class Probe:
    """The general-text probe as evaluate.py scores it: documents, tokens, what fingerprints it."""

    def __init__(self, documents: list[dict], examples: list[dict], info: dict, precision: str):
        self.documents, self.examples = documents, examples
        self.info, self.precision = info, precision

    @classmethod
    def load(cls, path: str, tokenizer, base_path: str, precision: str,
             trust_remote_code: bool = False) -> "Probe":
        """Read and tokenise the probe once, cut to the base's context (the same for all)."""
        documents = forgetting.load_probe(path)
        cut = forgetting.max_tokens(forgetting.base_context(base_path, trust_remote_code))
        examples = forgetting.probe_examples(tokenizer, documents, cut)
        info = forgetting.probe_info(path, documents, examples, cut)
        print(f"probe: {info['documents']} documents, {info['tokens']:,} tokens scored (at most "
              f"{cut} a document) from {path}")
        return cls(documents, examples, info, precision)

    def fingerprint(self, model_digest: str) -> str:
        """What a model's probe scores depend on (forgetting.fingerprint)."""
        return forgetting.fingerprint(model_digest, self.info, self.precision)

    def score(self, model, name: str, value: str, pad_id: int, device) -> dict:
        """A model's probe record: its NLL on each document."""
        nll = forgetting.score_probe(model, self.examples, pad_id, device, self.precision,
                                     desc=f"{name}: probe")
        return forgetting.probe_record(self.documents, nll, self.info, value)


def evaluate_model(name, model, tokenizer, rows, examples, max_new, stop, args,
                   device, precision: str = "fp32") -> list[dict]:
    """One model's per-question records: generated answer, verdicts, answer NLL and token count.

    precision: "fp32", or "bf16" for bf16 autocast (models.resolve_precision of --precision).
    """
    batch_size = args.batch_size or generation.generation_batch_size(device)
    nll = answer_loss.answer_nll_by_example(model, examples, tokenizer.pad_token_id, device,
                                            batch_size=batch_size, desc=f"{name}: perplexity",
                                            precision=precision)
    predictions = generation.generate_answers(model, tokenizer, [r["prompt"] for r in rows],
                                              max_new, device, stop=stop, batch_size=batch_size,
                                              desc=f"{name}: answers", precision=precision)
    records = scoring.score_rows(rows, predictions)
    for record, (total, count) in zip(records, nll):
        record["answer_nll"], record["answer_tokens"] = round(total, 6), count
    return records


def main(args):
    """Evaluate base + methods, then write predictions, tables, plots and the recommendation."""
    if args.publish:
        compare.publish(Path(args.output_dir), Path(args.publish))
        return
    if args.compare_only:
        compare_and_render(Path(args.output_dir), args.alpha, args.margin)
        return
    # Read the eval set and find the finished runs (fails fast, before any model loads)
    output_dir = Path(args.output_dir)
    template = common.load_template(args.data_dir)
    stop = common.turn_marker(template)
    rows = common.load_split(args.data_dir, "eval")[:args.limit]
    methods = find_methods(output_dir, args.methods)
    bases = {m["base_model_path"] for runs in methods.values() for _, m in runs}
    if len(bases) > 1:
        raise common.PipelineError(f"the runs in {output_dir}/ were trained from different base "
                                   f"models ({', '.join(sorted(bases))}); re-train or pick "
                                   "--methods with one base")
    base_path = bases.pop()
    device = models.pick_device(args.device)
    precision = models.resolve_precision(device, args.precision)
    tokenizer = models.load_tokenizer(base_path, args.trust_remote_code)
    seeds = {name: len(runs) for name, runs in methods.items()}
    listing = ", ".join(f"{m} ({n} seed{'s' * (n > 1)})" for m, n in seeds.items())
    print(f"evaluating base + {listing} at {precision} on {len(rows)} questions from "
          f"{Path(args.data_dir) / 'eval.jsonl'} (base model {base_path})")

    # Tokenise once: the same examples and the same decoding bound for every model
    examples = common.tokenize_rows(tokenizer, rows, 10**9, source="eval.jsonl", label_eos=False)
    max_new = generation.max_new_tokens_for(tokenizer, [r["completion"] for r in rows])

    # The general-text probe: the same documents, cut the same way, for every model
    probe = None if args.no_probe else Probe.load(args.probe, tokenizer, base_path, precision,
                                                   args.trust_remote_code)

    # Score each run whose predictions are missing or stale; reuse the others
    decoding = {"max_new_tokens": max_new, "stop": stop, "greedy": True,
                "eos_token_id": tokenizer.eos_token_id,
                # left out at fp32, so fp32 fingerprints equal those written without the key
                **({"precision": precision} if precision != "fp32" else {})}
    rescore = set(requested_methods(args.methods)) | {"base"}
    compared: dict[str, list[tuple[Path, dict]]] = {}  # per model: its up-to-date runs
    for name, runs in {"base": [(output_dir / "base", None)], **methods}.items():
        for folder, metrics in runs:
            # the model's files hashed once, for its predictions and its probe scores alike
            digest = folder_digest(Path(base_path) if name == "base" else folder)
            value = fingerprint(digest, rows, template, decoding)
            records = None if args.force else cached_records(folder, value)
            probe_value = None if probe is None else probe.fingerprint(digest)
            probed = (probe is None or not args.force
                      and forgetting.cached_record(folder / runpaths.PROBE, probe_value))
            if records is not None and probed:
                print(f"{folder.name:>14}: unchanged since it was last scored; predictions reused")
                compared.setdefault(name, []).append((folder, metrics))
                continue
            if name not in rescore:
                if records is None:
                    print(f"warning: {folder} changed since it was last scored and is not in "
                          f"--methods; left out of the comparison (run evaluate.py --methods "
                          f"{name})")
                    continue
                # its model is unchanged (its predictions are current), so a probe.json here
                # was made on another probe or cut, which compare.py does not read
                print(f"warning: {folder}'s probe scores are missing or stale and it is not in "
                      f"--methods: its forgetting is not measured (run evaluate.py --methods "
                      f"{name})")
                compared.setdefault(name, []).append((folder, metrics))
                continue
            model = load_for_eval(name, folder, base_path, metrics, device,
                                  args.trust_remote_code, precision)
            folder.mkdir(parents=True, exist_ok=True)
            if records is None:
                records = evaluate_model(folder.name, model, tokenizer, rows, examples, max_new,
                                         stop, args, device, precision)
                save_records(folder, records, value)
                summary = scoring.summarise(records)
                print(f"{folder.name:>14}: answer PPL {scoring.run_perplexity(records):8.2f}  exact "
                      f"{summary['exact_match']:5.1f}%  key {fmt(summary['key_accuracy'])}%  "
                      f"F1 {summary['token_f1']:5.1f}%")
            else:
                print(f"{folder.name:>14}: predictions reused; scoring the probe")
            if not probed:
                record = probe.score(model, folder.name, probe_value, tokenizer.pad_token_id,
                                     device)
                save_probe(folder, record)
                print(f"{folder.name:>14}: probe NLL {forgetting.nats_per_token(record):.4f} "
                      f"nats/token on {len(record['ids'])} documents")
            del model
            compared.setdefault(name, []).append((folder, metrics))
    trained = [runs for name, runs in compared.items() if name != "base"]
    if not trained:
        raise common.PipelineError("no fine-tuned method has up-to-date predictions to compare; "
                                   "run evaluate.py without --methods")
    # What the comparison needs besides the per-run files, so it can be rebuilt from them alone
    common.write_json(runpaths.evaluation_file(output_dir), {
        "model": trained[0][0][1]["model"], "base_model_path": base_path,
        "questions": len(rows), "max_new_tokens": max_new, "stop": stop, "precision": precision,
        "probe": None if probe is None else probe.info,
        "runs": {name: [folder.name for folder, _ in runs] for name, runs in compared.items()}})
    compare_and_render(output_dir, args.alpha, args.margin)


def compare_and_render(output_dir: Path, alpha: float, margin: float) -> dict:
    """Build comparison.json from the scored runs (compare.py), render it (report.py), say so."""
    comparison = compare.build(output_dir, alpha, margin)
    written = report.render(output_dir)
    print(f"\n{comparison['recommendation']}\n\nwrote {runpaths.comparison_file(output_dir)}, "
          + ", ".join(str(path) for path in written))
    return comparison


if __name__ == "__main__":
    common.run_main(main, parse_args())
