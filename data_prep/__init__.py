"""Offline corpus preparation: raw text -> tokenized, memory-mapped BERT pre-training shards.

`earlybert prep` (data_prep.cli) writes the shards; `ShardDataset` reads them back.
"""

from data_prep.shards import ShardDataset, ShardError

__all__ = ["ShardDataset", "ShardError"]
