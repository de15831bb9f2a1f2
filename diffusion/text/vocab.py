"""Writes a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) with a
BPE vocabulary learned from captions.

    python -m diffusion.text.vocab --out vocab/fashion_captions
    python -m diffusion.text.vocab --out DIR --corpus captions.txt --max_merges 2000

Without --corpus, the corpus is every caption the Fashion-MNIST demo writes
(`diffusion.data.captions`): the folder then holds the vocabulary its captioned source
uses by default, so `load_clip_tokenizer(DIR)` gives the same ids. A --corpus file has
one text per line. The output is deterministic.
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from diffusion import cli
from diffusion.data import captions
from diffusion.text.learn_bpe import learn_bpe, write_vocabulary

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("out", None, "folder to write the tokenizer files into",
                    flag_values=FLAGS)
flags.DEFINE_string("corpus", None, "text file, one text per line (default: the "
                    "Fashion-MNIST demo's captions)", flag_values=FLAGS)
flags.DEFINE_integer("max_merges", None, "stop after this many merges (default: until "
                     "every word of the corpus is one token)", flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)


def main(argv: Sequence[str]) -> dict:
    """Writes the folder; returns dict(out, vocab_size, num_merges)."""
    cli.parse(FLAGS, argv)
    if FLAGS.corpus:
        with open(FLAGS.corpus, encoding="utf-8") as fh:
            texts = fh.read().splitlines()
        merges = learn_bpe(texts, FLAGS.max_merges)
    elif FLAGS.max_merges is None:
        merges = list(captions.demo_merges())
    else:
        merges = learn_bpe(captions.all_captions(), FLAGS.max_merges)
    vocab = write_vocabulary(FLAGS.out, merges)
    print(f"wrote {FLAGS.out}: {len(vocab)} tokens, {len(merges)} merges")
    return dict(out=FLAGS.out, vocab_size=len(vocab), num_merges=len(merges))


if __name__ == "__main__":
    cli.run(main, FLAGS)
