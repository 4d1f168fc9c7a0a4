"""Evaluation text: the packaged English corpus, a local .txt file, or a hub data set (online users).

The packaged default is real English Wikipedia: ``standard_cal_data/wiki.utf8`` from the PyPI
package exllamav2 (MIT; the text is Wikipedia's, CC BY-SA), 2.1 MB in WikiExtractor's format. We keep
the 1,095 articles that have a body (the other 1,254 entries are bare titles): 1.8 MB, about
292,000 words, a little more than WikiText-2's test split (245,000). No package that installs
offline ships WikiText-2 itself; users online get it with ``--dataset wikitext2``. We read the file without importing exllamav2 (its import needs its CUDA
extension), so it is installed with ``--no-deps``.

Perplexity text is never calibration text: nothing in this project calibrates on this file.
Calibration (``compress rpq --bits``, ``compress fff-distill``) reads the package's other samples instead,
the mix exllamav2 calibrates on less its Wikipedia file: C4 web pages (118 pages, 53,600 words), technical
writing, source code, several languages and children's stories (1.26 MB together, about 3.8 times C4
alone). A mix of kinds of text keeps a conversion from fitting one domain, and it holds GPTQ's usual 128
windows of 2048 tokens (180 for SmolLM2's tokenizer) where C4 alone holds 38, on which fine-tuning learnt
its windows by heart (training KL a third of the held-out one; with the mix, three quarters). Measured on
SmolLM2-135M at 4.5 bits, scored on the Wikipedia sample: 20.34 after fine-tuning against 20.20 with C4
alone, whose English prose is closer to that text; for code, other languages or unknown text, the mix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .sources import first_line, hub_reachable, package_folder

DEFAULT_TEXT_PACKAGE = "exllamav2"
DEFAULT_TEXT_DISTRIBUTION = "exllamav2==0.3.2"
DEFAULT_TEXT_FILE = "conversion/standard_cal_data/wiki.utf8"
DEFAULT_TEXT_NAME = "Wikipedia sample (exllamav2 0.3.2 standard_cal_data/wiki.utf8)"
CALIBRATION_FOLDER = "conversion/standard_cal_data"
# (file, one document per line?): C4 holds a web page per line; the others are one text each.
CALIBRATION_FILES = (("c4.utf8", True), ("technical.utf8", False), ("code.utf8", False), ("multilingual.utf8", False), ("tiny.utf8", False))
CALIBRATION_NAME = "exllamav2 0.3.2 calibration samples (standard_cal_data: c4, technical, code, multilingual, tiny; not wiki)"

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
    """``--calib FILE``, else the packaged calibration samples (C4 a page per line, the others whole); never the evaluation text."""
    if path is not None:
        return file_text(path, "--calib")
    documents: list[str] = []
    for name, by_line in CALIBRATION_FILES:
        packaged = _packaged_file(f"{CALIBRATION_FOLDER}/{name}", "no --calib given and the default calibration text is not installed", "--calib FILE")
        content = packaged.read_text(encoding="utf-8")
        parts = [line.strip() for line in content.splitlines()] if by_line else [content.strip()]
        documents += [part for part in parts if part]
    return Text(CALIBRATION_NAME, str(packaged.parent), documents)


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
