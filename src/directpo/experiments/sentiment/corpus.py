"""The review corpus: reading it (SST's sentence file, or anything `directpo.data` reads), cleaning
its texts, and finding the default one."""
from __future__ import annotations

import re
from pathlib import Path

# SST's tokenisation artefacts and what they stand for
SST_REPLACEMENTS = {"-LRB-": "(", "-RRB-": ")", "\\/": "/", "``": '"', "''": '"'}
SST_HEADER = "sentence_index\tsentence"
SST_RELATIVE_PATH = Path("shared") / "data" / "sst" / "datasetSentences.txt"


def clean_text(text: str) -> str:
    """Undo SST's tokenisation artefacts and mojibake; collapse whitespace."""
    if "Ã" in text:
        try:
            text = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    for artefact, original in SST_REPLACEMENTS.items():
        text = text.replace(artefact, original)
    text = re.sub(r" (['’]s|n't|'re|'ve|'ll|'d|'m|[.,;:!?%)])", r"\1", text)
    text = re.sub(r"([($]) ", r"\1", text)
    text = re.sub(r"<br\s*/?>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def default_corpus() -> str:
    """The SST sentences shipped next to this checkout: `shared/data/sst/datasetSentences.txt` in the
    working directory or a directory above it, else in a directory above this package. Not found:
    a `ConfigError` naming `--corpus` and where it looked (never a silent download from the hub;
    the `paper` preset names its corpus, `stanfordnlp/imdb`, explicitly)."""
    from ...config import ConfigError
    from ..common import find_shared

    here = Path(__file__).resolve()
    found = find_shared(SST_RELATIVE_PATH, here)
    if found is not None:
        return str(found)
    raise ConfigError(f"no corpus: --corpus is not given and SST's sentences ({SST_RELATIVE_PATH}) are not in the "
                      f"working directory {Path.cwd()} or any directory above it, nor above {here.parent}; pass "
                      "--corpus: a text file (SST's datasetSentences.txt), .jsonl/.parquet, or a `datasets` name "
                      "(e.g. stanfordnlp/imdb, downloaded from the hub)")


def read_corpus(spec: str, field: str = "text") -> list[str]:
    """Review texts of a .txt file (SST's `index<TAB>sentence` lines recognised), or of any source
    `directpo.data` reads (the `field` of each row). Empty texts are an error naming the row."""
    if spec.endswith(".txt"):
        return _read_text_file(spec)
    from ...data.formats import DataError, read_records

    texts = []
    for row, record in read_records(spec, "train"):
        if isinstance(record, DataError):
            raise record
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            raise DataError(spec, row, field, "missing or empty: every corpus row needs its review text "
                                              "(choose the field with --corpus-field)", kind="missing")
        texts.append(clean_text(value))
    return texts


def _read_text_file(path: str) -> list[str]:
    """One text per line; SST's header line and index column dropped when present."""
    from ...data.formats import DataError

    if not Path(path).exists():
        raise DataError(path, None, None, "no such file")
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    is_sst = bool(lines) and lines[0].strip() == SST_HEADER
    texts = [line.split("\t", 1)[1] for line in lines[1:]] if is_sst else lines
    return [clean_text(t) for t in texts if t.strip()]
