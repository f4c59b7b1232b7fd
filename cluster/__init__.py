"""Kafka broker launcher, topic admin and the Ray cluster helper and YAML."""
