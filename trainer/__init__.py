"""trainer: stream packprep shards into variable-length (per-document) attention training of Hugging Face causal LMs."""
