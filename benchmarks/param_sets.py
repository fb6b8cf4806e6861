"""Parameter shapes of the benchmark models (no weights are downloaded: shapes only)."""


def bert_shapes(layers=12, hidden=768, ffn=3072, vocab=30522, positions=512, types=2):
    """The parameters of BERT pretraining (encoder, pooler, masked-LM head), in Gluon order."""
    shapes = [(vocab, hidden), (positions, hidden), (types, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,), (vocab,)]  # MLM head
    shapes += [(2, hidden), (2,)]  # next-sentence classifier
    return shapes


PARAM_SETS = {
    "bert-base": lambda: bert_shapes(),
    "bert-large": lambda: bert_shapes(layers=24, hidden=1024, ffn=4096),
    "200x768": lambda: [(768,)] * 200,
}
