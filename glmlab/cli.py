"""Command-line interface: parse arguments, call the library, print. Policies live in the library (what a
resumed run may change: ``training.trainer.resume_config``); the CLI keeps only argument checks and output.

Every user mistake surfaces as a GlmlabError, printed as one message with its fix, exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from glmlab.atomic import WRITE_ERRNOS, write_error
from glmlab.bench.cli import add_parser as add_bench_parser
from glmlab.chat_cli import add_parser as add_chat_parser
from glmlab.cli_args import add_checkpoint
from glmlab.errors import GlmlabError
from glmlab.finetune.cli import add_parsers as add_finetune_parsers
from glmlab.latent_cli import add_parser as add_vae_parser
from glmlab.serve.cli import add_parser as add_serve_parser
from glmlab.version import __version__

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="text files -> tokenizer + token files (a data directory)",
                       description="Read text, split it, train a tokenizer on the training split, and write "
                                   "token ids. With no INPUT, uses the bundled Tiny Shakespeare.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help=".txt files, directories of .txt, or .jsonl files")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="data directory to write")
    p.add_argument("--tokenizer", default=None, choices=("char", "word", "bpe", "unigram"),
                   help="tokenizer kind to train on the corpus (default: char)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary cap for word/bpe (default 20000/4096)")
    p.add_argument("--tokenizer-from", metavar="RUN_OR_HF_DIR",
                   help="encode with an existing tokenizer instead of training one: a run's, a data directory's or "
                        "a Hugging Face model's (e.g. GPT-2's, to continue training it with glmlab train --init)")
    p.add_argument("--split", default="0.9,0.05,0.05", help="train,val,test fractions (default 0.9,0.05,0.05)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the document shuffle for splits")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs (default: text)")
    p.add_argument("--errors", default="strict", choices=("strict", "replace"),
                   help="invalid UTF-8: stop with an error (strict) or substitute U+FFFD (replace)")
    p.add_argument("--val", metavar="FILE", help="use this file as the validation split instead of carving one")
    p.add_argument("--test", metavar="FILE", help="use this file as the test split instead of carving one")
    p.add_argument("--sentences", action="store_true",
                   help="one example per line (sentence mode, as the lstm and vae families train on)")
    p.add_argument("--chat", action="store_true",
                   help="add the chat role tokens <|im_start|> and <|im_end|> to the tokenizer; runs trained on this "
                        "data carry the ChatML chat template")
    p.set_defaults(handler=cmd_prepare)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a data directory into a run directory",
                       description="Train a model. Config: a YAML file (--config) with sections model: and "
                                   "train:, then key=value overrides, e.g. model.n_layer=4 train.max_steps=500.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (section.key=value)")
    p.add_argument("--data", metavar="DATA_DIR", help="data directory from glmlab prepare")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory to write (or to resume)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init", metavar="RUN_OR_HF_DIR",
                   help="start from these weights (a glmlab run, or a Hugging Face GPT-2 or BERT directory) with "
                        "their architecture: continued pre-training; the data must be prepared with --tokenizer-from "
                        "the same directory")
    p.add_argument("--init-checkpoint", default="best", metavar="best|last|step-N",
                   help="which weights of an --init run (default: best)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--list-keys", action="store_true", help="list every config key with its default and exit")
    p.set_defaults(handler=cmd_train)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample continuations of a prompt. Temperature 0 is greedy; the same --seed "
                                   "gives the same text. A prompt longer than the context keeps its last tokens.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document); \\n and \\t "
                   "are read as newline and tab")
    p.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file")
    p.add_argument("--suffix", default=None, help="fill in the middle: text that follows what is generated (glm, "
                   "bert, or a gpt trained with train.fim_rate); \\n and \\t are read as newline and tab. A glm "
                   "also fills every [MASK] written in the prompt")
    p.add_argument("--iterations", type=int, default=10, help="bert: mask-predict rounds (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--min-new-tokens", type=int, default=0, help="no end-of-text before this many tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    p.add_argument("--typical-p", type=float, default=1.0, help="locally typical sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty, -2..2")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty, -2..2")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size")
    p.add_argument("--bad-words", action="append", default=[], metavar="TEXT", help="text never to generate; "
                   "repeatable")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--num-samples", "--num-return-sequences", dest="num_samples", type=int, default=1)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (deterministic)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob / length^this")
    p.add_argument("--early-stopping", default="false", choices=("true", "false", "never"))
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when this text appears (not included in the output; \\n = newline); repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--max-time", type=float, default=None, help="stop generating after this many seconds")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each token's log-probability and the N most likely alternatives")
    p.add_argument("--json", action="store_true", help="print completions as JSON (text, tokens, finish reason)")
    p.add_argument("--decode-weights", default="native", choices=("native", "int8"),
                   help="int8: int8 matrices for token-by-token decoding on a CPU (faster for large models; "
                        "logits move by a few percent)")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode through a step compiled ahead of time (gpt on a CPU; needs a C++ compiler; the "
                        "first run per model and batch size compiles, ~15-30 s for small models, ~45 s for GPT-2 "
                        "small; later runs load it from $GLMLAB_CACHE_DIR, default ~/.cache/glmlab)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    add_checkpoint(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=cmd_generate)


def _add_fill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fill", help="the likeliest tokens for each [MASK] in a text (bert and glm runs)",
                       description="For each [MASK] in TEXT, the --top-k likeliest tokens with their probability and "
                                   "the text with that mask filled, as Hugging Face's fill-mask pipeline gives them. "
                                   "A bert reads the text once; a glm scores the first token of the piece it would "
                                   "write in each blank.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("text", metavar="TEXT", help="text with one or more [MASK]s; \\n and \\t are read as newline and "
                   "tab")
    p.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    p.add_argument("--json", action="store_true", help="print the fill-mask pipeline's JSON: a list of candidates "
                   "(score, token, token_str, sequence) for one mask, a list per mask for several")
    add_checkpoint(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=cmd_fill)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure NLL, perplexity and bits per char/byte of a run",
                       description="Score every token of a split (or a file) in context windows; a run trained "
                                   "on sentences (vae, or train.batching=sentences) sentence by sentence: NLL per "
                                   "sentence and per token (<eos> included) and PPL, and for a vae the "
                                   "importance-weighted NLL, ELBO, KL, mutual information, active units and "
                                   "reconstruction BLEU.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--split", choices=("train", "val", "test"), default=None, help="split to score (default val)")
    target.add_argument("--file", metavar="F", help="score a text file (.txt or .jsonl) instead of a split")
    p.add_argument("--data", metavar="DATA_DIR", help="data directory (default: the one the run was trained on)")
    p.add_argument("--stride", type=int, default=None, help="window stride in tokens (default: block size)")
    p.add_argument("--batch-size", type=int, default=16)
    add_checkpoint(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help="vae: samples of z per sentence for the importance-weighted NLL (default 500)")
    p.add_argument("--bleu-sentences", type=int, default=500, metavar="N",
                   help="vae: reconstruct the first N sentences for BLEU (default 500; 0 skips it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled z's (vae), of lm-eval's few-shot "
                                                        "sampling and sampled generations (default 0)")
    harness = p.add_argument_group("lm-evaluation-harness tasks (pip install \"glmlab[eval]\")")
    harness.add_argument("--tasks", metavar="NAMES", help="comma-separated lm-eval task names: run them on the model "
                                                          "in process instead of scoring a split")
    harness.add_argument("--include-path", metavar="DIR", help="a directory of task YAML files (your own tasks; "
                                                               "nothing is downloaded)")
    harness.add_argument("--limit", type=float, default=None, metavar="N",
                         help="at most N documents per task (a fraction if below 1)")
    harness.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples per prompt")
    harness.add_argument("--output-path", metavar="FILE.json", help="write lm-eval's results (and --log-samples) here")
    harness.add_argument("--log-samples", action="store_true", help="keep every item's requests and answers")
    p.set_defaults(handler=cmd_eval)


def _add_interop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="turn a local Hugging Face GPT-2 or BERT (masked LM) directory into a "
                       "glmlab gpt or bert run",
                       description="Read config.json, model.safetensors (or pytorch_model.bin, weights only) and "
                                   "tokenizer.json (or GPT-2's vocab.json + merges.txt, BERT's vocab.txt) from a "
                                   "local directory. No download. A BERT's vocabulary is renumbered so that its "
                                   "special tokens sit at glmlab's ids; glmlab adds no [CLS]/[SEP] to a text: write "
                                   "them where the model expects them.")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.set_defaults(handler=cmd_import_hf)
    p = sub.add_parser("export-hf", help="write a gpt run as a Hugging Face GPT-2 directory, a bert run as a "
                       "BertForMaskedLM directory",
                       description="The result loads offline with transformers' GPT2LMHeadModel (a gpt run) or "
                                   "AutoModelForMaskedLM (a bert run) .from_pretrained, and "
                                   "AutoTokenizer.from_pretrained.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("hf_dir", metavar="HF_DIR")
    add_checkpoint(p)
    p.set_defaults(handler=cmd_export_hf)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmlab", description="Generative language models: prepare -> train -> "
                                     "generate / eval.")
    parser.add_argument("--version", action="version", version=f"glmlab {__version__}")
    parser.set_defaults(overrides=None)  # commands that take KEY=VALUE overrides set a list
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_train(sub)
    _add_generate(sub)
    add_chat_parser(sub)
    _add_fill(sub)
    _add_eval(sub)
    _add_interop(sub)
    add_bench_parser(sub)
    add_vae_parser(sub)
    _add_compare(sub)
    add_finetune_parsers(sub)
    add_serve_parser(sub)
    return parser


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare runs trained on the same data: report.md + report.html",
                       description="Score every run on one split (exact NLL, or a vae's importance-weighted bound; "
                                   "sentence and window accounting labelled), sample from each (BLEU-2..5 against "
                                   "references, Self-BLEU-2..5, distinct-1/2, mean length), overlay their loss "
                                   "curves; write REPORT_DIR/report.md, report.html (self-contained) and curves.png.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory for the report (created)")
    p.add_argument("--data", metavar="DATA_DIR", help="data directory (default: the one the first run was trained on)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="split to score (default test)")
    p.add_argument("--references", metavar="F", help="reference sentences, one per line (default: the test split)")
    p.add_argument("--samples", type=int, default=500, metavar="N", help="sentences generated per run (default 500)")
    p.add_argument("--metric-tokenizer", default="auto", choices=("auto", "whitespace", "zh", "char"),
                   help="units of BLEU, Self-BLEU and distinct-n: whitespace words, zh (each Chinese/unspaced "
                        "character, as sacreBLEU's zh), char; auto (default): zh for unspaced text, else whitespace")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of a vae's z's (default 0)")
    p.add_argument("--iw-samples", type=int, default=50, metavar="K",
                   help="vae: samples of z per sentence for the importance-weighted NLL (default 50)")
    p.add_argument("--max-sentences", type=int, default=None, metavar="N",
                   help="score only the first N sentences of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    add_checkpoint(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from glmlab.evaluation.compare import compare_runs
    from glmlab.evaluation.compare_report import check_out_dir, summary_markdown, write_report

    check_out_dir(args.out)
    result = compare_runs(args.run_dirs, data_dir=args.data, split=args.split, references=args.references,
                          samples=args.samples, seed=args.seed, iw_samples=args.iw_samples,
                          max_sentences=args.max_sentences, batch_size=args.batch_size, checkpoint=args.checkpoint,
                          device=args.device, progress=lambda message: print(message, file=sys.stderr),
                          metric_tokenizer=args.metric_tokenizer)
    paths = write_report(result, args.out)
    print(summary_markdown(result))
    print(f"\nwrote {paths['markdown']}, {paths['html']} and {paths['curves']}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from glmlab.data.prepare import format_summary, prepare

    existing = None
    if args.tokenizer_from:
        from glmlab.interop.sources import tokenizer_from

        given = [flag for flag, value in (("--tokenizer", args.tokenizer), ("--vocab-size", args.vocab_size)) if value]
        if given:
            raise GlmlabError(f"{' and '.join(given)} train a new tokenizer, and --tokenizer-from uses an existing one",
                              f"drop {' and '.join(given)}, or --tokenizer-from")
        existing = tokenizer_from(args.tokenizer_from)
    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer or "char", vocab_size=args.vocab_size,
                   split=args.split, seed=args.seed, text_field=args.text_field, errors=args.errors, val_file=args.val,
                   test_file=args.test, sentences=args.sentences, existing=existing, chat=args.chat)
    print(format_summary(meta, args.out))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from glmlab.config import describe_keys, read_yaml, resolve_config
    from glmlab.training.trainer import resume_config, train

    if args.list_keys:
        print(describe_keys())
        return 0
    if not args.out:
        raise GlmlabError("no run directory given", "add --out RUN_DIR")
    init = None
    if args.resume:
        if args.config:
            raise GlmlabError("--config cannot be combined with --resume (the run keeps its own config.json)",
                              "give changes as key=value overrides, e.g. train.max_steps=4000")
        if args.init:
            raise GlmlabError("--init cannot be combined with --resume (the run continues from its checkpoint)",
                              "drop --init")
        config, data_dir = resume_config(args.out, args.overrides, args.data)
    else:
        if not args.data:
            raise GlmlabError("no data directory given", "add --data DATA_DIR (made by glmlab prepare)")
        base = read_yaml(args.config) if args.config else {}
        if args.init:
            from glmlab.interop.sources import initial_weights
            from glmlab.training.initial import init_config

            init = initial_weights(args.init, args.init_checkpoint)
            config = init_config(init, base, args.overrides)
        else:
            config = resolve_config(base, args.overrides)
        data_dir = args.data
    result = train(config, data_dir, args.out, resume=args.resume, show_progress=not args.quiet, init=init)
    if result.main_process:
        print(f"{result.stopped_by} after step {result.step} ({result.elapsed:.0f}s, {result.tokens_per_sec:,.0f} "
              f"tokens/s): best val loss {result.best_val_loss:.4f}, last {result.last_val_loss:.4f} -> "
              f"{result.run_dir}")
    return EXIT_INTERRUPTED if result.stopped_by == "interrupted" else 0


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def unescape(text: str) -> str:
    """Turn the two-character sequences \\n, \\t and \\\\ typed on a command line into newline, tab, backslash."""
    return re.sub(r"\\[nt\\]", lambda m: _ESCAPES[m.group(0)], text)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        from glmlab.data.corpus import decode_text

        path = Path(args.prompt_file)
        if not path.is_file():
            raise GlmlabError(f"prompt file {path} does not exist", "check the path given to --prompt-file")
        return decode_text(path.read_bytes(), str(path))
    return unescape(args.prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    from glmlab.generation.generate import GenerationSettings, fill_blanks, generate_batch, stream
    from glmlab.generation.infill import blanks_in
    from glmlab.runs import load_run
    from glmlab.runtime import select_device

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, typical_p=args.typical_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        bad_words=[unescape(w) for w in args.bad_words], stop=[unescape(s) for s in args.stop],
        stop_at_eos=not args.ignore_eos, num_return_sequences=args.num_samples, num_beams=args.num_beams,
        length_penalty=args.length_penalty, early_stopping={"true": True, "false": False}.get(
            args.early_stopping, args.early_stopping), logprobs=args.logprobs, seed=args.seed,
        max_time=args.max_time)
    settings.validate()
    if args.stream and (args.num_samples != 1 or args.num_beams != 1 or args.json):
        raise GlmlabError("--stream prints one sampled text", "drop --num-samples, --num-beams and --json, "
                          "or --stream")
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=select_device(args.device))
    run.use_decode_weights(args.decode_weights)
    if args.compile_decode:
        run.use_compiled_decode()
    prompt = _read_prompt(args)
    suffix = unescape(args.suffix) if args.suffix is not None else None
    if args.iterations < 1:
        raise GlmlabError(f"--iterations {args.iterations} must be at least 1", "use 10 (the default)")
    if args.iterations != 10 and run.model.traits.left_to_right:
        raise GlmlabError("--iterations sets a bert's mask-predict rounds", "drop --iterations")
    blanks = suffix is None and blanks_in(run.model, run.tokenizer, prompt) > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.stream:
            if blanks:
                raise GlmlabError("--stream writes one continuation; the prompt holds [MASK] blanks to fill",
                                  "drop --stream")
            sys.stdout.write(prompt)
            for delta in stream(run.model, run.tokenizer, prompt, settings, suffix):
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write((suffix or "") + "\n")
        else:
            if blanks:
                completions = fill_blanks(run.model, run.tokenizer, prompt, settings)
            else:
                completions = generate_batch(run.model, run.tokenizer, [prompt], settings, [suffix],
                                             iterations=args.iterations)[0]
            if args.json:
                print(json.dumps([dataclasses.asdict(c) for c in completions], indent=2, ensure_ascii=False))
            for i, completion in enumerate([] if args.json else completions):
                if len(completions) > 1:
                    print(f"--- sample {i + 1} ---")
                print(completion.text if blanks else prompt + completion.text + (suffix or ""))
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return _eval_tasks(args)
    for flag in ("include_path", "limit", "num_fewshot", "output_path"):
        if vars(args)[flag] is not None:
            raise GlmlabError(f"--{flag.replace('_', '-')} applies to lm-eval tasks", "add --tasks NAMES, or drop it")
    from glmlab.evaluation.report import SentenceReport, evaluate_run

    notes: list[str] = []
    report, label = evaluate_run(args.run_dir, split=args.split, file=args.file, data_dir=args.data,
                                 stride=args.stride, batch_size=args.batch_size, checkpoint=args.checkpoint,
                                 device=args.device, samples=args.samples, bleu_sentences=args.bleu_sentences,
                                 seed=args.seed, notes=notes)
    for note in notes:
        print(f"glmlab eval: warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"target": label, **report.to_dict()}, indent=2))
    elif isinstance(report, SentenceReport):  # a block that names its target
        print(report.format())
    else:
        print(f"{label}: {report.format()}")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    """glmlab eval RUN --tasks NAMES: lm-evaluation-harness in process (glmlab.evaluation.harness)."""
    for flag, default in (("split", None), ("file", None), ("data", None), ("stride", None), ("samples", None),
                          ("bleu_sentences", 500)):
        if vars(args)[flag] != default:
            raise GlmlabError(f"--{flag.replace('_', '-')} scores a split, and --tasks runs lm-eval tasks",
                              "use one or the other")
    try:
        from glmlab.evaluation.harness import HarnessOptions, run_tasks
    except ImportError as exc:
        raise GlmlabError(f"--tasks needs lm-evaluation-harness, which is not installed ({exc.name} is missing)",
                          'pip install "glmlab[eval]"') from None
    from lm_eval.utils import make_table

    from glmlab.runs import load_run
    from glmlab.runtime import select_device

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise GlmlabError("--tasks names no task", "give comma-separated task names")
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=select_device(args.device))
    options = HarnessOptions(tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size, args.seed,
                             args.log_samples)
    results = run_tasks(run, options)
    if args.output_path:
        from glmlab import atomic

        atomic.write_text(args.output_path, json.dumps(results, indent=2, default=str, ensure_ascii=False))
    if args.json:
        print(json.dumps(results["results"], indent=2, default=str))
    else:
        print(make_table(results))
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from glmlab.interop.hf_gpt2 import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} -> {out}")
    if json.loads((out / "config.json").read_text())["model"]["family"] == "bert":
        print("note: glmlab adds no [CLS] / [SEP] around a text; write them where this BERT expects them, e.g. "
              f'glmlab fill {out} "[CLS] paris is the [MASK] of france. [SEP]"')
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from glmlab.interop.hf_gpt2 import export_hf

    out = export_hf(args.run_dir, args.hf_dir, checkpoint=args.checkpoint)
    [architecture] = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"]
    print(f"exported {args.run_dir} -> {out} (load with {architecture}.from_pretrained / "
          "AutoTokenizer.from_pretrained)")
    return 0


def cmd_fill(args: argparse.Namespace) -> int:
    from glmlab.generation.fill_mask import fill_mask
    from glmlab.runs import load_run
    from glmlab.runtime import select_device

    text = unescape(args.text)
    if args.top_k < 1:
        raise GlmlabError(f"--top-k {args.top_k} must be at least 1", "use 5 (the default)")
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=select_device(args.device))
    result = fill_mask(run.model, run.tokenizer, text, top_k=args.top_k)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    per_mask = [result] if result and isinstance(result[0], dict) else result
    for i, candidates in enumerate(per_mask):
        if i:
            print()
        print(f"[MASK] {i + 1} of {len(per_mask)}:")
        for c in candidates:
            shown = c["sequence"].replace("\n", "\\n").replace("\t", "\\t")
            print(f"{c['score']:.4f} {json.dumps(c['token_str'], ensure_ascii=False)}  {shown}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options too (glmlab train --quiet train.lr=3e-4 ...).
    if args.overrides is not None and all(not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with warnings.catch_warnings():  # a warning is a one-line note (weights without a checksum, ...)
            warnings.showwarning = lambda message, *_, **__: print(f"glmlab {args.command}: note: {message}",
                                                                   file=sys.stderr)
            return args.handler(args)
    except GlmlabError as exc:
        print(f"glmlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"glmlab {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output went away (glmlab generate ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 0
    except OSError as exc:  # any command writing to a full, read-only or forbidden place
        if exc.errno not in WRITE_ERRNOS:
            raise
        print(f"glmlab {args.command}: error: {write_error(exc.filename or 'the output', exc)}", file=sys.stderr)
        return EXIT_ERROR
