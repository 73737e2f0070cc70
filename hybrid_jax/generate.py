"""Command line: sample text from the newest checkpoint of a training run.

    python -m hybrid_jax.generate --workdir runs/x --prompt "ROMEO:" --max_new_tokens 200 \\
        [--temperature 0.8] [--top_k 40] [--top_p 0.95] [--seed 0] [--step N] [--num_samples 1]

The model and tokenizer come from the run itself (`<workdir>/config.json`: `model` builds the
network, `data.tokenizer` names the tokenizer), the parameters from the checkpoint
(`hybrid_jax.inference.load_model`). Prints the prompt followed by each sample. Temperature 0 is
greedy decoding. Exit status 2 for a bad workdir, step or option.
"""
from __future__ import annotations

import argparse
import sys

from hybrid_jax.data import get_tokenizer
from hybrid_jax.inference.checkpoint import load_model
from hybrid_jax.inference.decoding import generate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hybrid_jax.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="run directory of `python -m hybrid_jax.train`")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--num_samples", type=int, default=1, help="samples decoded together as a batch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
        model, config, step = load_model(args.workdir, args.step)
        tokenizer = get_tokenizer(config.data.tokenizer)
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise ValueError("--prompt encodes to no tokens; give at least one character")
        tokens = generate(model, [prompt] * args.num_samples, args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          vocab_limit=min(tokenizer.vocab_size, config.model.vocab_size))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"# {args.workdir} @ step {step}", file=sys.stderr)
    for i, row in enumerate(tokens):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tokenizer.decode(row.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
