"""SentencePiece tokenizers: train, load as a seqio vocabulary, measure compression."""
