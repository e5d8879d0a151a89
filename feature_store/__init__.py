"""Feature schema, offline data sets (Parquet) and online features (Redis)."""
