#!/usr/bin/env python3
"""Existing Kafka clients against rill's Kafka listener (issue 9).

Run by scripts/kafka-clients.sh against the real `rill serve --kafka-listen ...`; one
invocation is one phase for one client:

    kafka_clients.py CLIENT PHASE --bootstrap HOST:PORT --state FILE [--cli-json FILE]

CLIENT is `kafka-python` or `confluent-kafka` (librdkafka). Phases, in the order the script
runs them (the state file carries what was produced from one phase to the next):

  main    CreateTopics (3 partitions); 10,000 keyed messages from idempotent producers, one
          producer per codec (none, gzip, snappy, lz4, zstd: 2,000 each, one codec after the
          other); every delivery report must succeed. A consumer group member (subscribe)
          reads them back: every (key, value) exactly once, at the offset its delivery report
          gave, per-key order = production order; it commits, and the committed offsets must
          be the partitions' ends. A raw Fetch then checks the stored batches: valid CRCs,
          a producer id on every batch, gap-free sequences, and each compressed producer's
          batches back compressed (in its codec, or in LZ4 where rill stores it so).
  resume  (after a server restart) the committed offsets survived; 1,000 more messages
          (200 per codec); a new member of the same group must read exactly those 1,000,
          starting at the committed offsets; commit; the raw Fetch check over all 11,000.
  admin   DeleteTopics removes a scratch topic (it leaves the metadata, and Metadata for it
          answers UNKNOWN_TOPIC_OR_PARTITION); producing to the deleted, now unknown, topic
          fails within a deadline instead of hanging.
  cli     compares `rill consume TOPIC --from-beginning --format json` output (--cli-json)
          with everything delivered: the same (partition, offset, key, value, header) set.

Each phase prints one `kafka-clients: ...` summary line and exits 0 only if every check
passed (1 on a failed check, with the reason on stderr).
"""

import argparse
import collections
import importlib
import json
import logging
import os
import socket
import struct
import sys
import time

CLIENTS = ("kafka-python", "confluent-kafka")
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
# Kafka's codec numbers in a record batch's attributes.
CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
PARTITIONS = 3
MAIN_PER_CODEC = 2_000
RESUME_PER_CODEC = 200
KEYS = 97
HEADER = "codec"

# Deadlines (seconds). Generous: the server is a debug build on a shared 2-core machine.
PRODUCE_DEADLINE = 120
CONSUME_DEADLINE = 180
# After the expected count arrived, keep polling this long to catch extras and duplicates.
CONSUME_QUIET = 3.0
ADMIN_TIMEOUT = 30
UNKNOWN_TOPIC_TIMEOUT_MS = 5_000
UNKNOWN_TOPIC_OR_PARTITION = 3  # Kafka's error code
# A produce to an unknown topic must have failed by then (its client timeout plus slack).
UNKNOWN_TOPIC_DEADLINE = 30


class CheckFailed(Exception):
    """A check of this script failed; the message says which and why."""


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def key_of(seq):
    return "k%02d" % (seq % KEYS)


def value_of(client, codec, seq):
    return "%s:%s:%06d" % (client, codec, seq)


def seq_of(value):
    return int(value.rsplit(":", 1)[1])


def messages_for(client, first_seq, per_codec):
    """Per codec, in production order, the (key, value) pairs; values are globally unique."""
    out = {}
    seq = first_seq
    for codec in CODECS:
        batch = []
        for _ in range(per_codec):
            batch.append((key_of(seq), value_of(client, codec, seq)))
            seq += 1
        out[codec] = batch
    return out


# ---------------------------------------------------------------------------------------
# The two clients behind one small interface.
# ---------------------------------------------------------------------------------------


class Consumed:
    """One consumed record."""

    __slots__ = ("partition", "offset", "key", "value", "headers", "timestamp_ms")

    def __init__(self, partition, offset, key, value, headers, timestamp_ms):
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers
        self.timestamp_ms = timestamp_ms


def text(raw):
    return None if raw is None else raw.decode("utf-8")


class KafkaPythonClient:
    name = "kafka-python"

    def __init__(self, bootstrap):
        importlib.import_module("kafka")  # fail early and clearly when missing

        self.bootstrap = bootstrap

    def admin(self):
        from kafka import KafkaAdminClient

        return KafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id="rill-kafka-clients", request_timeout_ms=ADMIN_TIMEOUT * 1000
        )

    def create_topic(self, topic, partitions):
        admin = self.admin()
        try:
            admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": 1}})
        finally:
            admin.close()

    def delete_topic(self, topic):
        admin = self.admin()
        try:
            admin.delete_topics([topic], timeout_ms=ADMIN_TIMEOUT * 1000)
        finally:
            admin.close()

    def topics(self):
        admin = self.admin()
        try:
            return set(admin.list_topics())
        finally:
            admin.close()

    def describe(self, topic):
        """The broker's Metadata for one topic, as kafka-python's admin describes it."""
        admin = self.admin()
        try:
            described = admin.describe_topics([topic])
        finally:
            admin.close()
        check(len(described) == 1, "describe_topics(%s) returned %r" % (topic, described))
        return described[0]

    def partition_count(self, topic):
        described = self.describe(topic)
        check(described["error_code"] == 0, "metadata of %s: error code %d" % (topic, described["error_code"]))
        return len(described["partitions"])

    def metadata_error(self, topic):
        """The error code the broker's Metadata gives for one topic (0: none)."""
        return self.describe(topic)["error_code"]

    def produce(self, topic, codec, pairs):
        """Produces (key, value) pairs with an idempotent producer; returns per pair the
        (partition, offset) of its delivery report, and the producer id."""
        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id="rill-kafka-clients-%s" % codec,
            enable_idempotence=True,  # explicit: kafka-python raises rather than silently turning it off
            acks="all",
            compression_type=None if codec == "none" else codec,
            linger_ms=5,
            max_block_ms=30_000,
            request_timeout_ms=30_000,
            delivery_timeout_ms=PRODUCE_DEADLINE * 1000,
        )
        try:
            check(
                producer._transaction_manager is not None,
                "kafka-python turned idempotence off (broker version seen: %s)" % (producer.config["api_version"],),
            )
            futures = []
            for key, value in pairs:
                futures.append(
                    producer.send(topic, key=key.encode(), value=value.encode(), headers=[(HEADER, codec.encode())])
                )
            producer.flush(timeout=PRODUCE_DEADLINE)
            delivered = []
            for (key, value), future in zip(pairs, futures):
                check(future.is_done, "no delivery report for %s after flush" % value)
                check(future.succeeded(), "delivery of %s failed: %r" % (value, future.exception))
                meta = future.value
                delivered.append((meta.partition, meta.offset))
            pid = producer._transaction_manager.producer_id_and_epoch.producer_id
            check(pid >= 0, "the idempotent producer has no producer id (InitProducerId) after flush")
            return delivered, pid
        finally:
            producer.close(timeout=10)

    def consumer(self, topic, group):
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id="rill-kafka-clients-consumer",
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            request_timeout_ms=30_000,
        )
        consumer.subscribe([topic])
        return KafkaPythonConsumer(consumer, topic)

    def committed(self, topic, group):
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False, request_timeout_ms=30_000
        )
        try:
            return {p: consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
        finally:
            consumer.close(autocommit=False)

    def produce_unknown(self, topic):
        """Produces one message to a topic that does not exist; returns the error."""
        from kafka import KafkaProducer

        # kafka-python logs an error per metadata refresh of the missing topic (every 100ms).
        logging.getLogger("kafka.cluster").setLevel(logging.CRITICAL)
        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=True,
            allow_auto_create_topics=False,
            max_block_ms=UNKNOWN_TOPIC_TIMEOUT_MS,
            request_timeout_ms=UNKNOWN_TOPIC_TIMEOUT_MS,
            delivery_timeout_ms=UNKNOWN_TOPIC_TIMEOUT_MS + 1_000,
        )
        try:
            try:
                future = producer.send(topic, key=b"k", value=b"v")
                producer.flush(timeout=UNKNOWN_TOPIC_DEADLINE)
            except Exception as error:  # the documented failure: send() times out on metadata
                return "%s: %s" % (type(error).__name__, error)
            if future.is_done and future.failed():
                return "%s: %s" % (type(future.exception).__name__, future.exception)
            if future.is_done:
                return None  # delivered: the caller reports the failure
            return "no delivery report"
        finally:
            producer.close(timeout=5)


class KafkaPythonConsumer:
    def __init__(self, consumer, topic):
        self.consumer = consumer
        self.topic = topic

    def poll(self, timeout_s):
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        out = []
        for tp, records in batches.items():
            check(tp.topic == self.topic, "consumed from unexpected topic %s" % tp.topic)
            for r in records:
                headers = [(k, text(v)) for k, v in (r.headers or [])]
                out.append(Consumed(r.partition, r.offset, text(r.key), text(r.value), headers, r.timestamp))
        return out

    def commit(self):
        self.consumer.commit()

    def assignment(self):
        return sorted(tp.partition for tp in self.consumer.assignment())

    def close(self):
        self.consumer.close(autocommit=False)


class ConfluentClient:
    name = "confluent-kafka"

    def __init__(self, bootstrap):
        importlib.import_module("confluent_kafka")  # fail early and clearly when missing

        self.bootstrap = bootstrap

    def conf(self, **extra):
        conf = {"bootstrap.servers": self.bootstrap, "client.id": "rill-kafka-clients"}
        conf.update(extra)
        return conf

    def admin(self):
        from confluent_kafka.admin import AdminClient

        return AdminClient(self.conf())

    def create_topic(self, topic, partitions):
        from confluent_kafka.admin import NewTopic

        admin = self.admin()  # kept until the result arrived: its destruction fails the futures
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)],
            operation_timeout=ADMIN_TIMEOUT,
            request_timeout=ADMIN_TIMEOUT,
        )
        futures[topic].result(timeout=ADMIN_TIMEOUT)

    def delete_topic(self, topic):
        admin = self.admin()
        futures = admin.delete_topics([topic], operation_timeout=ADMIN_TIMEOUT, request_timeout=ADMIN_TIMEOUT)
        futures[topic].result(timeout=ADMIN_TIMEOUT)

    def topics(self):
        return set(self.admin().list_topics(timeout=ADMIN_TIMEOUT).topics)

    def partition_count(self, topic):
        meta = self.admin().list_topics(topic=topic, timeout=ADMIN_TIMEOUT)
        t = meta.topics.get(topic)
        check(t is not None, "metadata has no topic %s" % topic)
        check(t.error is None, "metadata of %s: %s" % (topic, t.error))
        return len(t.partitions)

    def metadata_error(self, topic):
        """The error code the broker's Metadata gives for one topic (0: none)."""
        meta = self.admin().list_topics(topic=topic, timeout=ADMIN_TIMEOUT)
        t = meta.topics.get(topic)
        check(t is not None, "metadata has no entry for %s" % topic)
        return 0 if t.error is None else t.error.code()

    def produce(self, topic, codec, pairs):
        from confluent_kafka import Producer

        producer = Producer(
            self.conf(
                **{
                    "client.id": "rill-kafka-clients-%s" % codec,
                    "enable.idempotence": True,
                    "acks": "all",
                    "compression.type": codec,
                    "linger.ms": 5,
                    "message.timeout.ms": PRODUCE_DEADLINE * 1000,
                }
            )
        )
        reports = {}

        def on_delivery(err, msg):
            reports[msg.value().decode()] = (err, msg.partition(), msg.offset())

        for key, value in pairs:
            while True:
                try:
                    producer.produce(
                        topic,
                        key=key.encode(),
                        value=value.encode(),
                        headers=[(HEADER, codec.encode())],
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)  # the local queue is full: serve delivery reports
            producer.poll(0)
        left = producer.flush(PRODUCE_DEADLINE)
        check(left == 0, "%d messages still undelivered after flush(%ds)" % (left, PRODUCE_DEADLINE))
        delivered = []
        for key, value in pairs:
            check(value in reports, "no delivery report for %s" % value)
            err, partition, offset = reports[value]
            check(err is None, "delivery of %s failed: %s" % (value, err))
            delivered.append((partition, offset))
        # librdkafka does not expose its producer id; the raw Fetch check reads it from the batches.
        return delivered, None

    def consumer(self, topic, group):
        from confluent_kafka import Consumer

        consumer = Consumer(
            self.conf(
                **{
                    "client.id": "rill-kafka-clients-consumer",
                    "group.id": group,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": 10_000,
                    "heartbeat.interval.ms": 1_000,
                }
            )
        )
        consumer.subscribe([topic])
        return ConfluentConsumer(consumer, topic)

    def committed(self, topic, group):
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(self.conf(**{"group.id": group, "enable.auto.commit": False}))
        try:
            parts = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=ADMIN_TIMEOUT)
            out = {}
            for tp in parts:
                check(tp.error is None, "committed offset of %s[%d]: %s" % (topic, tp.partition, tp.error))
                out[tp.partition] = tp.offset if tp.offset >= 0 else None
            return out
        finally:
            consumer.close()

    def produce_unknown(self, topic):
        from confluent_kafka import Producer

        producer = Producer(
            self.conf(
                **{
                    "enable.idempotence": True,
                    "allow.auto.create.topics": False,
                    # Mark a topic the broker does not know as such after 1s (default 30s),
                    # so the delivery report says unknown topic rather than timed out.
                    "topic.metadata.propagation.max.ms": 1_000,
                    "message.timeout.ms": UNKNOWN_TOPIC_TIMEOUT_MS,
                }
            )
        )
        reports = []
        try:
            producer.produce(topic, key=b"k", value=b"v", on_delivery=lambda err, msg: reports.append(err))
        except Exception as error:
            return "%s: %s" % (type(error).__name__, error)
        producer.flush(UNKNOWN_TOPIC_DEADLINE)
        if not reports:
            return "no delivery report"
        return None if reports[0] is None else "KafkaError: %s" % reports[0].str()


class ConfluentConsumer:
    def __init__(self, consumer, topic):
        self.consumer = consumer
        self.topic = topic

    def poll(self, timeout_s):
        out = []
        deadline = time.monotonic() + timeout_s
        # consume() returns at most num_messages; take what is there within the timeout.
        while True:
            left = deadline - time.monotonic()
            msgs = self.consumer.consume(num_messages=1000, timeout=max(0.0, left))
            for m in msgs:
                if m.error() is not None:
                    raise CheckFailed("consumer error: %s" % m.error().str())
                check(m.topic() == self.topic, "consumed from unexpected topic %s" % m.topic())
                headers = [(k, text(v)) for k, v in (m.headers() or [])]
                out.append(
                    Consumed(m.partition(), m.offset(), text(m.key()), text(m.value()), headers, m.timestamp()[1])
                )
            if not msgs or out or time.monotonic() >= deadline:
                return out

    def commit(self):
        self.consumer.commit(asynchronous=False)

    def assignment(self):
        return sorted(tp.partition for tp in self.consumer.assignment())

    def close(self):
        self.consumer.close()


def make_client(name, bootstrap):
    return {"kafka-python": KafkaPythonClient, "confluent-kafka": ConfluentClient}[name](bootstrap)


# ---------------------------------------------------------------------------------------
# Raw Fetch (v4): the stored batches as any client receives them.
# ---------------------------------------------------------------------------------------


def _string(s):
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, fmt):
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def string(self):
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos : self.pos + n].decode()
        self.pos += n
        return s

    def bytes(self):
        n = self.take(">i")
        if n < 0:
            return None
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b


def _recv_exact(sock, n):
    chunks = []
    while n > 0:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise CheckFailed("raw fetch: the server closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def raw_fetch(sock, correlation_id, topic, partition, offset):
    """One Fetch v4 for one partition; returns (error_code, high_watermark, record bytes)."""
    body = struct.pack(">iiiib", -1, 500, 1, 4 << 20, 0)  # replica, max wait, min bytes, max bytes, isolation
    body += (
        struct.pack(">i", 1) + _string(topic) + struct.pack(">i", 1) + struct.pack(">iqi", partition, offset, 1 << 20)
    )
    header = struct.pack(">hhi", 1, 4, correlation_id) + _string("rill-kafka-clients-raw")
    request = header + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    r = Reader(_recv_exact(sock, size))
    check(r.take(">i") == correlation_id, "raw fetch: wrong correlation id")
    r.take(">i")  # throttle_time_ms
    check(r.take(">i") == 1, "raw fetch: expected one topic in the response")
    check(r.string() == topic, "raw fetch: wrong topic in the response")
    check(r.take(">i") == 1, "raw fetch: expected one partition in the response")
    part, error, high, _last_stable = r.take(">ihqq")
    check(part == partition, "raw fetch: wrong partition in the response")
    aborted = r.take(">i")
    for _ in range(max(aborted, 0)):
        r.take(">qq")
    return error, high, r.bytes() or b""


def wire_check(bootstrap, topic, expected_records):
    """Reads every batch of the topic with raw Fetch v4 requests and checks it; returns a
    summary dict (codec counts, batches, producer ids)."""
    from kafka.record import MemoryRecords

    host, port = bootstrap.rsplit(":", 1)
    codecs = collections.Counter()
    producers = set()
    batches = 0
    records = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        correlation = 0
        for partition in range(PARTITIONS):
            offset = 0
            # (producer id, epoch) -> next expected sequence in this partition
            sequences = {}
            high = None
            while high is None or offset < high:
                correlation += 1
                error, high, data = raw_fetch(sock, correlation, topic, partition, offset)
                check(error == 0, "raw fetch %s[%d] at %d: error code %d" % (topic, partition, offset, error))
                memory = MemoryRecords(data)
                progressed = False
                while True:
                    batch = memory.next_batch()
                    if batch is None:
                        break
                    if batch.next_offset <= offset:
                        continue  # a batch before the requested offset (Kafka sends whole batches)
                    where = "%s[%d] batch at offset %d" % (topic, partition, batch.base_offset)
                    check(batch.magic == 2, "%s: magic %d" % (where, batch.magic))
                    check(batch.validate_crc(), "%s: CRC mismatch" % where)
                    check(batch.base_offset == offset, "%s: expected base offset %d" % (where, offset))
                    check(batch.producer_id >= 0, "%s: no producer id (the producer was not idempotent)" % where)
                    pid = (batch.producer_id, batch.producer_epoch)
                    expected_seq = sequences.get(pid, 0)
                    check(
                        batch.base_sequence == expected_seq,
                        "%s: producer %d epoch %d sequence %d, expected %d"
                        % (where, pid[0], pid[1], batch.base_sequence, expected_seq),
                    )
                    sequences[pid] = batch.last_sequence + 1
                    # Decompresses and decodes every record; the header names the codec the
                    # producer of the record was configured with.
                    decoded = list(batch)
                    count = len(decoded)
                    check(
                        count == batch.records_count,
                        "%s: %d records decoded of %d" % (where, count, batch.records_count),
                    )
                    produced = {dict(r.headers).get(HEADER, b"?").decode() for r in decoded}
                    check(len(produced) == 1, "%s: records of producers with codecs %s" % (where, produced))
                    fetched = CODEC_NAMES.get(batch.compression_type, str(batch.compression_type))
                    codecs[(produced.pop(), fetched)] += 1
                    producers.add(pid)
                    batches += 1
                    records += count
                    offset = batch.next_offset
                    progressed = True
                check(
                    progressed or offset >= high,
                    "raw fetch %s[%d] at %d returned no batch" % (topic, partition, offset),
                )
    check(records == expected_records, "raw fetch of %s: %d records, expected %d" % (topic, records, expected_records))
    # A batch comes back in the codec it was produced with, or in LZ4, the codec rill stores
    # gzip, snappy and zstd sections in (docs/protocol.md); or uncompressed where the client
    # sent it so (kafka-python sends a batch uncompressed when compressing did not shrink it).
    mapping = {"%s->%s" % pair: n for pair, n in sorted(codecs.items())}
    wrong = [pair for pair in codecs if pair[1] not in (pair[0], "lz4", "none")]
    check(not wrong, "raw fetch of %s: batches came back in an unexpected codec: %s" % (topic, mapping))
    for codec in CODECS:
        if codec != "none":
            check(
                any(produced == codec and fetched != "none" for produced, fetched in codecs),
                "raw fetch of %s: no %s-producer batch came back compressed: %s" % (topic, codec, mapping),
            )
    return {"batches": batches, "batches_per_codec": mapping, "producers": len(producers)}


# ---------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------


def produce_all(client, topic, by_codec):
    """Produces each codec's messages with its own producer, one codec after the other;
    returns {value: [partition, offset, key, codec]} and the producer ids seen."""
    delivered = {}
    pids = []
    for codec in CODECS:
        pairs = by_codec[codec]
        offsets, pid = client.produce(topic, codec, pairs)
        pids.append(pid)
        for (key, value), (partition, offset) in zip(pairs, offsets):
            check(0 <= partition < PARTITIONS, "%s delivered to partition %d" % (value, partition))
            check(offset >= 0, "%s delivered with offset %d" % (value, offset))
            delivered[value] = [partition, offset, key, codec]
    places = collections.Counter((p, o) for p, o, _, _ in delivered.values())
    dup = [place for place, n in places.items() if n > 1]
    check(not dup, "delivery reports give the same (partition, offset) to several messages: %s" % dup[:5])
    return delivered, pids


def consume_expected(client, topic, group, expected, start_offsets, started_ms):
    """Consumes with a new group member until every expected message arrived, then a quiet
    period; checks exactly-once, offsets, headers, order; commits. Returns the per-partition
    end (last consumed offset + 1) and the number of records read."""
    consumer = client.consumer(topic, group)
    seen = {}
    order = collections.defaultdict(list)  # partition -> offsets in consumption order
    key_seqs = collections.defaultdict(list)  # key -> seqs in consumption order
    key_partition = {}
    try:
        deadline = time.monotonic() + CONSUME_DEADLINE
        quiet_until = None
        while True:
            now = time.monotonic()
            if quiet_until is not None and now >= quiet_until:
                break
            check(
                now < deadline,
                "consumed %d of %d messages within %ds (group %s, assignment %s)"
                % (len(seen), len(expected), CONSUME_DEADLINE, group, consumer.assignment()),
            )
            for r in consumer.poll(0.5):
                check(
                    r.value in expected, "unexpected message %r at %s[%d]@%d" % (r.value, topic, r.partition, r.offset)
                )
                check(
                    r.value not in seen,
                    "%r consumed twice (at offsets %s and %d)" % (r.value, seen.get(r.value), r.offset),
                )
                partition, offset, key, codec = expected[r.value]
                check(r.key == key, "%r has key %r, produced with %r" % (r.value, r.key, key))
                check(
                    (r.partition, r.offset) == (partition, offset),
                    "%r consumed at %d@%d, delivery report said %d@%d"
                    % (r.value, r.partition, r.offset, partition, offset),
                )
                check(
                    r.headers == [(HEADER, codec)],
                    "%r has headers %r, expected [(%r, %r)]" % (r.value, r.headers, HEADER, codec),
                )
                check(
                    started_ms - 60_000 <= r.timestamp_ms <= int(time.time() * 1000) + 60_000,
                    "%r has timestamp %d, produced at about %d" % (r.value, r.timestamp_ms, started_ms),
                )
                seen[r.value] = r.offset
                order[r.partition].append(r.offset)
                key_seqs[r.key].append(seq_of(r.value))
                check(
                    key_partition.setdefault(r.key, r.partition) == r.partition,
                    "key %s consumed from partitions %d and %d" % (r.key, key_partition[r.key], r.partition),
                )
            if quiet_until is None and len(seen) == len(expected):
                quiet_until = time.monotonic() + CONSUME_QUIET
        for partition, offsets in order.items():
            check(offsets == sorted(offsets), "partition %d consumed out of offset order" % partition)
            first = start_offsets.get(partition, 0)
            check(
                offsets[0] == first,
                "partition %d: first offset consumed %d, expected %d" % (partition, offsets[0], first),
            )
        for key, seqs in key_seqs.items():
            check(seqs == sorted(seqs), "key %s consumed out of production order: %s" % (key, seqs[:20]))
        consumer.commit()
    finally:
        consumer.close()
    ends = {p: max(offsets) + 1 for p, offsets in order.items()}
    return ends, len(seen)


def check_committed(client, topic, group, ends, when):
    committed = client.committed(topic, group)
    for partition in range(PARTITIONS):
        want = ends.get(partition)
        check(
            committed.get(partition) == want,
            "%s: committed offset of %s[%d] for group %s is %r, expected %r"
            % (when, topic, partition, group, committed.get(partition), want),
        )
    return committed


def load_state(path):
    with open(path) as f:
        return json.load(f)


def save_state(path, state):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def topic_for(client_name):
    return "kc-" + client_name


def phase_main(client, args):
    topic = topic_for(client.name)
    group = topic + "-group"
    started_ms = int(time.time() * 1000)
    t0 = time.monotonic()
    client.create_topic(topic, PARTITIONS)
    count = client.partition_count(topic)
    check(count == PARTITIONS, "topic %s has %d partitions after CreateTopics(%d)" % (topic, count, PARTITIONS))

    by_codec = messages_for(client.name, 0, MAIN_PER_CODEC)
    delivered, pids = produce_all(client, topic, by_codec)
    check(len(delivered) == MAIN_PER_CODEC * len(CODECS), "delivered %d messages" % len(delivered))

    ends, consumed = consume_expected(client, topic, group, delivered, {}, started_ms)
    high = {}
    for p, o, _, _ in delivered.values():
        high[p] = max(high.get(p, 0), o + 1)
    check(ends == high, "consumed up to %s, delivery reports end at %s" % (ends, high))
    check_committed(client, topic, group, ends, "after commit")
    wire = wire_check(args.bootstrap, topic, len(delivered))

    save_state(
        args.state,
        {"client": client.name, "topic": topic, "group": group, "committed": ends, "main": delivered, "resume": {}},
    )
    print(
        "kafka-clients: %s main ok: topic %s (%d partitions), produced %d (%d per codec %s, idempotent%s), "
        "consumed %d exactly once with group %s, committed %s; raw fetch: %d batches %s, %d producer ids; %.1fs"
        % (
            client.name,
            topic,
            PARTITIONS,
            len(delivered),
            MAIN_PER_CODEC,
            "/".join(CODECS),
            "" if pids[0] is None else ", producer ids %s" % pids,
            consumed,
            group,
            fmt_offsets(ends),
            wire["batches"],
            wire["batches_per_codec"],
            wire["producers"],
            time.monotonic() - t0,
        )
    )


def fmt_offsets(offsets):
    return "{%s}" % ", ".join("%s: %s" % (p, offsets[p]) for p in sorted(offsets, key=int))


def phase_resume(client, args):
    state = load_state(args.state)
    topic, group = state["topic"], state["group"]
    committed_before = {int(p): o for p, o in state["committed"].items()}
    started_ms = int(time.time() * 1000)
    t0 = time.monotonic()
    check_committed(client, topic, group, committed_before, "after the restart")

    first_seq = len(state["main"])
    by_codec = messages_for(client.name, first_seq, RESUME_PER_CODEC)
    delivered, _pids = produce_all(client, topic, by_codec)
    clash = [v for v, (p, o, _, _) in delivered.items() if o < committed_before.get(p, 0)]
    check(not clash, "new messages delivered below the committed offsets (data overwritten?): %s" % clash[:5])

    ends, consumed = consume_expected(client, topic, group, delivered, committed_before, started_ms)
    check(consumed == RESUME_PER_CODEC * len(CODECS), "resumed consumer read %d messages" % consumed)
    all_high = dict(committed_before)
    for p, o, _, _ in delivered.values():
        all_high[p] = max(all_high.get(p, 0), o + 1)
    check_committed(client, topic, group, all_high, "after the resumed commit")
    wire = wire_check(args.bootstrap, topic, len(state["main"]) + len(delivered))

    state["resume"] = delivered
    state["committed"] = all_high
    save_state(args.state, state)
    print(
        "kafka-clients: %s resume ok: committed offsets %s survived the restart, produced %d more, "
        "a new member of %s read exactly those %d from the committed offsets, committed %s; "
        "raw fetch: %d batches %s; %.1fs"
        % (
            client.name,
            fmt_offsets(committed_before),
            len(delivered),
            group,
            consumed,
            fmt_offsets(all_high),
            wire["batches"],
            wire["batches_per_codec"],
            time.monotonic() - t0,
        )
    )


def wait_until(what, condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        check(time.monotonic() < deadline, "%s: not within %ds" % (what, timeout_s))
        time.sleep(0.2)


def phase_admin(client, args):
    t0 = time.monotonic()
    topic = topic_for(client.name) + "-scratch"
    client.create_topic(topic, 1)
    wait_until("created topic %s in the metadata" % topic, lambda: topic in client.topics(), 10)
    offsets, _ = client.produce(topic, "none", [("k", "scratch-%d" % i) for i in range(10)])
    check(len(offsets) == 10, "scratch produce")
    client.delete_topic(topic)
    wait_until("deleted topic %s gone from the metadata" % topic, lambda: topic not in client.topics(), 10)
    code = client.metadata_error(topic)
    check(
        code == UNKNOWN_TOPIC_OR_PARTITION,
        "Metadata for the deleted topic %s: error code %d, expected %d" % (topic, code, UNKNOWN_TOPIC_OR_PARTITION),
    )

    t1 = time.monotonic()
    error = client.produce_unknown(topic)
    took = time.monotonic() - t1
    check(error is not None, "a produce to the deleted topic %s succeeded" % topic)
    check(took <= UNKNOWN_TOPIC_DEADLINE, "a produce to the deleted topic took %.1fs to fail" % took)
    print(
        "kafka-clients: %s admin ok: DeleteTopics removed %s (Metadata: UNKNOWN_TOPIC_OR_PARTITION); "
        "a produce to it then failed after %.1fs with %s; %.1fs"
        % (client.name, topic, took, error, time.monotonic() - t0)
    )


def phase_cli(client, args):
    state = load_state(args.state)
    expected = dict(state["main"])
    expected.update(state["resume"])
    got = {}
    with open(args.cli_json) as f:
        for n, line in enumerate(f, 1):
            record = json.loads(line)
            value = record["value"]
            check(value not in got, "rill consume printed %r twice (line %d)" % (value, n))
            got[value] = record
    check(
        len(got) == len(expected),
        "rill consume printed %d records of %s, %d were delivered" % (len(got), state["topic"], len(expected)),
    )
    for value, (partition, offset, key, codec) in expected.items():
        r = got.get(value)
        check(r is not None, "rill consume did not print %r" % value)
        check(
            (r["partition"], r["offset"], r["key"]) == (partition, offset, key),
            "rill consume printed %r at %d@%d key %r, delivered at %d@%d key %r"
            % (value, r["partition"], r["offset"], r["key"], partition, offset, key),
        )
        check(
            r["headers"] == [{"key": HEADER, "value": codec}],
            "rill consume printed %r with headers %r" % (value, r["headers"]),
        )
    print(
        "kafka-clients: %s cli ok: rill consume %s --from-beginning printed all %d records at the delivered "
        "partitions/offsets with their keys, values and headers" % (client.name, state["topic"], len(got))
    )


PHASES = {"main": phase_main, "resume": phase_resume, "admin": phase_admin, "cli": phase_cli}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("client", choices=CLIENTS)
    parser.add_argument("phase", choices=sorted(PHASES))
    parser.add_argument("--bootstrap", required=True, help="the Kafka listener, HOST:PORT")
    parser.add_argument("--state", required=True, help="file carrying what was produced between phases")
    parser.add_argument("--cli-json", help="output of `rill consume TOPIC --from-beginning --format json` (phase cli)")
    args = parser.parse_args()
    if args.phase == "cli" and not args.cli_json:
        parser.error("phase cli needs --cli-json")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    client = make_client(args.client, args.bootstrap)
    try:
        PHASES[args.phase](client, args)
    except CheckFailed as failure:
        print("kafka-clients: %s %s FAILED: %s" % (args.client, args.phase, failure), file=sys.stderr)
        return 1
    except Exception as error:  # a client exception is a failed check too, with its type
        print(
            "kafka-clients: %s %s FAILED: %s: %s" % (args.client, args.phase, type(error).__name__, error),
            file=sys.stderr,
        )
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
