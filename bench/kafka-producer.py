#!/usr/bin/env python3
"""Producer benchmark over the Kafka protocol with confluent-kafka (librdkafka).

Produces N messages of S bytes with acks=all and enable.idempotence=true to any broker that
speaks the Kafka protocol (rill's Kafka listener, `rill serve --kafka-listen HOST:PORT`, or
a Kafka broker for comparison), RUNS times, and prints per run and as medians: messages/s,
MB/s (payload bytes, 10^6) and the delivery latency p50/p99 (librdkafka's per-message
latency: produce() call to delivery report). Output: one JSON object, then one markdown
table row.

    target/kafka-venv/bin/python bench/kafka-producer.py --bootstrap 127.0.0.1:9092 \\
        --messages 200000 --size 100 --linger-ms 5 --batch-size 1000000 --runs 3

The topic is created (CreateTopics, --partitions) if it does not exist. Values are random
bytes (incompressible); with --keys K, message i has key i mod K, else no key (librdkafka
then spreads messages over partitions). A warm-up of --warmup messages (not measured) runs
first so that connections, the producer id and metadata are in place.
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka-protocol broker HOST:PORT")
    p.add_argument("--topic", default="bench-kafka-producer")
    p.add_argument("--partitions", type=int, default=3, help="partitions if the topic is created")
    p.add_argument("--messages", type=int, default=200_000, help="messages per run (N)")
    p.add_argument("--size", type=int, default=100, help="value size in bytes (S)")
    p.add_argument("--keys", type=int, default=0, help="distinct keys (0: no key)")
    p.add_argument("--linger-ms", type=float, default=5, help="librdkafka linger.ms")
    p.add_argument("--batch-size", type=int, default=1_000_000, help="librdkafka batch.size (bytes)")
    p.add_argument("--compression", default="none", choices=["none", "gzip", "snappy", "lz4", "zstd"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10_000, help="unmeasured messages before the runs")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may take before it fails")
    args = p.parse_args()
    if args.messages < 1 or args.size < 0 or args.runs < 1 or args.keys < 0 or args.warmup < 0:
        p.error("--messages and --runs must be >= 1; --size, --keys, --warmup >= 0")
    return args


def ensure_topic(args):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    meta = admin.list_topics(timeout=30)
    if args.topic in meta.topics and meta.topics[args.topic].error is None:
        return False
    futures = admin.create_topics(
        [NewTopic(args.topic, num_partitions=args.partitions, replication_factor=1)],
        operation_timeout=30,
        request_timeout=30,
    )
    futures[args.topic].result(timeout=30)
    return True


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(round(q / 100.0 * len(sorted_values) + 0.5 - 1e-9)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def produce(producer, args, count, payloads, keys):
    """Produces `count` messages; returns (seconds, latencies in ms, errors)."""
    latencies = []
    errors = []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(err)
        else:
            latencies.append(msg.latency() * 1000.0)

    npay = len(payloads)
    start = time.perf_counter()
    for i in range(count):
        key = keys[i % len(keys)] if keys else None
        while True:
            try:
                producer.produce(args.topic, value=payloads[i % npay], key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)  # local queue full: serve delivery reports
        if i % 1000 == 0:
            producer.poll(0)
    left = producer.flush(args.timeout)
    seconds = time.perf_counter() - start
    if left:
        errors.append("%d messages undelivered after %.0fs" % (left, args.timeout))
    return seconds, latencies, errors


def main():
    args = parse_args()
    from confluent_kafka import Producer, libversion

    created = ensure_topic(args)
    rnd = os.urandom(args.size * 64 + 64)
    payloads = [rnd[i * 64 : i * 64 + args.size] for i in range(64)]
    keys = [b"key-%d" % k for k in range(args.keys)]
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "client.id": "rill-bench-kafka-producer",
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": args.linger_ms,
            "batch.size": args.batch_size,
            "compression.type": args.compression,
            "message.timeout.ms": int(args.timeout * 1000),
        }
    )
    if args.warmup:
        _, _, errors = produce(producer, args, args.warmup, payloads, keys)
        if errors:
            print("warm-up failed: %s" % errors[:3], file=sys.stderr)
            return 1

    runs = []
    for _ in range(args.runs):
        seconds, lat, errors = produce(producer, args, args.messages, payloads, keys)
        if errors:
            print("run failed: %d delivery errors, first %s" % (len(errors), errors[:3]), file=sys.stderr)
            return 1
        if len(lat) != args.messages:
            print("run failed: %d delivery reports for %d messages" % (len(lat), args.messages), file=sys.stderr)
            return 1
        lat.sort()
        runs.append(
            {
                "seconds": round(seconds, 3),
                "msgs_per_s": round(args.messages / seconds, 1),
                "mb_per_s": round(args.messages * args.size / seconds / 1e6, 3),
                "p50_ms": round(percentile(lat, 50), 3),
                "p99_ms": round(percentile(lat, 99), 3),
                "max_ms": round(lat[-1], 3),
            }
        )
    producer.flush(10)

    median = {k: statistics.median(r[k] for r in runs) for k in ("msgs_per_s", "mb_per_s", "p50_ms", "p99_ms")}
    result = {
        "bootstrap": args.bootstrap,
        "topic": args.topic,
        "topic_created": created,
        "librdkafka": libversion()[0],
        "messages": args.messages,
        "size": args.size,
        "keys": args.keys,
        "linger_ms": args.linger_ms,
        "batch_size": args.batch_size,
        "compression": args.compression,
        "acks": "all",
        "idempotence": True,
        "runs": runs,
        "median": median,
    }
    print(json.dumps(result))
    print(
        "| confluent-kafka %s | %d × %d B | linger %g ms, batch %d B, %s "
        "| %.0f msg/s | %.2f MB/s | %.2f ms | %.2f ms |"
        % (
            libversion()[0],
            args.messages,
            args.size,
            args.linger_ms,
            args.batch_size,
            args.compression,
            median["msgs_per_s"],
            median["mb_per_s"],
            median["p50_ms"],
            median["p99_ms"],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
