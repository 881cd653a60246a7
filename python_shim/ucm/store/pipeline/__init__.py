"""UCM's UcmPipelineStore (`ucm.store.pipeline.connector`), over this package's engine."""
