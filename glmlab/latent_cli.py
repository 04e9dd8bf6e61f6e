"""``glmlab vae sample|reconstruct|interpolate``: a sentence VAE's latent tools from the command line (argument
parsing and printing only; the tools: :mod:`glmlab.generation.latent`)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from glmlab.cli_args import add_checkpoint
from glmlab.errors import GlmlabError


def _add_vae_decoding(p: argparse.ArgumentParser, temperature: float) -> None:
    """The run and decoding options every ``glmlab vae`` command shares."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run of model.family=vae")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"word sampling temperature; 0 = greedy (default {temperature:g})")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely words (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (deterministic)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest sentence decoded, in tokens (default and cap: the model's block_size - 1)")
    add_checkpoint(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vae", help="sample, reconstruct or interpolate sentences with a sentence VAE run",
                       description="Latent tools of a vae run: decode sentences from the prior, encode and "
                                   "decode sentences, or walk between two sentences in latent space.")
    vae = p.add_subparsers(dest="vae_command", required=True, metavar="{sample,reconstruct,interpolate}")
    s = vae.add_parser("sample", help="sentences decoded from z ~ p(z), the prior",
                       description="Draw z from the prior and decode a sentence from each. By default words are "
                                   "sampled too (temperature 1.0): a true sample from the model. --temperature 0 "
                                   "decodes each z greedily (as Bowman et al. show prior samples: the variety then "
                                   "comes from z alone); --num-beams B by beam search.")
    _add_vae_decoding(s, temperature=1.0)
    s.add_argument("-n", "--num-samples", dest="n", type=int, default=5, help="sentences to draw (default 5)")
    s.add_argument("--seed", type=int, default=None, help="seed of z and of word sampling (default: random)")
    s.set_defaults(handler=cmd_vae_sample)
    r = vae.add_parser("reconstruct", help="encode sentences and decode them again",
                       description="Encode each sentence to the mean of q(z|x) (or a sample of it with --sample) and "
                                   "decode it greedily (by default). Prints 'input -> reconstruction'. With a word "
                                   "tokenizer, unknown words are read as <unk>.")
    _add_vae_decoding(r, temperature=0.0)
    given = r.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", action="append", metavar="S", help="a sentence; repeatable")
    given.add_argument("--file", metavar="F", help="a UTF-8 text file, one sentence per line (blank lines skipped)")
    r.add_argument("--sample", action="store_true", help="decode from z ~ q(z|x) instead of its mean")
    r.add_argument("--seed", type=int, default=None, help="seed of --sample's z and of word sampling "
                   "(default: random)")
    r.set_defaults(handler=cmd_vae_reconstruct)
    i = vae.add_parser("interpolate", help="sentences along the line between two sentences' latent codes",
                       description="Homotopy (Bowman et al. 2016): decode z = (1 - t) mu(start) + t mu(end) for "
                                   "--steps evenly spaced t from 0 to 1, both ends included; greedy by default.")
    _add_vae_decoding(i, temperature=0.0)
    i.add_argument("--start", required=True, metavar="S", help="the first sentence")
    i.add_argument("--end", required=True, metavar="S", help="the last sentence")
    i.add_argument("--steps", type=int, default=5, help="sentences on the path, ends included (default 5, at least 2)")
    i.add_argument("--seed", type=int, default=None, help="seed of word sampling when --temperature > 0")
    i.set_defaults(handler=cmd_vae_interpolate)


def _vae_run(args: argparse.Namespace) -> tuple:
    """The run and the decoding settings of a ``glmlab vae`` command (settings checked before loading)."""
    from glmlab.generation.settings import GenerationSettings
    from glmlab.runs import load_run
    from glmlab.runtime import select_device

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens or 200, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, seed=args.seed)
    settings.validate()
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=select_device(args.device))
    if args.max_new_tokens is None:
        settings.max_new_tokens = max(1, run.model.block_size - 1)
    return run, settings


def _print_notes(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)


def cmd_vae_sample(args: argparse.Namespace) -> int:
    from glmlab.generation.latent import sample_prior

    run, settings = _vae_run(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sentences = sample_prior(run.model, run.tokenizer, args.n, seed=args.seed, settings=settings)
    _print_notes(caught)
    for sentence in sentences:
        print(sentence)
    return 0


def _read_sentences(path_text: str) -> list[str]:
    from glmlab.data.corpus import decode_text

    path = Path(path_text)
    if not path.is_file():
        raise GlmlabError(f"sentence file {path} does not exist", "check the path given to --file")
    lines = [line.strip() for line in decode_text(path.read_bytes(), str(path)).splitlines()]
    sentences = [line for line in lines if line]
    if not sentences:
        raise GlmlabError(f"{path} holds no sentences (every line is blank)", "write one sentence per line")
    return sentences


def cmd_vae_reconstruct(args: argparse.Namespace) -> int:
    from glmlab.generation.latent import reconstruct

    sentences = _read_sentences(args.file) if args.file else list(args.text)
    run, settings = _vae_run(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = reconstruct(run.model, run.tokenizer, sentences, sample=args.sample, seed=args.seed,
                              settings=settings)
    _print_notes(caught)
    for given, output in zip(sentences, outputs, strict=True):
        print(f"{given.strip()} -> {output}")
    return 0


def cmd_vae_interpolate(args: argparse.Namespace) -> int:
    from glmlab.generation.latent import interpolate

    run, settings = _vae_run(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = interpolate(run.model, run.tokenizer, args.start, args.end, steps=args.steps,
                           settings=settings)
    _print_notes(caught)
    width = len(str(len(path)))
    for i, sentence in enumerate(path):
        print(f"{i + 1:>{width}}  t={i / (len(path) - 1):.2f}  {sentence}")
    return 0
