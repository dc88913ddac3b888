"""`earlybert prep tokenizer`: train a BERT-style WordPiece tokenizer.json with `tokenizers`.

Same inputs as `earlybert prep` (read by readers.py and parsed by encode.parse_unit, so the
tokenizer sees exactly the lines that will be tokenized). Special tokens come first:
[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
"""

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from data_prep.encode import parse_unit
from data_prep.progress import progress_bar
from data_prep.readers import InputError, discover, read_units
from data_prep.shards import atomic_write

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus_lines(inputs: list[str], text_field: str = "text", progress: bool = False):
    """Every line of every document. The trainer counts words as it reads, so the progress of the
    reading is that of the counting; the vocabulary computed afterwards reports none."""
    sources = discover(inputs)
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
        for line in corpus_lines(inputs, text_field, progress):
            seen += 1
            yield line

    tok.train_from_iterator(lines(), trainer)
    if not seen:
        raise InputError(f"no text in {' '.join(inputs)}: cannot train a tokenizer on an empty corpus")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    atomic_write(output, lambda f: f.write(tok.to_str().encode()))
    return tok
