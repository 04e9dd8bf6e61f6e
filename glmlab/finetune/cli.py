"""``glmlab finetune classify|sft|dpo|report`` and ``glmlab predict``: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys

from glmlab.errors import GlmlabError

EXIT_INTERRUPTED = 130


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides as for glmlab train, e.g. train.max_steps=200 train.lr=3e-4")
    p.add_argument("--init", metavar="RUN_DIR", help="the pre-trained run to start from, or 'none' for fresh weights")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write (or to resume)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config file (sections model: and train:)")
    p.add_argument("--test", metavar="F", help="test file, measured once with the best weights")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--lora-rank", type=int, default=8, help="--mode lora: rank r of the updates (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="--mode lora: scale alpha (update = alpha/r BA; "
                   "default 16)")
    p.add_argument("--arch", metavar="RUN_DIR", help="with --init none: take the architecture and tokenizer of "
                   "this run (not its weights), so from-scratch and fine-tuned runs compare")
    p.add_argument("--tokenizer", default="word", choices=("char", "word", "bpe", "unigram"),
                   help="with --init none and no --arch: tokenizer trained on the training texts (default word)")
    p.add_argument("--vocab-size", type=int, default=None, help="with --tokenizer: vocabulary cap")


def _pairs_data(p: argparse.ArgumentParser, kind: str) -> None:
    """sft's and dpo's data and mode: JSONL examples, validation held out by default, no probe."""
    p.add_argument("--data", metavar=kind, help="training examples")
    p.add_argument("--val", metavar="F", help="validation examples (default: 10%% of --data held out)")
    p.add_argument("--mode", default="full", choices=("full", "lora"), help="what trains (default full)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a trained run: classify (a head on its features), sft "
                       "(prompt -> completion, or chat) or dpo (preferences); report compares fine-tunes",
                       description="Fine-tune a pre-trained run on a downstream task with the same trainer, config "
                                   "keys, progress and run directory as glmlab train; results.json holds the best "
                                   "checkpoint's figures on val (and --test).")
    tasks = p.add_subparsers(dest="finetune_command", required=True, metavar="{classify,sft,dpo,report}")
    c = tasks.add_parser("classify", help="sequence classification: pooled features + a linear head",
                         description="Texts and labels from TSV / CSV / JSONL files (columns --text-column, "
                                     "--label-column); labels may be strings or integers, and the label set is "
                                     "saved with the run. Modes: full (every weight), probe (frozen model, linear "
                                     "head), lora (low-rank updates of the attention and MLP projections + head). "
                                     "Early stopping and the best checkpoint follow the validation loss.")
    _common(c)
    c.add_argument("--train", metavar="F", help="training examples (.tsv, .csv or .jsonl); required")
    c.add_argument("--val", metavar="F", help="validation examples (early stopping, selection); required")
    c.add_argument("--mode", default="full", choices=("full", "probe", "lora"), help="what trains (default full)")
    c.add_argument("--pooling", default="last", choices=("last", "mean"),
                   help="features of the last token (<eos> after the text) or the mean over the text (default last)")
    c.add_argument("--class-weights", default="none", choices=("none", "balanced"),
                   help="balanced: weight each class's loss by n / (classes * its count), for imbalanced data")
    c.add_argument("--lm-weight", type=float, default=0.0, help="add this weight x the language-modelling loss "
                   "of the texts (GPT-1's auxiliary objective; it used 0.5); full and lora modes (default 0)")
    c.add_argument("--text-column", default=None, help="text column (default: text, else sentence)")
    c.add_argument("--label-column", default="label", help="label column (default: label)")
    c.add_argument("--pattern", default=None, help='classify as a cloze (bert, glm: no new layer): each text in this '
                   'pattern with {text} and one [MASK], e.g. "{text} It was [MASK]."; with --verbalizer')
    c.add_argument("--verbalizer", default=None, metavar="LABEL=WORD,...", help="the word at the blank for each "
                   'label, one token each, e.g. "positive=great,negative=terrible"')
    c.set_defaults(handler=cmd_finetune, eval_samples=200, max_new_tokens=None)  # sft's options: not for classify
    s = tasks.add_parser("sft", help="supervised fine-tuning on prompt/completion pairs",
                         description="JSONL pairs {\"prompt\": ..., \"completion\": ...}; the loss counts completion "
                                     "tokens (and the <eos> after them) only. Or JSONL conversations {\"messages\": "
                                     "[{\"role\", \"content\"}, ...]} rendered by the run's chat template (ChatML "
                                     "with <|im_start|>/<|im_end|> role tokens by default), the loss on the "
                                     "assistant's turns only. Measured by completion NLL and by "
                                     "exact match, BLEU-4 and ROUGE-L of greedy completions of held-out prompts, "
                                     "before and after. The result is an ordinary run: generate, eval, serve.")
    _common(s)
    _pairs_data(s, "PAIRS.jsonl")
    s.add_argument("--eval-samples", type=int, default=200, help="held-out prompts completed and scored (default 200; "
                   "0: completion NLL only)")
    s.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest generated completion (default: the longest reference + 16)")
    s.add_argument("--chat-template", metavar="FILE.jinja", default=None,
                   help="conversations: a Hugging Face-style Jinja chat template (default: the --init run's, else "
                        "ChatML); the run carries it (chat_template.jinja) to serve, chat and export-hf")
    s.add_argument("--pack", action="store_true",
                   help="join short training examples into rows of up to model.block_size tokens")
    s.add_argument("--metric-tokenizer", default="auto", choices=("auto", "whitespace", "zh", "char"),
                   help="units of exact match, BLEU and ROUGE-L: whitespace words, zh (each Chinese/unspaced "
                        "character, as sacreBLEU's zh), char; auto (default): zh for unspaced text")
    s.set_defaults(handler=cmd_finetune, pooling="last", class_weights="none", lm_weight=0.0,  # classify's options
                   text_column=None, label_column="label", pattern=None, verbalizer=None)
    c.set_defaults(chat_template=None, pack=False, beta=0.1, loss="sigmoid", label_smoothing=0.0, rpo_alpha=0.0,
                   reference=None, metric_tokenizer="auto")  # others' options
    s.set_defaults(beta=0.1, loss="sigmoid", label_smoothing=0.0, rpo_alpha=0.0, reference=None)
    d = tasks.add_parser("dpo", help="preference tuning (DPO) on chosen / rejected answers",
                         description="Direct Preference Optimization: JSONL {\"prompt\", \"chosen\", \"rejected\"} "
                                     "(texts; or the prompt as messages for the --init run's chat template and each "
                                     "answer as [{\"role\": \"assistant\", \"content\": ...}]). The --init run "
                                     "is the starting policy and, unless --reference names another, the frozen "
                                     "reference. Logged: the loss, the rewards "
                                     "beta * log(pi / pi_ref) of chosen and rejected answers, their margin and the "
                                     "preference accuracy, on training batches and the validation split.")
    _common(d)
    _pairs_data(d, "PREFS.jsonl")
    d.add_argument("--beta", type=float, default=0.1, help="strength of the pull toward the reference (default 0.1)")
    d.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo", "robust", "cdpo"),
                   help="sigmoid: DPO; ipo: IPO's squared loss on mean log-ratios; robust: rDPO with "
                        "--label-smoothing; cdpo: conservative DPO with --label-smoothing, whose optimum is "
                        "finite (default sigmoid)")
    d.add_argument("--label-smoothing", type=float, default=0.0,
                   help="--loss robust or cdpo: the probability that a pair's preference is wrong (default 0)")
    d.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="add this times the chosen answers' mean NLL to the loss (RPO; trl's loss_type "
                        "[sigmoid, sft]): keeps the policy near the chosen answers (default 0: DPO alone)")
    d.add_argument("--reference", metavar="RUN", default=None,
                   help="the frozen reference the KL penalty pulls toward (default: the --init run); e.g. the SFT "
                        "run when --init is the policy of an earlier DPO round (iterated DPO). Same architecture "
                        "and tokenizer as --init")
    d.add_argument("--chat-template", metavar="FILE.jinja", default=None,
                   help="for prompts given as messages (default: the --init run's template)")
    d.set_defaults(handler=cmd_finetune, pooling="last", class_weights="none", lm_weight=0.0, text_column=None,
                   label_column="label", pattern=None, verbalizer=None, pack=False, eval_samples=0,
                   max_new_tokens=None, metric_tokenizer="auto")
    r = tasks.add_parser("report", help="before/after table of fine-tunes of one task (report.md, metrics.png)")
    r.add_argument("run_dirs", nargs="+", metavar="RUN")
    r.add_argument("--out", required=True, metavar="REPORT_DIR")
    r.add_argument("--split", default="val", choices=("val", "test"))
    r.add_argument("--title", default=None)
    r.set_defaults(handler=cmd_finetune_report)

    q = sub.add_parser("predict", help="labels and probabilities from a fine-tuned classifier",
                       description="Classify texts given with --text or read from --file (TSV / CSV / JSONL). When "
                                   "the file has a label column, also prints accuracy, macro-F1 and the confusion "
                                   "matrix.")
    q.add_argument("run_dir", metavar="RUN_DIR", help="a run written by glmlab finetune classify")
    given = q.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", action="append", metavar="T", help="a text to classify; repeatable")
    given.add_argument("--file", metavar="F", help="texts to classify (.tsv, .csv or .jsonl)")
    q.add_argument("--text-column", default=None, help="text column of --file (default: text, else sentence)")
    q.add_argument("--label-column", default="label", help="label column of --file, if any (default: label)")
    q.add_argument("--json", action="store_true", help="one JSON object per text instead of a table")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--checkpoint", default="best", choices=("best", "last"))
    q.set_defaults(handler=cmd_predict)


def cmd_finetune(args: argparse.Namespace) -> int:
    from glmlab.config import read_yaml
    from glmlab.finetune.run import FinetuneOptions, finetune

    task = args.finetune_command
    train_file = args.train if task == "classify" else args.data
    if not args.resume:
        if args.init is None:
            raise GlmlabError("no --init given", "pass --init RUN_DIR (a pre-trained run), or --init none")
        if train_file is None:
            raise GlmlabError("no training data given", {"sft": "add --data PAIRS.jsonl",
                                                          "dpo": "add --data PREFS.jsonl"}.get(task, "add --train F"))
    init = None if args.init in (None, "none") else args.init
    options = FinetuneOptions(
        task=task, init=init, train=train_file or "", val=args.val, test=args.test, mode=args.mode,
        pooling=args.pooling, class_weights=args.class_weights, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lm_weight=args.lm_weight, text_column=args.text_column, label_column=args.label_column, arch=args.arch,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, eval_samples=args.eval_samples,
        max_new_tokens=args.max_new_tokens, pattern=args.pattern, verbalizer=args.verbalizer,
        chat_template=args.chat_template, pack=args.pack, beta=args.beta, loss=args.loss,
        label_smoothing=args.label_smoothing, rpo_alpha=args.rpo_alpha, reference=args.reference,
        metric_tokenizer=args.metric_tokenizer)
    result, results = finetune(options, args.out, read_yaml(args.config) if args.config else None, args.overrides,
                               resume=args.resume, show_progress=not args.quiet)
    if not result.main_process:
        return 0
    if result.stopped_by == "interrupted":
        return EXIT_INTERRUPTED
    print(f"{result.stopped_by} after step {result.step} ({result.elapsed:.0f}s): best val loss "
          f"{result.best_val_loss:.4f} -> {result.run_dir}")
    print(_summary(results))
    return 0


def _summary(results: dict) -> str:
    lines = [f"{results['trainable_parameters']:,} of {results['total_parameters']:,} parameters trained"]
    for split in ("val", "test"):
        if split not in results:
            continue
        r = results[split]
        if results["task"] == "dpo":
            before = results.get("before", {}).get(split)
            lines.append(f"{split}: preference loss {r['loss']:.4f}"
                         + (f" (before {before['loss']:.4f})" if before else "")
                         + f", preference accuracy {r['reward_accuracy']:.2%}, reward margin {r['reward_margin']:.3f}"
                         f" (chosen {r['rewards_chosen']:.3f}, rejected {r['rewards_rejected']:.3f}; "
                         f"{r['pairs']:,} pairs)")
        elif results["task"] == "classify":
            lines.append(f"{split}: accuracy {r['accuracy']:.2%}, macro-F1 {r['macro_f1']:.3f} "
                         f"({r['examples']:,} examples); confusion (rows true: {', '.join(results['labels'])}) "
                         f"{r['confusion']}")
        else:
            before = results.get("before", {}).get(split)
            was = (f" (before: NLL/token {before['loss']:.3f}, exact {before['exact_match']:.2%}, "
                   f"ROUGE-L {before['rouge_l']:.3f})") if before and "exact_match" in before else ""
            if "exact_match" not in r:
                lines.append(f"{split}: completion NLL/token {r['loss']:.3f} (no completions generated)")
                continue
            lines.append(f"{split}: completion NLL/token {r['loss']:.3f}, exact match {r['exact_match']:.2%}, "
                         f"BLEU-4 {r['bleu']:.3f}, ROUGE-L {r['rouge_l']:.3f} ({r['examples']} generated){was}")
    return "\n".join(lines)


def cmd_finetune_report(args: argparse.Namespace) -> int:
    from glmlab.finetune.report import write_report

    path = write_report(args.run_dirs, args.out, split=args.split, title=args.title)
    print(path.read_text(encoding="utf-8"))
    print(f"wrote {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from glmlab.finetune.predict import load_classifier, predict_file

    classifier = load_classifier(args.run_dir, checkpoint=args.checkpoint)
    metrics = None
    if args.text:  # a text given on the command line is refused, as generate refuses a prompt, if it cannot be read
        texts = list(args.text)
        for i, text in enumerate(texts):
            classifier.tokenizer.encode_checked(text, "text" if len(texts) == 1 else f"text {i + 1}")
        predictions = classifier.predict(texts, args.batch_size)
    else:
        texts, predictions, metrics = predict_file(classifier, args.file, args.text_column, args.label_column,
                                                   args.batch_size)
    if classifier.unknown:
        print(f"warning: {classifier.unknown}", file=sys.stderr)
    if classifier.truncated:
        print(f"warning: {classifier.truncated} of {len(texts)} texts are longer than the context "
              f"({classifier.model.block_size} tokens) and were truncated", file=sys.stderr)
    for text, p in zip(texts, predictions, strict=True):
        if args.json:
            print(json.dumps({"text": text, "label": p.label, "probabilities": p.probabilities}))
        else:
            probs = " ".join(f"{label}={prob:.3f}" for label, prob in p.probabilities.items())
            print(f"{p.label}\t{p.probabilities[p.label]:.3f}\t{probs}\t{text}")
    if metrics is not None:
        print(f"accuracy {metrics['accuracy']:.2%}, macro-F1 {metrics['macro_f1']:.3f} over {metrics['examples']:,} "
              f"labelled texts; confusion (rows true: {', '.join(classifier.labels)}) {metrics['confusion']}",
              file=sys.stderr if args.json else sys.stdout)
    return 0

