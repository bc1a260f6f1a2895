"""The bundled downstream task ``wiki_cloze``: four-way next-word choice on the corpus' test split.

Each document is a passage of the test split cut before a word (the context, up to ``CONTEXT_WORDS``
words of the same paragraph) and four candidate next words: the true one and three distractors of
about the same corpus frequency (so a model cannot win by preferring common words) and the same
capitalisation. Chance is 25 %. The seed papers report multiple-choice accuracy (HellaSwag, PIQA,
ARC); this task exercises the same lm-evaluation-harness path (``multiple_choice``, ``acc`` and
``acc_norm``) offline, on text the bundled models were not trained on.

The documents are built deterministically (``build_cloze_docs``) and shipped as JSON lines next to the
task's YAML in ``romer_kernels/assets/tasks/wiki_cloze/``, so the task stays fixed whatever later
changes to this builder. Rebuild (and check that the shipped file is what the builder makes)::

    python -m romer_kernels.data.cloze [--check]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from romer_kernels.data.corpus import load_corpus

TASKS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tasks"
CLOZE_FILE = TASKS_DIR / "wiki_cloze" / "wiki_cloze.jsonl"
NUM_DOCS = 400
CONTEXT_WORDS = 48          # at most this many words of context before the blank
MIN_CONTEXT_WORDS = 8       # a blank needs at least this many words before it in its paragraph
FREQUENCY_BAND = 2.0        # distractors' corpus counts within [count / band, count * band] of the target's
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _paragraphs(text: str) -> list[str]:
    """Prose lines of the corpus text (titles, headings and list items are short lines, skipped)."""
    return [line for line in text.split("\n") if len(line.split()) >= MIN_CONTEXT_WORDS + 4]


def build_cloze_docs(test_text: str, count_text: str, num_docs: int = NUM_DOCS, seed: int = 0) -> list[dict]:
    """``num_docs`` documents ``{"context", "choices", "label"}`` from ``test_text``; word frequencies for
    the distractors from ``count_text`` (the whole corpus). Deterministic for the same texts and seed."""
    counts = Counter(word.lower() for word in count_text.split() if _WORD.match(word))
    by_count = sorted(counts, key=lambda word: (counts[word], word))
    rng = random.Random(seed)
    candidates = []                                   # (paragraph index, word index) of every possible blank
    paragraphs = [line.split() for line in _paragraphs(test_text)]
    for p, words in enumerate(paragraphs):
        for i in range(MIN_CONTEXT_WORDS, len(words)):
            if _WORD.match(words[i]) and counts[words[i].lower()] >= 2:
                candidates.append((p, i))
    if len(candidates) < num_docs:
        raise ValueError(f"only {len(candidates)} possible blanks in the text, fewer than num_docs={num_docs}")
    docs = []
    for p, i in sorted(rng.sample(candidates, num_docs)):
        words, target = paragraphs[p], paragraphs[p][i]
        lower = target.lower()
        low, high = counts[lower] / FREQUENCY_BAND, counts[lower] * FREQUENCY_BAND
        pool = [w for w in by_count if low <= counts[w] <= high and w != lower]
        if len(pool) < 3:                              # the rarest and commonest words: nearest counts instead
            nearest = sorted(by_count, key=lambda w: (abs(counts[w] - counts[lower]), w))
            pool = [w for w in nearest if w != lower][:12]
        distractors = rng.sample(pool, 3)
        shape = str.capitalize if target[0].isupper() else (lambda w: w)
        choices = [target] + [shape(w) for w in distractors]
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[max(0, i - CONTEXT_WORDS):i]), "choices": choices,
                     "label": choices.index(target)})
    return docs


def bundled_cloze_docs() -> list[dict]:
    """The documents built from the bundled corpus (what ``wiki_cloze.jsonl`` holds)."""
    text = "\n".join(load_corpus(split) for split in ("train", "valid", "test"))
    return build_cloze_docs(load_corpus("test"), text)


def docs_jsonl(docs: list[dict]) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m romer_kernels.data.cloze",
                                     description="Rebuild (or --check) the bundled wiki_cloze task's documents.")
    parser.add_argument("--check", action="store_true", help="only compare the shipped file with a rebuild")
    args = parser.parse_args(argv)
    text = docs_jsonl(bundled_cloze_docs())
    if args.check:
        same = CLOZE_FILE.is_file() and CLOZE_FILE.read_text(encoding="utf-8") == text
        print(f"{CLOZE_FILE}: {'matches' if same else 'DIFFERS FROM'} the builder's output")
        return 0 if same else 1
    CLOZE_FILE.parent.mkdir(parents=True, exist_ok=True)
    CLOZE_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {CLOZE_FILE}: {text.count(chr(10))} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
