"""`earlybert prep tokenizer`: train a BERT-style WordPiece tokenizer.json with `tokenizers`.

Same inputs as `earlybert prep` (read by readers.py and parsed by encode.parse_unit, so the
tokenizer sees exactly the lines that will be tokenized). Special tokens come first:
[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
"""

import multiprocessing as mp
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from common import outputs
from common.outputs import atomic_write
from common.progress import progress_bar
from data_prep import stops
from data_prep.encode import parse_unit
from data_prep.readers import InputError, Source, describe_skipped, discover, local_paths, read_units

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokenizer_path(output) -> Path:
    """--output: a tokenizer.json to write, or a directory to write one into."""
    output = Path(output)
    return output / "tokenizer.json" if output.is_dir() else output


def corpus_lines(sources: list[Source], text_field: str = "text", progress: bool = False):
    """Every line of every document. The trainer counts words as it reads, so the progress of the
    reading is that of the counting; the vocabulary computed afterwards reports none."""
    with progress_bar("tokenizer: reading the corpus", sum(s.size for s in sources), "B", enabled=progress) as bar:
        for i, source in enumerate(sources):
            for unit in read_units(i, source, 1 << 20, text_field):
                for doc in parse_unit(unit, text_field)[0]:
                    yield from doc
                bar.update(unit.nbytes)


def train_wordpiece(
    inputs: list[str],
    output,
    vocab_size: int = 30522,
    lowercase: bool = False,
    min_frequency: int = 2,
    text_field: str = "text",
    progress: bool = False,
) -> Tokenizer:
    """Train on `inputs` and write the tokenizer to `output` (a file). The output is checked before the training
    (common/outputs.py): not an input, not a special file, in a directory that can be written.

    The training runs in a worker process that this one terminates on Ctrl-C or SIGTERM: inside
    train_from_iterator neither is ever handled (its Rust loop swallows the KeyboardInterrupt raised in the
    iterator and trains on; tried), and a thread left in it aborts the interpreter at exit."""
    skipped = []
    sources = discover(inputs, skipped)
    if skipped:
        print(f"warning: {describe_skipped(skipped)}", file=sys.stderr)
    outputs.check_output(output, local_paths(inputs, sources))
    outputs.sweep_files(output)
    args = (inputs, sources, vocab_size, lowercase, min_frequency, text_field, progress)
    with stops.start_pool(mp.get_context("fork"), 1) as pool:  # leaving it terminates the worker
        tok = Tokenizer.from_str(pool.apply_async(_train, args).get())
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda f: f.write(tok.to_str().encode()))
    return tok


def _train(inputs, sources, vocab_size, lowercase, min_frequency, text_field, progress) -> str:
    """The trained tokenizer's JSON."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # strip_accents=None follows `lowercase`, as in BERT's uncased models.
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    seen = 0

    def lines():
        nonlocal seen
        for line in corpus_lines(sources, text_field, progress):
            seen += 1
            yield line

    tok.train_from_iterator(lines(), trainer)
    if not seen:
        raise InputError(f"no text in {' '.join(inputs)}: cannot train a tokenizer on an empty corpus")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok.to_str()
