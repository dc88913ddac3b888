"""EarlyBERT, the method: the early-bird detector, the search stage, the pruner. No DeepSpeed here."""
