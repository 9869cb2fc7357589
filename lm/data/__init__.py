"""Documents (`sources`, `documents`), packing (`pack`, `pipeline`, own process) and the
trainer's grain reader of the packs (`packed`, `grain_pipeline`)."""
