"""Redis parameter shards, row cache, scorer and HTTP service."""
