"""vLLM integration: UnifiedCacheConnectorV1."""
