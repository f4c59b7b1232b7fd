"""Pure core of vapipe: message schema and codecs, detector wrapper, crop and count logic.

Nothing in this package imports Kafka or Ray, so every stage can be tested by
calling its core directly.
"""
