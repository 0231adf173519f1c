"""Converting a Hugging Face checkpoint into a modelc checkpoint (mapping, casting, sharding)."""
