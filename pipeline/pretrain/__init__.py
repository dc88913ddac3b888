"""Pre-training (`earlybert train`): its config, the shard loader, the head warm-up, the loop."""
