"""Produces N messages with the official Pulsar Python client and prints their message ids
as JSON: [[ledger, entry, batch_index], ...]. Usage: produce.py URL TOPIC N BATCHING(0|1)."""
import json
import sys

import pulsar

url, topic, n, batching = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
client = pulsar.Client(url, operation_timeout_seconds=15)
producer = client.create_producer(topic, batching_enabled=batching, batching_max_publish_delay_ms=5)
ids = [None] * n


def done(i):
    def cb(res, msg_id):
        if res != pulsar.Result.Ok:
            raise SystemExit(f"send {i} failed: {res}")
        ids[i] = [msg_id.ledger_id(), msg_id.entry_id(), msg_id.batch_index()]
    return cb


if batching:
    for i in range(n):
        producer.send_async(f"msg-{i}".encode(), done(i))
    producer.flush()
else:
    for i in range(n):
        m = producer.send(f"msg-{i}".encode())
        ids[i] = [m.ledger_id(), m.entry_id(), m.batch_index()]
producer.close()
client.close()
if any(x is None for x in ids):
    raise SystemExit("some sends were not acknowledged")
print(json.dumps(ids))
