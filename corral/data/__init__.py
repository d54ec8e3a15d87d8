"""Data for training: text sources and their documents (readers), the token-shard format (shards) and
tokenizing sources into cached shards (tokenize). ``corral.train`` reads shards from here; nothing here
imports ``corral.train``.
"""
