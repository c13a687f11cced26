"""Rebuild the bundled sample corpus and its tokenizer from PyPI downloads, deterministically.

Output (under `data/sample/` by default):
  en/c4-train.00000-of-00001.json.gz       C4's file format: one {"text", "timestamp", "url"} per line
  en/c4-validation.00000-of-00001.json.gz  held-out whole articles (no overlap with train)
  tokenizer/spiece.model                   SentencePiece unigram, T5 ids (pad 0, eos 1, unk 2, no bos)

Sources (both fetched with `pip download --no-deps`, never installed):
  * gensim 4.4.0 wheel: a shortened English Wikipedia dump (CC BY-SA 3.0). Wiki markup is
    stripped by the small regex cleaner below: a full parser (mwparserfromhell) would be one more
    dependency for a stand-in corpus, and gensim's own filter would need gensim installed.
  * sentencepiece 0.2.3 sdist: `test/botchan.txt`, Natsume's *Botchan* in the 1919 English
    translation (public domain; the Project Gutenberg header and licence are stripped).

Every step is deterministic (sorted inputs, fixed timestamps in the gzip header, a single-threaded
SentencePiece trainer), so a rebuild reproduces the sha256 sums in `data/sample/README.md`.

Usage: python scripts/build_sample_corpus.py [--out data/sample] [--downloads DIR]
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
SENTENCEPIECE_VERSION = "0.2.3"
BOTCHAN_MEMBER = f"sentencepiece-{SENTENCEPIECE_VERSION}/test/botchan.txt"
BOTCHAN_URL = "https://www.gutenberg.org/ebooks/8868"
BOTCHAN_TIMESTAMP = "2012-10-14T00:00:00Z"

TARGET_DOC_CHARS = 900
VALIDATION_EVERY_NTH_ARTICLE = 10
VOCAB_SIZE = 8192
DROPPED_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
}


@dataclass
class Document:
    text: str
    timestamp: str
    url: str


def download(requirement: str, dest: Path, binary: bool) -> Path:
    """`pip download` one distribution; the wheel or sdist file is returned."""
    kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", kind, requirement, "-d", str(dest)],
        check=True,
    )
    name = requirement.split("==")[0]
    suffix = ".whl" if binary else ".tar.gz"
    return next(p for p in sorted(dest.iterdir()) if p.name.startswith(name) and p.name.endswith(suffix))


def remove_nested(text: str, opening: str, closing: str) -> str:
    """Remove balanced `opening ... closing` spans (templates and tables nest in wiki markup)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opening, i):
            depth += 1
            i += len(opening)
        elif depth and text.startswith(closing, i):
            depth -= 1
            i += len(closing)
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def strip_wiki_markup(markup: str) -> str:
    text = html.unescape(markup)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight)[^>]*>.*?</\1>", "", text, flags=re.S)
    text = remove_nested(text, "{{", "}}")
    text = remove_nested(text, "{|", "|}")
    # Links: innermost first, so captions of [[File:...]] that contain links are resolved before
    # the file link itself is dropped.
    inner_link = re.compile(r"\[\[([^\[\]]*)\]\]")
    while True:
        def replace(match: re.Match) -> str:
            target, _, label = match.group(1).partition("|")
            if re.match(r"\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", target, re.I):
                return ""
            return label.split("|")[-1] if label else target
        replaced = inner_link.sub(replace, text)
        if replaced == text:
            break
        text = replaced
    text = re.sub(r"\[https?://[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\]]*\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    return text


def wiki_paragraphs(text: str) -> list[str]:
    """Body paragraphs of a cleaned article; reference-like sections, lists' bullets and
    leftover table/template debris are dropped."""
    paragraphs, dropped = [], False
    for raw in re.split(r"\n\s*\n|\n(?=[=*#:;])|(?<=\n)(?==)", text):
        for line in raw.split("\n"):
            line = line.strip()
            heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
            if heading:
                dropped = heading.group(2).lower() in DROPPED_SECTIONS
                continue
            if dropped or not line or line[0] in "|!{}":
                continue
            line = re.sub(r"^[*#:;]+\s*", "", line)
            line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
            line = re.sub(r"[ \t]{2,}", " ", line).strip()
            if len(line) >= 40 and re.search(r"[.!?\"')]$", line):
                paragraphs.append(line)
    return paragraphs


def group_paragraphs(paragraphs: list[str]) -> list[str]:
    """Consecutive paragraphs joined until a document reaches about TARGET_DOC_CHARS."""
    documents, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p) for p in current) >= TARGET_DOC_CHARS:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def wiki_articles(wheel: Path) -> list[list[Document]]:
    with zipfile.ZipFile(wheel) as archive:
        compressed = archive.read(WIKI_MEMBER)
    digest = hashlib.sha256(compressed).hexdigest()
    if digest != WIKI_SHA256:
        raise SystemExit(f"{WIKI_MEMBER} has sha256 {digest}, expected {WIKI_SHA256}")
    xml = bz2.decompress(compressed).decode("utf-8")
    articles = []
    for page in re.findall(r"<page>(.*?)</page>", xml, flags=re.S):
        if "<redirect" in page or re.search(r"<ns>(\d+)</ns>", page).group(1) != "0":
            continue
        title = html.unescape(re.search(r"<title>(.*?)</title>", page).group(1))
        timestamp = re.search(r"<timestamp>(.*?)</timestamp>", page).group(1)
        markup = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S).group(1)
        url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
        documents = group_paragraphs(wiki_paragraphs(strip_wiki_markup(markup)))
        if documents:
            articles.append([Document(text, timestamp, url) for text in documents])
    return articles


def botchan_documents(sdist: Path) -> list[Document]:
    """The novel without the Project Gutenberg header/licence, cut into ~TARGET_DOC_CHARS pieces
    at sentence ends (the file has lost its blank lines, so paragraphs are not recoverable)."""
    with tarfile.open(sdist) as archive:
        raw = archive.extractfile(BOTCHAN_MEMBER).read().decode("utf-8-sig")
    lines = raw.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("End of Project Gutenberg"))
    body = [line.strip() for line in lines[start:end] if line.strip() and not line.startswith("Produced by")]
    documents, current = [], []
    for line in body:
        current.append(line)
        if sum(len(c) for c in current) >= TARGET_DOC_CHARS and re.search(r"[.!?\"']$", line):
            documents.append(Document(" ".join(current), BOTCHAN_TIMESTAMP, BOTCHAN_URL))
            current = []
    if current:
        documents.append(Document(" ".join(current), BOTCHAN_TIMESTAMP, BOTCHAN_URL))
    return documents


def write_shard(path: Path, documents: list[Document]) -> None:
    """gzip with mtime 0 and no file name in the header, so the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(
        json.dumps({"text": d.text, "timestamp": d.timestamp, "url": d.url}, ensure_ascii=False) + "\n"
        for d in documents
    ).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(payload)


def train_tokenizer(documents: list[Document], model_file: Path) -> None:
    """Trained in memory: a file prefix would be recorded in the model and change its bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for d in documents for line in d.text.split("\n")]),
        model_writer=model,
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model_file.write_bytes(model.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "sample")
    parser.add_argument("--downloads", type=Path, default=None, help="reuse a folder of downloads")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        downloads = args.downloads or Path(tmp)
        downloads.mkdir(parents=True, exist_ok=True)
        wheel = download(f"gensim=={GENSIM_VERSION}", downloads, binary=True)
        sdist = download(f"sentencepiece=={SENTENCEPIECE_VERSION}", downloads, binary=False)
        articles = wiki_articles(wheel)
        novel = botchan_documents(sdist)

    validation = [d for i, a in enumerate(articles) if i % VALIDATION_EVERY_NTH_ARTICLE == 1 for d in a]
    train = [d for i, a in enumerate(articles) if i % VALIDATION_EVERY_NTH_ARTICLE != 1 for d in a] + novel
    write_shard(args.out / "en" / "c4-train.00000-of-00001.json.gz", train)
    write_shard(args.out / "en" / "c4-validation.00000-of-00001.json.gz", validation)
    train_tokenizer(train, args.out / "tokenizer" / "spiece.model")

    print(f"{len(articles)} articles, {len(train)} train documents, {len(validation)} validation documents")
    print(f"train characters {sum(len(d.text) for d in train):,}, validation {sum(len(d.text) for d in validation):,}")
    for path in sorted(args.out.rglob("*")):
        if path.is_file() and path.name != "README.md":
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"{digest}  {path.relative_to(args.out)}  ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
