"""The bundled evaluation corpus: real English Wikipedia articles, and loaders for other text.

The package ships a small WikiText-2-like corpus so that its main job (perplexity and routing of a
clean or analog MoE model) runs offline. The text comes from the Wikipedia dump excerpt
``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (211 pages, 106 of them real
articles, the rest redirects), which ships as a test file inside the ``gensim`` 4.4.0 wheel.
``build_wiki_corpus`` converts it from wikitext to plain text with ``mwparserfromhell`` (a build-time
dependency only), keeps mixed case and punctuation, and splits it deterministically *by article* into
train / valid / test (about 90 / 5 / 5 % of the characters). The result is committed under
``romer_kernels/assets/corpus/`` as ``wiki.{train,valid,test}.txt.xz`` with its licence
(CC BY-SA 4.0, Wikipedia contributors) in ``LICENSE.md``.

Text format: one block per article, separated by a blank line; the first line of a block is the
article title, then one line per paragraph, section heading or list item.

Rebuild the assets (downloads the gensim wheel with pip, without installing it)::

    python -m romer_kernels.data.corpus --rebuild [--source FILE.bz2] [--out DIR]
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import lzma
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "valid", "test")
CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"
SOURCE_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SOURCE_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
GENSIM_WHEEL_SPEC = "gensim==4.4.0"
SPLIT_FRACTIONS = {"valid": 0.05, "test": 0.05}   # the rest is train

# Sections that hold citations and link lists rather than prose.
_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "citations", "footnotes", "notes and references", "references and notes", "works cited", "links",
    "reference", "external link", "primary sources", "secondary sources", "notes and sources",
}
# Tags whose contents are not running text (or are markup that strip_code would leave as noise).
_DROP_TAGS = {
    "ref", "references", "gallery", "math", "table", "timeline", "imagemap", "score", "chem", "ce",
    "syntaxhighlight", "source", "graph", "templatedata", "inputbox", "categorytree", "hiero", "noinclude",
    "includeonly", "mapframe", "maplink",
}
_DROP_LINK_NAMESPACES = {"file", "image", "media", "category", "wikipedia", "wp", "wikt", "wiktionary",
                         "template", "help", "portal", "special", "user", "talk", "s", "q", "commons", "b", "n", "v"}
# Lines that still hold markup after strip_code come from markup the parser could not read (a table
# broken by a template, an unclosed link); they are dropped rather than guessed at.
_MARKUP_RESIDUE = re.compile(r"\[\[|\]\]|\{\{|\}\}|^\{\||^[|!]|__[A-Z]+__|</?[a-zA-Z]+[^>]*>")
_LANG_LINK = re.compile(r"^[a-z]{2,3}(-[a-z]{1,8})*$")


@dataclass
class Article:
    title: str
    text: str       # the cleaned block: title line, then paragraphs


# -- loading -----------------------------------------------------------------------------------------
def corpus_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return CORPUS_DIR / f"wiki.{split}.txt.xz"


def load_corpus(split: str = "test", path: str | Path | None = None) -> str:
    """Text of the bundled Wikipedia corpus split, or of a local text file (``.xz`` is decompressed)."""
    if path is None:
        file = corpus_path(split)
        if not file.is_file():
            raise FileNotFoundError(
                f"bundled corpus file {file} is missing; reinstall the package with its data files or run "
                "`python -m romer_kernels.data.corpus --rebuild`")
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"corpus text file not found: {file}")
    data = file.read_bytes()
    if file.suffix == ".xz":
        data = lzma.decompress(data)
    return data.decode("utf-8")


def load_hf_dataset_text(name: str, config: str | None = None, split: str = "test", column: str = "text") -> str:
    """Text of a Hugging Face dataset split (rows of ``column`` joined by blank lines).

    Needs the optional ``datasets`` package and either network access or a local datasets cache.
    Example: ``load_hf_dataset_text("wikitext", "wikitext-2-raw-v1", "test")``.
    """
    try:
        import datasets  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_hf_dataset_text needs the optional 'datasets' package: pip install datasets "
            "(or use load_corpus() for the bundled corpus or load_corpus(path=...) for a local text file)"
        ) from exc
    dataset = datasets.load_dataset(name, config, split=split)
    if column not in dataset.column_names:
        raise KeyError(f"dataset {name!r} split {split!r} has no column {column!r}; columns: {dataset.column_names}")
    return "\n\n".join(str(row) for row in dataset[column])


def load_text(data: str = "bundled", split: str = "test") -> str:
    """The text a data spec names: ``bundled`` (this corpus' ``split``), ``hf:NAME:CONFIG[:SPLIT]`` (a
    Hugging Face dataset; its own split, else ``split``) or the path of a text file."""
    if data == "bundled":
        return load_corpus(split)
    if data.startswith("hf:"):
        parts = data[3:].split(":")
        if len(parts) not in (2, 3):
            raise ValueError("--data hf:NAME:CONFIG[:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:test")
        return load_hf_dataset_text(parts[0], parts[1], parts[2] if len(parts) == 3 else split)
    return load_corpus(split, path=data)


def load_tokens(tokenizer, data: str = "bundled", split: str = "test"):
    """1-D int64 token ids of ``load_text(data, split)`` under ``tokenizer``."""
    import torch  # noqa: PLC0415

    # verbose=False: the whole split is one sequence longer than the model's context, which transformers
    # warns about; it is cut into windows before any forward, so the warning does not apply
    return torch.tensor(tokenizer(load_text(data, split), verbose=False)["input_ids"], dtype=torch.long)


# -- building ----------------------------------------------------------------------------------------
def iter_pages(bz2_path: str | Path):
    """(title, namespace, is_redirect, wikitext) of every page of a MediaWiki XML dump (.bz2)."""
    with bz2.open(bz2_path, "rb") as stream:
        for _event, element in ET.iterparse(stream, events=("end",)):
            if _local(element.tag) != "page":
                continue
            title = namespace = text = None
            redirect = False
            for child in element.iter():
                tag = _local(child.tag)
                if tag == "title":
                    title = child.text or ""
                elif tag == "ns":
                    namespace = int(child.text or 0)
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = child.text or ""
            element.clear()
            if title is not None and text is not None:
                yield title, namespace, redirect, text


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _drop_link(title: str) -> bool:
    title = title.strip().lstrip(":")
    if ":" not in title:
        return False
    prefix = title.split(":", 1)[0].strip().lower()
    return prefix in _DROP_LINK_NAMESPACES or bool(_LANG_LINK.match(prefix))


def _remove_nodes(code) -> None:
    """Delete non-prose nodes in place: references, tables, math, galleries, file/category/language links."""
    import mwparserfromhell as mw  # noqa: PLC0415

    doomed = []
    for node in code.filter(recursive=True):
        if isinstance(node, mw.nodes.Tag) and str(node.tag).strip().lower() in _DROP_TAGS:
            doomed.append(node)
        elif isinstance(node, mw.nodes.Wikilink) and _drop_link(str(node.title)):
            doomed.append(node)
    for node in doomed:
        try:
            code.remove(node, recursive=True)
        except ValueError:
            pass        # inside a node that was removed already


def _clean_lines(text: str) -> list[str]:
    """Tidy what strip_code leaves where templates or math were removed; one line per paragraph."""
    lines = []
    for line in text.split("\n"):
        line = line.replace("\u00a0", " ").replace("\u200b", "").replace("\t", " ")
        line = re.sub(r"\(\s*[,;:.]*\s*\)", "", line)            # "()" / "(, )" left by removed templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)                 # "(; born 1900)" -> "(born 1900)"
        line = re.sub(r" {2,}", " ", line)
        line = re.sub(r" +([,.;:!?)])", r"\1", line)              # no space before punctuation
        line = line.strip()
        if re.fullmatch(r"[\W_]*", line) or _MARKUP_RESIDUE.search(line):
            continue                                              # empty, punctuation only, or unparsed markup
        lines.append(line)
    return lines


_HEADING_LINE = re.compile(r"^(={2,6})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.MULTILINE)


def _sections(wikitext: str) -> list[tuple[int, str, str]]:
    """(level, heading wikitext, body wikitext) per section; the lead section has level 1 and no heading.
    Splitting at heading lines before parsing keeps a markup error (an unclosed tag) inside its section."""
    out, level, heading, start = [], 1, "", 0
    for match in _HEADING_LINE.finditer(wikitext):
        out.append((level, heading, wikitext[start:match.start()]))
        level, heading, start = len(match.group(1)), match.group(2), match.end()
    out.append((level, heading, wikitext[start:]))
    return out


def clean_article(title: str, wikitext: str) -> str:
    """Plain text of one article: the title line, then its paragraphs, headings and list items."""
    import mwparserfromhell as mw  # noqa: PLC0415

    sections = []                                      # (level, heading, body lines)
    for level, heading, body in _sections(wikitext):
        name = " ".join(mw.parse(heading).strip_code().split()) if heading else ""
        code = mw.parse(body)
        _remove_nodes(code)
        sections.append((level, name, _clean_lines(code.strip_code())))

    out, dropping_below = [title], None
    for i, (level, name, body) in enumerate(sections):
        if dropping_below is not None and level > dropping_below:
            continue
        dropping_below = None
        if name.lower().strip(" :") in _DROP_SECTIONS:
            dropping_below = level
            continue
        if name:
            has_content = bool(body)
            for deeper_level, deeper_name, deeper_body in sections[i + 1:]:
                if deeper_level <= level:
                    break
                if deeper_body and deeper_name.lower().strip(" :") not in _DROP_SECTIONS:
                    has_content = True
                    break
            if has_content:
                out.append(name)
        out.extend(body)
    return "\n".join(out)


def extract_articles(bz2_path: str | Path) -> list[Article]:
    """The real articles of the dump (main namespace, no redirects), cleaned, in dump order."""
    articles = []
    for title, namespace, redirect, wikitext in iter_pages(bz2_path):
        if namespace != 0 or redirect or wikitext.lstrip().lower().startswith("#redirect"):
            continue
        text = clean_article(title, wikitext)
        if len(text) > len(title) + 200:              # skip stubs that are nothing but templates
            articles.append(Article(title, text))
    return articles


def split_articles(articles: list[Article]) -> dict[str, list[Article]]:
    """Deterministic split by article: order by SHA-256 of the title, fill test, then valid, up to their
    share of the characters; everything else is train. Each split keeps the dump order."""
    total = sum(len(a.text) for a in articles)
    order = sorted(range(len(articles)), key=lambda i: hashlib.sha256(articles[i].title.encode()).hexdigest())
    assignment, filled = {}, {"test": 0, "valid": 0}
    for i in order:
        size = len(articles[i].text)
        for split in ("test", "valid"):
            if filled[split] < SPLIT_FRACTIONS[split] * total and filled[split] + size <= 1.25 * SPLIT_FRACTIONS[split] * total:
                assignment[i] = split
                filled[split] += size
                break
        else:
            assignment[i] = "train"
    return {split: [a for i, a in enumerate(articles) if assignment[i] == split] for split in SPLITS}


def _join(articles: list[Article]) -> str:
    return "\n\n".join(a.text for a in articles) + "\n"


def build_wiki_corpus(bz2_path: str | Path, out_dir: str | Path = CORPUS_DIR) -> dict[str, dict]:
    """Extract, clean and split the articles of the dump into ``out_dir/wiki.{split}.txt.xz`` and write
    ``out_dir/LICENSE.md``. Returns per split: articles, characters, words, compressed bytes."""
    import mwparserfromhell  # noqa: PLC0415

    bz2_path, out_dir = Path(bz2_path), Path(out_dir)
    digest = hashlib.sha256(bz2_path.read_bytes()).hexdigest()
    articles = extract_articles(bz2_path)
    if not articles:
        raise ValueError(f"no articles found in {bz2_path}")
    splits = split_articles(articles)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, members in splits.items():
        text = _join(members)
        blob = lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                             preset=9 | lzma.PRESET_EXTREME)
        (out_dir / f"wiki.{split}.txt.xz").write_bytes(blob)
        stats[split] = {"articles": len(members), "characters": len(text), "words": len(text.split()),
                        "xz_bytes": len(blob)}
    (out_dir / "LICENSE.md").write_text(_license_text(splits, stats, digest, mwparserfromhell.__version__),
                                        encoding="utf-8")
    return stats


def _license_text(splits: dict[str, list[Article]], stats: dict[str, dict], digest: str, mw_version: str) -> str:
    lines = [
        "# Bundled Wikipedia corpus: licence and attribution",
        "",
        "The files `wiki.train.txt.xz`, `wiki.valid.txt.xz` and `wiki.test.txt.xz` in this folder contain text from",
        "articles of the English Wikipedia, written by Wikipedia contributors",
        "(the authors of each article are listed in its page history on en.wikipedia.org).",
        "",
        "**Licence:** Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0),",
        "https://creativecommons.org/licenses/by-sa/4.0/ . The text is also available under the GNU Free",
        "Documentation License, as all Wikipedia text. If you redistribute these files or text derived from them,",
        "you must give the same attribution and share alike under the same licence.",
        "This licence covers only these data files, not the code of the package.",
        "",
        "**Source:** the MediaWiki XML dump excerpt",
        f"`{SOURCE_NAME}`",
        f"(SHA-256 `{digest}`), a test file shipped in the `gensim` 4.4.0 wheel",
        "(`gensim/test/test_data/`). The revisions in it date from 2014-2016.",
        "",
        "**Changes:** the text was converted from wikitext to plain text by",
        f"`romer_kernels.data.corpus.build_wiki_corpus` with mwparserfromhell {mw_version} (`strip_code()`):",
        "redirects and non-article pages were skipped; templates, references, tables, math, galleries, images and",
        "category / language links were removed; the sections References, External links, See also, Further",
        "reading, Notes (and similar) were dropped; links were replaced by their displayed text. Case and",
        "punctuation are kept. Each article is one block (title line, then one line per paragraph, heading or",
        "list item), blocks are separated by a blank line. Articles were split deterministically into",
        "train / valid / test by the SHA-256 of their titles (about 90 / 5 / 5 % of the characters).",
        "",
        "| split | articles | characters | words | xz bytes |",
        "|---|---|---|---|---|",
    ]
    for split in SPLITS:
        s = stats[split]
        lines.append(f"| {split} | {s['articles']} | {s['characters']} | {s['words']} | {s['xz_bytes']} |")
    lines += ["", "## Articles", ""]
    for split in SPLITS:
        titles = ", ".join(a.title for a in splits[split])
        lines += [f"**{split}** ({len(splits[split])}): {titles}", ""]
    return "\n".join(lines)


def fetch_source(work_dir: str | Path) -> Path:
    """Download the gensim wheel with pip (no install, no dependencies) and extract the dump file from it."""
    work_dir = Path(work_dir)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    GENSIM_WHEEL_SPEC, "-d", str(work_dir)], check=True)
    wheels = sorted(work_dir.glob("gensim-4.4.0-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip did not download a {GENSIM_WHEEL_SPEC} wheel into {work_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith("/" + SOURCE_NAME)), None)
        if member is None:
            raise FileNotFoundError(f"{SOURCE_NAME} is not in {wheels[0].name}")
        target = work_dir / SOURCE_NAME
        target.write_bytes(wheel.read(member))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m romer_kernels.data.corpus",
                                     description="Show or rebuild the bundled Wikipedia corpus.")
    parser.add_argument("--rebuild", action="store_true", help="regenerate the corpus assets")
    parser.add_argument("--source", type=Path, help=f"local {SOURCE_NAME} (default: pip download gensim 4.4.0)")
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="output folder (default: the package assets)")
    args = parser.parse_args(argv)
    if not args.rebuild:
        for split in SPLITS:
            text = load_corpus(split)
            print(f"{split}: {len(text)} characters, {len(text.split())} words, "
                  f"{text.count(chr(10) + chr(10)) + 1} articles ({corpus_path(split)})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source if args.source is not None else fetch_source(tmp)
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        if digest != SOURCE_SHA256:
            print(f"warning: {source} has SHA-256 {digest}, not the expected {SOURCE_SHA256}", file=sys.stderr)
        stats = build_wiki_corpus(source, args.out)
    for split, s in stats.items():
        print(f"{split}: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
