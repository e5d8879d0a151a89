"""Kafka-driven streaming training and delta sync to Redis."""
