"""Evaluation text: the packaged English corpus, a local .txt file, or a hub data set (online users).

The packaged default is real English Wikipedia: ``standard_cal_data/wiki.utf8`` from the PyPI
package exllamav2 (MIT; the text is Wikipedia's, CC BY-SA), 2.1 MB in WikiExtractor's format. We keep
the 1,095 articles that have a body (the other 1,254 entries are bare titles): 1.8 MB, about
292,000 words, a little more than WikiText-2's test split (245,000). No package that installs
offline ships WikiText-2 itself; users online get it with ``--dataset wikitext2``. We read the file without importing exllamav2 (its import needs its CUDA
extension), so it is installed with ``--no-deps``.

Perplexity text is never calibration text: nothing in this project calibrates on this file.
Calibration (``compress fff-distill``) reads the same package's ``c4.utf8`` instead: 118 web pages
from C4 (53,600 words), a different source from the Wikipedia articles that ``eval`` reports on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .models import first_line, hub_reachable, package_folder

DEFAULT_TEXT_PACKAGE = "exllamav2"
DEFAULT_TEXT_DISTRIBUTION = "exllamav2==0.3.2"
DEFAULT_TEXT_FILE = "conversion/standard_cal_data/wiki.utf8"
DEFAULT_TEXT_NAME = "Wikipedia sample (exllamav2 0.3.2 standard_cal_data/wiki.utf8)"
CALIBRATION_FILE = "conversion/standard_cal_data/c4.utf8"
CALIBRATION_NAME = "C4 sample (exllamav2 0.3.2 standard_cal_data/c4.utf8)"

# Short names for the hub data sets users ask for most: (repository, config, split).
HUB_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "test"),
}
DOCUMENT = re.compile(r"<doc [^>]*>\n(.*?)</doc>", re.DOTALL)
JOIN = "\n\n"  # how rows / documents are joined before tokenizing (the GPTQ / llama.cpp convention)


@dataclass
class Text:
    """A named evaluation text: what was read and from where, for the report."""

    name: str
    source: str
    documents: list[str]

    @property
    def joined(self) -> str:
        return JOIN.join(self.documents)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "documents": len(self.documents),
            "characters": len(self.joined),
            "joined_with": JOIN,
        }


def default_text() -> Text:
    """The packaged Wikipedia sample, one document per article, or a UserError saying how to install it."""
    path = _packaged_file(DEFAULT_TEXT_FILE, "no --text given and the default evaluation text is not installed", "--text FILE")
    documents = [body.strip() for body in DOCUMENT.findall(path.read_text(encoding="utf-8"))]
    return Text(DEFAULT_TEXT_NAME, str(path), [doc for doc in documents if "\n" in doc])  # title + body


def calibration_text(path: Path | None = None) -> Text:
    """``--calib FILE``, else the packaged C4 sample (one web page per line); never the evaluation text."""
    if path is not None:
        return file_text(path, "--calib")
    packaged = _packaged_file(CALIBRATION_FILE, "no --calib given and the default calibration text is not installed", "--calib FILE")
    lines = [line.strip() for line in packaged.read_text(encoding="utf-8").splitlines()]
    return Text(CALIBRATION_NAME, str(packaged), [line for line in lines if line])


def _packaged_file(relative: str, problem: str, alternative: str) -> Path:
    folder = package_folder(DEFAULT_TEXT_PACKAGE)
    if folder is None:
        raise UserError(f"{problem}: pip install --no-deps {DEFAULT_TEXT_DISTRIBUTION} (or pass {alternative})")
    path = folder / relative
    if not path.is_file():
        raise UserError(f"the package {DEFAULT_TEXT_PACKAGE} is installed but holds no {relative}")
    return path


def file_text(path: Path, option: str = "--text") -> Text:
    """A local UTF-8 text file, read as one document."""
    if not path.exists():
        raise UserError(f"{option} '{path}' does not exist")
    if not path.is_file():
        raise UserError(f"{option} '{path}' is not a file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{option} '{path}' is not UTF-8 text") from None
    if not content.strip():
        raise UserError(f"{option} '{path}' is empty")
    return Text(path.name, str(path.resolve()), [content])


def hub_text(name: str, config: str | None = None, split: str | None = None, column: str = "text") -> Text:
    """A hub data set's split, its ``column`` rows joined as the field does (needs `datasets` and a network)."""
    repository, default_config, default_split = HUB_DATASETS.get(name, (name, None, "test"))
    config, split = config or default_config, split or default_split
    label = f"{repository}" + (f" ({config})" if config else "") + f", split {split}"
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset needs the `datasets` package: pip install datasets (or pass --text FILE)") from None
    if not hub_reachable():
        raise UserError(f"cannot fetch {label}: the Hugging Face Hub cannot be reached; pass --text FILE instead")
    try:
        rows = datasets.load_dataset(repository, config, split=split)[column]
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise UserError(f"cannot load {label}: {first_line(error)}") from None
    return Text(label, f"hf://datasets/{repository}", list(rows))


def special_framing(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] / [SEP], <s>, or none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


def resolve_text(text_file: Path | None, dataset: str | None, dataset_config: str | None = None, split: str | None = None) -> Text:
    """--text FILE, --dataset NAME, or the packaged default."""
    if text_file is not None and dataset is not None:
        raise UserError("give either --text or --dataset, not both")
    if text_file is not None:
        return file_text(text_file)
    if dataset is not None:
        return hub_text(dataset, dataset_config, split)
    return default_text()
