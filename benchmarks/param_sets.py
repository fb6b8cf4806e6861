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


def resnet50_shapes(classes=1000):
    """The trained parameters of ResNet-50 v1 (Gluon's model zoo order): 53 convolutions
    without bias, 53 BatchNorm gamma/beta pairs (running statistics are not trained) and the
    classifier: 161 tensors, 25.6M parameters."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for blocks, out in zip((3, 4, 6, 3), (256, 512, 1024, 2048)):
        mid = out // 4
        for block in range(blocks):
            shapes += [(mid, channels, 1, 1), (mid,), (mid,),
                       (mid, mid, 3, 3), (mid,), (mid,),
                       (out, mid, 1, 1), (out,), (out,)]
            if block == 0:  # the projection shortcut
                shapes += [(out, channels, 1, 1), (out,), (out,)]
            channels = out
    shapes += [(classes, channels), (classes,)]
    return shapes


PARAM_SETS = {
    "bert-base": lambda: bert_shapes(),
    "bert-large": lambda: bert_shapes(layers=24, hidden=1024, ffn=4096),
    "resnet-50": lambda: resnet50_shapes(),
    "200x768": lambda: [(768,)] * 200,
}
