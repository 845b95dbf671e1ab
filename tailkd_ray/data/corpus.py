"""The embedded default corpus and tokenizer: text every Python installation ships (DESIGN §6).

- ``pydoc_data.topics``: the interpreter's own reference documentation (~0.5 MB of English);
- the standard library's ``.py`` sources (~13 MB of code and docstrings).

Nothing is downloaded. ``write_builtin_corpus`` writes them as plain text files (one document per file)
and ``train_bpe_tokenizer`` trains a byte-level BPE tokenizer on them with HF ``tokenizers``.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterable, Optional

from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def builtin_documents(max_bytes: Optional[int] = None) -> Iterable[tuple[str, str]]:
    """Yield (name, text) documents: every pydoc topic, then standard-library sources in sorted order."""
    total = 0
    for name in sorted(topics):
        yield f"pydoc_{name}", topics[name]
        total += len(topics[name])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2:-1] or path.name.startswith("test"):
            continue
        if max_bytes is not None and total >= max_bytes:
            return
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are latin-1 test fixtures; not worth a document
        total += len(text)
        yield "stdlib_" + "_".join(path.relative_to(stdlib).with_suffix("").parts), text


def write_builtin_corpus(out_dir: str | Path, max_bytes: Optional[int] = None, val_every: int = 20) -> tuple[Path, Path]:
    """Write the built-in corpus as ``out_dir/train/*.txt`` and ``out_dir/val/*.txt`` (every
    ``val_every``-th document goes to validation). Returns the two directories."""
    out = Path(out_dir)
    train_dir, val_dir = out / "train", out / "val"
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(builtin_documents(max_bytes)):
        target = val_dir if i % val_every == val_every - 1 else train_dir
        (target / f"{name}.txt").write_text(text, encoding="utf-8")
    return train_dir, val_dir


def train_bpe_tokenizer(files: list[str | Path], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE tokenizer on ``files`` and save it as a HF fast tokenizer in ``out_dir``.

    Returns the ``PreTrainedTokenizerFast``; ``EOS_TOKEN`` is its eos (and pad) token.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    fast.save_pretrained(str(out_dir))
    return fast
