"""Text documents (`sources`) and packed, checkpointable training batches (`pipeline`)."""
