"""Shells around the pure core: Kafka clients, the consumer loop, and the stage workers.

Workers here are plain classes; ``actors.launcher`` turns them into Ray actors at
launch time, so every stage can also be run and tested without Ray.
"""
