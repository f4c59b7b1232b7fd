"""Against the real broker: the study's producer settings, consumer groups, topic admin, unreachable brokers."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from cluster.clients import make_admin, make_consumer, make_producer
from cluster.topics import create_topics, delete_topics, describe_topics, list_topics
from pipeline.codecs import encode_jpeg
from pipeline.config import KafkaConfig, TopicSpec
from pipeline.errors import BrokerError, TopicError

pytestmark = pytest.mark.kafka


def _poll_all(consumer, want: int, timeout_s: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            got.extend(batch)
    return got


def _big_jpeg(target: int = 300_000) -> bytes:
    rng = np.random.default_rng(0)
    side = 300
    while True:
        data = encode_jpeg(rng.integers(0, 255, (side, side, 3), dtype=np.uint8), 95)
        if len(data) >= target:
            return data
        side += 50


def test_snappy_round_trip_returns_exact_frame_bytes(kafka_bootstrap: str) -> None:
    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    topic = f"rt-{uuid.uuid4().hex[:8]}"
    create_topics(cfg, [TopicSpec(name=topic, partitions=1)])
    frame = _big_jpeg()
    assert len(frame) >= 300_000
    producer = make_producer(cfg)  # snappy, linger_ms=5: the study's settings
    assert producer.config["compression_type"] == "snappy" and producer.config["linger_ms"] == 5
    producer.send(topic, key=b"cam/00000001", value=frame, headers=[("stream_id", b"cam")]).get(timeout=30)
    producer.close()
    consumer = make_consumer(cfg, topic, group_id=f"g-{uuid.uuid4().hex[:8]}")
    try:
        (record,) = _poll_all(consumer, 1)
    finally:
        consumer.close()
    assert record.value == frame
    assert record.key == b"cam/00000001"
    assert dict(record.headers)["stream_id"] == b"cam"


def test_three_consumers_split_six_partitions_without_overlap(kafka_bootstrap: str) -> None:
    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    topic = f"grp-{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:8]}"
    create_topics(cfg, [TopicSpec(name=topic, partitions=6)])
    consumers = [make_consumer(cfg, topic, group_id=group, session_timeout_ms=10000) for _ in range(3)]
    # Each knows the new topic's partitions before it joins. Otherwise the leader assigns nothing at
    # first, and kafka-python's recovery from that was once lost under load ([0, 0, 3] after 60 s;
    # stage workers repair that state with their membership check, a bare consumer does not).
    for c in consumers:
        assert c.partitions_for_topic(topic) == set(range(6))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for c in consumers:
                c.poll(timeout_ms=200)
            sizes = [len(c.assignment()) for c in consumers]
            if sum(sizes) == 6 and all(sizes):
                break
        assignments = [set(c.assignment()) for c in consumers]
    finally:
        for c in consumers:
            c.close()
    assert [len(a) for a in assignments] == [2, 2, 2]
    union = set().union(*assignments)
    assert len(union) == 6 and {tp.partition for tp in union} == set(range(6))


def test_create_topics_is_idempotent_and_checks_replication(kafka_bootstrap: str) -> None:
    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    names = [f"idem-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    specs = [TopicSpec(name=n, partitions=3) for n in names]
    assert set(create_topics(cfg, specs).values()) == {"created"}
    before = describe_topics(cfg, names)
    assert set(create_topics(cfg, specs).values()) == {"exists"}
    assert describe_topics(cfg, names) == before
    assert set(names) <= set(list_topics(cfg))
    with pytest.raises(TopicError, match=r"replication factor 3 needs at least 3 brokers.*has 1"):
        create_topics(cfg, [TopicSpec(name=f"rf-{uuid.uuid4().hex[:6]}", replication_factor=3)])
    assert delete_topics(cfg, names) == names


def test_unreachable_broker_fails_fast_with_its_address() -> None:
    cfg = KafkaConfig(bootstrap_servers="127.0.0.1:1", connect_timeout_s=3)
    with pytest.raises(BrokerError, match=r"127\.0\.0\.1:1 \(waited 3s\)"):  # the bounded wait, not the client's default
        make_admin(cfg)


def test_a_settled_read_waits_for_an_open_transaction_a_committed_read_does_not(kafka_bootstrap: str) -> None:
    """A state restore must not miss a snapshot whose transaction is committing right now."""
    import threading

    from cluster.clients import finish_transaction
    from cluster.reading import read_all

    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    topic = f"settled-{uuid.uuid4().hex[:6]}"
    create_topics(cfg, [TopicSpec(name=topic, partitions=1)])
    producer = make_producer(cfg, transactional_id=f"tx-{topic}")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic, key=b"k", value=b"snapshot").get(timeout=30)
    assert read_all(cfg, topic) == []  # committed-only, up to the open transaction: returns at once
    settled: list[list[bytes]] = []
    reader = threading.Thread(target=lambda: settled.append([r.value for r in read_all(cfg, topic, timeout_s=30, settled=True)]))
    reader.start()
    time.sleep(2)
    assert reader.is_alive(), "a settled read returned while a transaction was open"
    finish_transaction(producer, commit=True)
    reader.join(timeout=30)
    producer.close()
    assert settled == [[b"snapshot"]]


def test_group_lag_counts_records_not_transaction_markers(kafka_bootstrap: str) -> None:
    """A run ends when the crop group's lag on B is zero: a transactional topic fully consumed sits a
    marker short of its end on every partition (lag 0), a few records left uncommitted count each."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from cluster.reading import group_lag

    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    topic, group = f"lag-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
    create_topics(cfg, [TopicSpec(name=topic, partitions=3)])
    producer = make_producer(cfg, transactional_id=f"tx-{topic}")
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(12):  # four records on each partition, one transaction
        producer.send(topic, key=b"k", value=b"v", partition=i % 3)
    producer.commit_transaction()
    assert group_lag(cfg, group, [topic]) == {topic: 12}  # nothing committed yet

    def commit(offsets: dict[int, int]) -> None:
        producer.begin_transaction()
        producer.send_offsets_to_transaction(
            {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}, group
        )
        producer.commit_transaction()

    commit({0: 4, 1: 4, 2: 1})  # partitions 0 and 1 consumed (a marker short of their ends), 2 has 3 left
    assert group_lag(cfg, group, [topic]) == {topic: 3}
    commit({2: 4})
    assert group_lag(cfg, group, [topic]) == {topic: 0}
    producer.close()
    delete_topics(cfg, [topic])


def test_describe_group_names_each_members_partitions_and_the_unowned_ones(kafka_bootstrap: str) -> None:
    from cluster.reading import describe_group

    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    run = uuid.uuid4().hex[:8]
    frames, other = TopicSpec(name=f"t{run}.frames", partitions=6), TopicSpec(name=f"t{run}.other", partitions=2)
    create_topics(cfg, [frames, other])
    group = f"g{run}"
    consumer = make_consumer(cfg, group_id=group, client_id="inter-7")
    consumer.subscribe([other.name])  # a member, but of another topic
    try:
        for _ in range(20):
            consumer.poll(timeout_ms=200)
            if consumer.assignment():
                break
        view = describe_group(cfg, group, frames.name)
    finally:
        consumer.close()
    assert view.state == "Stable" and view.owners == {"inter-7": set()}
    assert view.partitions == view.unowned == set(range(6))
