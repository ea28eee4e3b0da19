"""Client conformance scenarios run with the official Pulsar Python client against a Magnetar
broker. Usage: scenarios.py URL SCENARIO TOPIC_PREFIX. Each scenario asserts what it checks and
prints `ok <scenario>` on success; any failure exits non-zero with the reason."""
import os
import sys
import time
import urllib.request

import pulsar

URL, SCENARIO, PREFIX = sys.argv[1], sys.argv[2], sys.argv[3]
WAIT_MS = 15000
client = pulsar.Client(URL, operation_timeout_seconds=20)


def receive_n(consumer, n, ack=True, timeout_ms=WAIT_MS):
    got = []
    for _ in range(n):
        m = consumer.receive(timeout_millis=timeout_ms)
        got.append(m)
        if ack:
            consumer.acknowledge(m)
    return got


def nothing_more(consumer, ms=700):
    try:
        m = consumer.receive(timeout_millis=ms)
    except pulsar.Timeout:
        return
    raise AssertionError(f"unexpected extra message {m.data()!r} id={m.message_id()}")


def produce(topic, n, batching=False, compression=pulsar.CompressionType.NONE, keys=None, prefix="m"):
    # With keys, batches hold one key each (what Key_Shared needs).
    kind = pulsar.BatchingType.KeyBased if keys else pulsar.BatchingType.Default
    p = client.create_producer(topic, batching_enabled=batching, batching_max_publish_delay_ms=5,
                               compression_type=compression, batching_type=kind)
    ids = []
    if batching:
        errors = []

        def cb(res, _mid):
            if res != pulsar.Result.Ok:
                errors.append(res)
        for i in range(n):
            kw = {"partition_key": keys[i]} if keys else {}
            p.send_async(f"{prefix}-{i}".encode(), cb, **kw)
        p.flush()
        assert not errors, errors
    else:
        for i in range(n):
            kw = {"partition_key": keys[i]} if keys else {}
            ids.append(p.send(f"{prefix}-{i}".encode(), **kw))
    p.close()
    return ids


def bodies(msgs):
    return [m.data().decode() for m in msgs]


def sub_types():
    """Every subscription type, batching off and on: everything produced is received once."""
    n = 120
    for batching in (False, True):
        for name, kind in [("exclusive", pulsar.ConsumerType.Exclusive), ("shared", pulsar.ConsumerType.Shared),
                           ("failover", pulsar.ConsumerType.Failover), ("keyshared", pulsar.ConsumerType.KeyShared)]:
            topic = f"{PREFIX}-{name}-{int(batching)}"
            keys = [f"k{i % 7}" for i in range(n)]
            consumers = [client.subscribe(topic, "s", consumer_type=kind, consumer_name=f"c{j}",
                                          initial_position=pulsar.InitialPosition.Earliest,
                                          receiver_queue_size=10)
                         for j in range(1 if kind == pulsar.ConsumerType.Exclusive else 2)]
            if kind == pulsar.ConsumerType.Exclusive:
                try:
                    client.subscribe(topic, "s", consumer_type=kind)
                    raise AssertionError("a second exclusive consumer was accepted")
                except pulsar.ConsumerBusy:
                    pass
            produce(topic, n, batching=batching, keys=keys)
            seen = {}
            deadline = time.time() + 30
            while len(seen) < n and time.time() < deadline:
                for j, c in enumerate(consumers):
                    try:
                        m = c.receive(timeout_millis=50)
                    except pulsar.Timeout:
                        continue
                    body = m.data().decode()
                    assert body not in seen, f"{name}: {body} delivered twice"
                    seen[body] = (j, m.partition_key())
                    c.acknowledge(m)
            assert len(seen) == n, f"{name} batching={batching}: got {len(seen)} of {n}"
            by_consumer = [sum(1 for v in seen.values() if v[0] == j) for j in range(len(consumers))]
            if kind == pulsar.ConsumerType.Shared and not batching:
                assert all(x > 0 for x in by_consumer), f"shared: one consumer got nothing {by_consumer}"
            if kind == pulsar.ConsumerType.Failover:
                assert sorted(by_consumer) == [0, n], f"failover: both consumers got messages {by_consumer}"
            if kind == pulsar.ConsumerType.KeyShared:
                owner = {}
                for j, key in seen.values():
                    assert owner.setdefault(key, j) == j, f"key {key} went to two consumers"
                assert len(set(owner.values())) == 2, f"key_shared: one consumer got no keys {owner}"
            for c in consumers:
                nothing_more(c, 300)
                c.close()
    # Exclusive delivery keeps the order.
    topic = f"{PREFIX}-order"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    produce(topic, 50, batching=True)
    assert bodies(receive_n(c, 50)) == [f"m-{i}" for i in range(50)]
    c.close()


def compression():
    """Every compression codec the client offers, batched and not."""
    codecs = [pulsar.CompressionType.NONE, pulsar.CompressionType.LZ4, pulsar.CompressionType.ZLib,
              pulsar.CompressionType.ZSTD, pulsar.CompressionType.SNAPPY]
    for codec in codecs:
        for batching in (False, True):
            topic = f"{PREFIX}-{str(codec).split('.')[-1]}-{int(batching)}"
            c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
            p = client.create_producer(topic, batching_enabled=batching, compression_type=codec,
                                       batching_max_publish_delay_ms=5)
            payloads = [(f"payload-{i}-" + "x" * (i * 37 % 900)).encode() for i in range(60)]
            for d in payloads:
                p.send_async(d, lambda r, _m: None)
            p.flush()
            p.close()
            got = [m.data() for m in receive_n(c, len(payloads))]
            assert got == payloads, f"{codec} batching={batching}: payloads differ"
            c.close()


def redelivery():
    """Unacked messages go to another consumer when one closes; a nack comes back with its
    redelivery count; REDELIVER of everything unacked; acked messages never return."""
    topic = f"{PREFIX}-redeliver"
    a = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared, receiver_queue_size=5,
                         initial_position=pulsar.InitialPosition.Earliest)
    produce(topic, 10)
    held = receive_n(a, 5, ack=False)
    b = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared)
    a.close()
    got = receive_n(b, 10)
    assert sorted(bodies(got)) == sorted(f"m-{i}" for i in range(10)), bodies(got)
    redelivered = {m.data().decode(): m.redelivery_count() for m in got}
    for m in held:
        assert redelivered[m.data().decode()] >= 1, f"{m.data()} came back with count 0"
    nothing_more(b)
    b.close()

    topic = f"{PREFIX}-nack"
    c = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared,
                         negative_ack_redelivery_delay_ms=100, initial_position=pulsar.InitialPosition.Earliest)
    produce(topic, 3)
    first = receive_n(c, 3, ack=False)
    c.acknowledge(first[0])
    c.acknowledge(first[2])
    c.negative_acknowledge(first[1])
    again = c.receive(timeout_millis=WAIT_MS)
    assert again.data() == b"m-1" and again.redelivery_count() == 1, (again.data(), again.redelivery_count())
    c.negative_acknowledge(again)
    third = c.receive(timeout_millis=WAIT_MS)
    assert third.data() == b"m-1" and third.redelivery_count() == 2, (third.data(), third.redelivery_count())
    c.acknowledge(third)
    nothing_more(c)
    # Redeliver everything unacknowledged.
    produce(topic, 4, prefix="r")
    receive_n(c, 4, ack=False)
    c.redeliver_unacknowledged_messages()
    back = receive_n(c, 4)
    assert sorted(bodies(back)) == [f"r-{i}" for i in range(4)], bodies(back)
    nothing_more(c)
    c.close()


def dead_letter():
    """After max_redeliver_count nacks a message goes to the dead-letter topic."""
    topic = f"{PREFIX}-dlq"
    dlq = f"{topic}-s-DLQ"
    c = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared,
                         negative_ack_redelivery_delay_ms=100, initial_position=pulsar.InitialPosition.Earliest,
                         dead_letter_policy=pulsar.ConsumerDeadLetterPolicy(max_redeliver_count=2,
                                                                          dead_letter_topic=dlq,
                                                                          initial_subscription_name="dlq-sub"))
    produce(topic, 2)
    counts = []
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            m = c.receive(timeout_millis=1500)
        except pulsar.Timeout:
            break
        if m.data() == b"m-0":
            c.acknowledge(m)
        else:
            counts.append(m.redelivery_count())
            c.negative_acknowledge(m)
    assert counts == [0, 1, 2], f"redelivery counts of the poisoned message: {counts}"
    d = client.subscribe(dlq, "dlq-sub", initial_position=pulsar.InitialPosition.Earliest)
    m = d.receive(timeout_millis=WAIT_MS)
    assert m.data() == b"m-1", m.data()
    d.acknowledge(m)
    d.close()
    c.close()


def cumulative():
    """A cumulative ack covers everything before it, across a reconnect; inside a batch it
    covers part of the batch (batch-index acknowledgement)."""
    topic = f"{PREFIX}-cumulative"
    for batching in (False, True):
        t = f"{topic}-{int(batching)}"
        c = client.subscribe(t, "s", initial_position=pulsar.InitialPosition.Earliest,
                             batch_index_ack_enabled=batching)
        produce(t, 40, batching=batching)
        got = receive_n(c, 40, ack=False)
        c.acknowledge_cumulative(got[24])
        c.close()
        time.sleep(0.3)
        c = client.subscribe(t, "s", batch_index_ack_enabled=batching)
        rest = receive_n(c, 15)
        assert bodies(rest) == [f"m-{i}" for i in range(25, 40)], bodies(rest)
        nothing_more(c)
        c.close()


def seek():
    """Seek by message id and by publish time."""
    topic = f"{PREFIX}-seek"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    ids = produce(topic, 10)
    time.sleep(0.05)
    t_mid = int(time.time() * 1000)
    time.sleep(0.05)
    produce(topic, 10, prefix="late")
    receive_n(c, 20)
    # The broker delivers again from the entry of the id; this client then skips the id
    # itself (its seek by id is exclusive).
    c.seek(ids[4])
    back = receive_n(c, 15)
    assert bodies(back)[:5] == [f"m-{i}" for i in range(5, 10)], bodies(back)
    c.seek(t_mid)
    late = receive_n(c, 10)
    assert bodies(late) == [f"late-{i}" for i in range(10)], bodies(late)
    c.seek(pulsar.MessageId.earliest)
    assert bodies(receive_n(c, 20))[0] == "m-0"
    nothing_more(c)
    c.close()


def readers():
    """Readers from earliest, latest and a given id; has_message_available."""
    topic = f"{PREFIX}-reader"
    ids = produce(topic, 10)
    r = client.create_reader(topic, pulsar.MessageId.earliest)
    assert bodies([r.read_next(WAIT_MS) for _ in range(10)]) == [f"m-{i}" for i in range(10)]
    assert not r.has_message_available()
    r.close()
    r = client.create_reader(topic, ids[3])
    assert r.read_next(WAIT_MS).data() == b"m-4"
    r.close()
    r = client.create_reader(topic, ids[3], start_message_id_inclusive=True)
    assert r.read_next(WAIT_MS).data() == b"m-3"
    r.close()
    latest = client.create_reader(topic, pulsar.MessageId.latest)
    assert not latest.has_message_available()
    produce(topic, 2, prefix="new")
    assert latest.has_message_available()
    assert latest.read_next(WAIT_MS).data() == b"new-0"
    latest.close()
    # Batched: a reader from a message inside a batch.
    bt = f"{topic}-batched"
    produce(bt, 20, batching=True)
    r = client.create_reader(bt, pulsar.MessageId.earliest)
    got = [r.read_next(WAIT_MS) for _ in range(20)]
    assert bodies(got) == [f"m-{i}" for i in range(20)]
    assert not r.has_message_available()
    r.close()


def partitioned():
    """A partitioned topic (created beforehand with 3 partitions): keys spread over partitions,
    everything comes back, message ids name their partition."""
    topic = f"{PREFIX}"
    n = 90
    c = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared,
                         initial_position=pulsar.InitialPosition.Earliest)
    produce(topic, n, keys=[f"key-{i}" for i in range(n)])
    got = receive_n(c, n)
    assert sorted(bodies(got)) == sorted(f"m-{i}" for i in range(n))
    parts = {m.message_id().partition() for m in got}
    assert parts == {0, 1, 2}, parts
    nothing_more(c)
    c.close()


def restart_before():
    """Before a broker restart: produce 100, acknowledge the first 40."""
    topic = f"{PREFIX}-restart"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    produce(topic, 100)
    receive_n(c, 40)
    c.close()


def restart_after():
    """After the restart: exactly the 60 unacknowledged messages come back."""
    topic = f"{PREFIX}-restart"
    c = client.subscribe(topic, "s")
    got = receive_n(c, 60)
    assert bodies(got) == [f"m-{i}" for i in range(40, 100)], bodies(got)[:5]
    nothing_more(c)
    c.close()


def last_message_id():
    """GetLastMessageId through the client (consumer.get_last_message_id)."""
    topic = f"{PREFIX}-last"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    ids = produce(topic, 5)
    last = c.get_last_message_id()
    assert (last.ledger_id(), last.entry_id()) == (ids[-1].ledger_id(), ids[-1].entry_id()), (last, ids[-1])
    c.close()


def key_shared_sticky():
    """Key_Shared in sticky mode: each consumer owns the hash ranges it declares; keys stay
    with their owner; an overlapping range is refused."""
    topic = f"{PREFIX}-sticky"

    def policy(ranges):
        return pulsar.ConsumerKeySharedPolicy(key_shared_mode=pulsar.KeySharedMode.Sticky, sticky_ranges=ranges)
    a = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.KeyShared, consumer_name="a",
                         initial_position=pulsar.InitialPosition.Earliest, key_shared_policy=policy([(0, 32767)]))
    b = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.KeyShared, consumer_name="b",
                         key_shared_policy=policy([(32768, 65535)]))
    try:
        client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.KeyShared, consumer_name="c",
                         key_shared_policy=policy([(100, 200)]))
        raise AssertionError("an overlapping sticky range was accepted")
    except pulsar.PulsarException:
        pass
    n = 100
    produce(topic, n, keys=[f"key-{i % 10}" for i in range(n)])
    owner = {}
    total = 0
    for name, c in (("a", a), ("b", b)):
        for m in receive_all(c, 1000):
            total += 1
            assert owner.setdefault(m.partition_key(), name) == name, f"{m.partition_key()} went to both"
    assert total == n, f"received {total} of {n}"
    assert set(owner.values()) == {"a", "b"}, owner
    a.close()
    b.close()


def failover():
    """Failover: one active consumer (by name); when it closes, the other takes over with
    what the first left unacknowledged, in order."""
    topic = f"{PREFIX}-failover"
    a = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Failover, consumer_name="a",
                         initial_position=pulsar.InitialPosition.Earliest, receiver_queue_size=5)
    b = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Failover, consumer_name="b",
                         receiver_queue_size=5)
    produce(topic, 20)
    first = receive_n(a, 10)
    nothing_more(b, 300)
    a.close()
    rest = receive_n(b, 10)
    assert bodies(first) + bodies(rest) == [f"m-{i}" for i in range(20)], bodies(first) + bodies(rest)
    nothing_more(b)
    b.close()


def receive_all(consumer, quiet_ms=2000):
    got = []
    while True:
        try:
            m = consumer.receive(timeout_millis=quiet_ms)
        except pulsar.Timeout:
            return got
        consumer.acknowledge(m)
        got.append(m)


def restart_after_kill():
    """After a SIGKILL of the broker: every unacknowledged message comes back; acknowledged
    ones may come back only from the last unpersisted moments."""
    topic = f"{PREFIX}-restart"
    c = client.subscribe(topic, "s")
    got = bodies(receive_all(c))
    missing = [i for i in range(40, 100) if f"m-{i}" not in got]
    assert not missing, f"unacknowledged messages lost: {missing}"
    again = [b for b in got if int(b.split("-")[1]) < 40]
    print(f"acknowledged messages delivered again: {len(again)}")
    c.close()


def produce_through_restart():
    """Sends 150 messages, one every 20 ms, while the broker is restarted: every send
    succeeds (the client reconnects and resends)."""
    p = client.create_producer(f"{PREFIX}-live", batching_enabled=False, send_timeout_millis=60000)
    for i in range(150):
        p.send(f"p-{i}".encode())
        time.sleep(0.02)
    p.close()


def consume_through_restart():
    """Everything sent through the restart is there."""
    c = client.subscribe(f"{PREFIX}-live", "check", initial_position=pulsar.InitialPosition.Earliest)
    got = set(bodies(receive_all(c)))
    missing = [i for i in range(150) if f"p-{i}" not in got]
    assert not missing, f"acknowledged sends lost: {missing}"
    c.close()


def terminated():
    """A terminated topic refuses new producers."""
    try:
        p = client.create_producer(PREFIX)
        p.send(b"late")
        raise AssertionError("a terminated topic accepted a message")
    except pulsar.TopicTerminated:
        pass


def spread_produce():
    """200 keyed messages to a partitioned topic whose partitions live on several brokers."""
    produce(PREFIX, 200, keys=[f"key-{i}" for i in range(200)])


def fresh_produce():
    """3 messages to each of 8 topics nobody has looked up yet."""
    for i in range(8):
        produce(f"{PREFIX}-{i}", 3)


def spread_consume():
    """Every message of spread_produce is there (after a broker serving some partitions died)."""
    c = client.subscribe(PREFIX, "check", consumer_type=pulsar.ConsumerType.Shared,
                         initial_position=pulsar.InitialPosition.Earliest)
    got = set(bodies(receive_all(c)))
    missing = [i for i in range(200) if f"m-{i}" not in got]
    assert not missing, f"acknowledged sends lost: {missing}"
    c.close()


def connections_created():
    url = f"http://{os.environ['MAGNETAR_WEB']}/metrics"
    with urllib.request.urlopen(url, timeout=20) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pulsar_connection_created_total_count"):
                return int(line.split()[-1])
    raise AssertionError("no pulsar_connection_created_total_count in /metrics")


def unload_topic(topic):
    url = f"http://{os.environ['MAGNETAR_WEB']}/admin/v2/persistent/public/default/{topic}/unload"
    with urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=20) as r:
        assert r.status in (200, 204), r.status


def unload():
    """An admin unload closes the topic: its producer and consumer are told, look it up again
    and go on where it loads next; the consumer receives what is sent after the unload."""
    topic = f"{PREFIX}-unload"
    c = client.subscribe(topic, "s")
    # The producer on a connection of its own: a send error makes the client drop the whole
    # connection, which would reconnect the consumer whatever the broker told it.
    other = pulsar.Client(URL, operation_timeout_seconds=20)
    p = other.create_producer(topic, batching_enabled=False, send_timeout_millis=30000)
    for i in range(5):
        p.send(f"a-{i}".encode())
    assert bodies(receive_n(c, 5)) == [f"a-{i}" for i in range(5)]
    unload_topic(topic)
    for i in range(5):
        p.send(f"b-{i}".encode())
    # Acknowledgements still on their way at the unload may bring some a-* back first.
    got = []
    while len([b for b in got if b.startswith("b-")]) < 5:
        got += bodies(receive_n(c, 1))
    assert [b for b in got if b.startswith("b-")] == [f"b-{i}" for i in range(5)], got
    c.close()
    p.close()
    other.close()


def unload_while_sending():
    """Unloads a topic while a producer sends to it asynchronously, on the same connection as
    a consumer of another topic: every send succeeds (what the unload interrupted is resent
    after the producer reconnects), every message arrives, and the connection stays up (sends
    the unload cut off get no SEND_ERROR, on which clients drop the whole connection)."""
    topic = f"{PREFIX}-unload-sending"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    bystander = client.subscribe(f"{PREFIX}-bystander", "s")
    p = client.create_producer(topic, batching_enabled=False, send_timeout_millis=30000)
    opened = connections_created()
    assert opened >= 1, opened
    results = []
    n = 400
    for i in range(n):
        p.send_async(f"u-{i}".encode(), lambda res, _mid: results.append(res))
        if i == n // 4:
            unload_topic(topic)
        time.sleep(0.002)
    p.flush()
    failed = [r for r in results if r != pulsar.Result.Ok]
    assert len(results) == n and not failed, f"{len(results)} answered, failed: {failed[:3]} ({len(failed)})"
    got = set()
    while len(got) < n:
        got.add(c.receive(timeout_millis=WAIT_MS).data().decode())
    assert got == {f"u-{i}" for i in range(n)}
    assert connections_created() == opened, "the client had to connect again"
    p.close()
    c.close()
    bystander.close()


def seek_stored_before():
    """Acknowledges 10 messages, then seeks back to the 6th. The broker is killed right after
    the answer; cursor writes wait a minute there, so only the seek's own write counts."""
    topic = f"{PREFIX}-seek-kill"
    c = client.subscribe(topic, "s")
    p = client.create_producer(topic, batching_enabled=False)
    ids = [p.send(f"k-{i}".encode()) for i in range(10)]
    receive_n(c, 10)
    c.seek(ids[5])


def seek_stored_after():
    """After the kill, the subscription is where the seek put it."""
    c = client.subscribe(f"{PREFIX}-seek-kill", "s")
    assert bodies(receive_n(c, 5)) == [f"k-{i}" for i in range(5, 10)]
    nothing_more(c)
    c.close()


def redelivery_order():
    """A consumer that closes with everything unacknowledged: the next one gets it all again in
    publish order, though the oldest entries have left the broker's tail cache (run with a
    1 MB cache) and are read from the bookie while the newest are still in memory, and though
    there are more of them than the broker looks at in one pass. Exclusive, Failover, and
    Key_Shared with one key. (Entries stay cached while a subscription with a consumer has
    not read them: a consumer on another subscription that asks for nothing keeps them.)"""
    n, pad = 1000, "x" * 2000
    for kind in (pulsar.ConsumerType.Exclusive, pulsar.ConsumerType.Failover, pulsar.ConsumerType.KeyShared):
        topic = f"{PREFIX}-order-{kind}"
        idle = client.subscribe(topic, "idle", receiver_queue_size=0,
                                initial_position=pulsar.InitialPosition.Earliest)
        a = client.subscribe(topic, "s", consumer_type=kind, receiver_queue_size=n,
                             initial_position=pulsar.InitialPosition.Earliest)
        p = client.create_producer(topic, batching_enabled=False, max_pending_messages=n)
        for i in range(n):
            p.send_async(f"o-{i}-{pad}".encode(), None, partition_key="k")
        p.flush()
        p.close()
        want = [f"o-{i}" for i in range(n)]
        assert [b.split("-" + pad)[0] for b in bodies(receive_n(a, n, ack=False))] == want
        a.close()
        b = client.subscribe(topic, "s", consumer_type=kind, receiver_queue_size=n)
        again = [m.split("-" + pad)[0] for m in bodies(receive_n(b, n))]
        assert again == want, f"{kind}: redelivered out of order, first differences: " + str(
            [(i, g) for i, (g, w) in enumerate(zip(again, want)) if g != w][:5])
        nothing_more(b)
        b.close()
        idle.close()


def key_shared_sticky_alone():
    """Sticky Key_Shared with only the consumer of the lower half of the hash range connected:
    it gets every message of its keys at once, though messages of keys no consumer owns come
    between them. Those wait, and go in order to their owner when it connects."""
    topic = f"{PREFIX}-sticky-alone"

    def policy(ranges):
        return pulsar.ConsumerKeySharedPolicy(key_shared_mode=pulsar.KeySharedMode.Sticky, sticky_ranges=ranges)
    a = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.KeyShared, consumer_name="a",
                         initial_position=pulsar.InitialPosition.Earliest, key_shared_policy=policy([(0, 32767)]))
    n = 100
    produce(topic, n, keys=[f"key-{i % 10}" for i in range(n)])
    alone = receive_all(a, 1500)
    b = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.KeyShared, consumer_name="b",
                         key_shared_policy=policy([(32768, 65535)]))
    later = receive_all(b, 1500)
    more = receive_all(a, 500)
    assert not more, f"a got {len(more)} of its messages only once b connected: {bodies(more)[:5]}"
    assert alone and later, (len(alone), len(later))
    assert len(alone) + len(later) == n, (len(alone), len(later))
    assert not {m.partition_key() for m in alone} & {m.partition_key() for m in later}
    for got in (alone, later):
        seq = [int(x.split("-")[1]) for x in bodies(got)]
        assert seq == sorted(seq), f"out of order: {seq}"
    a.close()
    b.close()


def foreign_ack():
    """A cumulative ack naming another topic's ledger, whose id lies between two of this
    topic's own, acknowledges nothing: a consumer that connects next gets every message."""
    topic = f"{PREFIX}-foreign"
    # The subscription holds the backlog (a topic without one deletes its closed ledgers).
    client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest).close()
    produce(topic, 5, prefix="f")
    other = produce(f"{PREFIX}-other", 1)[0]
    unload_topic(topic)
    produce(topic, 5, prefix="g")
    c = client.subscribe(topic, "s")
    got = receive_n(c, 10, ack=False)
    assert bodies(got) == [f"f-{i}" for i in range(5)] + [f"g-{i}" for i in range(5)], bodies(got)
    ids = [m.message_id() for m in got]
    assert ids[0].ledger_id() < other.ledger_id() < ids[-1].ledger_id(), (ids[0], other, ids[-1])
    c.acknowledge_cumulative(pulsar.MessageId(-1, other.ledger_id(), other.entry_id(), -1))
    time.sleep(0.5)
    c.close()
    d = client.subscribe(topic, "s")
    again = bodies(receive_n(d, 10))
    assert again == [f"f-{i}" for i in range(5)] + [f"g-{i}" for i in range(5)], again
    nothing_more(d)
    d.close()


def pattern():
    """A pattern (regex) consumer: the topics of the namespace that match, listed through
    GET_TOPICS_OF_NAMESPACE, are all consumed; others are not."""
    import re
    for name in ("pat-a", "pat-b", "other"):
        client.subscribe(f"{PREFIX}-{name}", "s", initial_position=pulsar.InitialPosition.Earliest).close()
        produce(f"{PREFIX}-{name}", 3, prefix=name)
    c = client.subscribe(re.compile(f"persistent://public/default/{PREFIX}-pat-.*"), "s",
                         initial_position=pulsar.InitialPosition.Earliest)
    got = sorted(bodies(receive_n(c, 6)))
    assert got == sorted(f"{t}-{i}" for t in ("pat-a", "pat-b") for i in range(3)), got
    nothing_more(c)
    c.close()

def largest_message():
    """A message of exactly the largest size the broker advertises (5 MiB) is stored and
    delivered whole, and the topic goes on (its stored entry, with metadata, is larger than
    5 MiB, which bookies must take)."""
    topic = f"{PREFIX}-largest"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    p = client.create_producer(topic, batching_enabled=False, send_timeout_millis=20000)
    # The client bounds metadata and payload together: the largest payload it takes.
    size = 5 * 1024 * 1024
    pattern = bytes(range(251)) * (size // 251 + 1)
    while True:
        big = pattern[:size]
        try:
            p.send(big)
            break
        except pulsar.MessageTooBig:
            size -= 1
            assert size > 5 * 1024 * 1024 - 1024, "the client takes nothing near 5 MiB"
    p.send(b"after")
    got = receive_n(c, 2)
    assert got[0].data() == big, len(got[0].data())
    assert got[1].data() == b"after"
    p.close()
    c.close()



def access_modes():
    """Producer access modes (PIP-68): an Exclusive producer keeps others out; a
    WaitForExclusive producer gets the topic once it is free; ExclusiveWithFencing takes it
    from whoever has it, and the producer it took it from can no longer publish."""
    import threading
    Mode = pulsar.ProducerAccessMode
    topic = f"{PREFIX}-access"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)

    def producer(mode, **kw):
        return client.create_producer(topic, access_mode=mode, batching_enabled=False, **kw)

    first = producer(Mode.Exclusive)
    first.send(b"first")
    for mode, error in ((Mode.Shared, pulsar.ProducerBusy), (Mode.Exclusive, pulsar.ProducerFenced)):
        try:
            producer(mode)
            raise AssertionError(f"a {mode} producer was let in next to an exclusive one")
        except error:
            pass
    waited = {}

    def wait():
        waited["p"] = producer(Mode.WaitForExclusive, send_timeout_millis=3000)
    t = threading.Thread(target=wait)
    t.start()
    time.sleep(1.5)
    assert "p" not in waited, "WaitForExclusive got the topic while another producer had it"
    first.close()
    t.join(15)
    assert "p" in waited, "WaitForExclusive never got the topic once it was free"
    second = waited["p"]
    second.send(b"second")
    # A shared producer is kept out while the exclusive one is there.
    try:
        producer(Mode.Shared)
        raise AssertionError("a shared producer was let in next to an exclusive one")
    except pulsar.ProducerBusy:
        pass
    def fenced(p):
        # A fenced producer reconnects with its old epoch and is refused for good.
        for _ in range(20):
            try:
                p.send(b"fenced")
            except Exception:
                return True
            time.sleep(0.2)
        return False
    third = producer(Mode.ExclusiveWithFencing, send_timeout_millis=3000)
    third.send(b"third")
    assert fenced(second), "the fenced producer could still publish"
    # A second fencing producer takes the topic from the first, which does not take it back.
    fourth = producer(Mode.ExclusiveWithFencing)
    fourth.send(b"fourth")
    assert fenced(third), "the producer fenced by another fencing one could still publish"
    fourth.send(b"fourth-again")
    fourth.close()
    got = bodies(receive_n(c, 5))
    assert got == ["first", "second", "third", "fourth", "fourth-again"], got
    nothing_more(c)
    c.close()



def delayed_delivery():
    """Delayed delivery (deliver_after / deliver_at): a Shared subscription gets a delayed
    message only once it is due, and the messages around it at once; Key_Shared likewise; an
    Exclusive subscription gets everything at once, as in Pulsar."""
    import datetime
    topic = f"{PREFIX}-delayed"
    shared = client.subscribe(topic, "shared", consumer_type=pulsar.ConsumerType.Shared)
    keyed = client.subscribe(topic, "keyed", consumer_type=pulsar.ConsumerType.KeyShared)
    exclusive = client.subscribe(topic, "exclusive", consumer_type=pulsar.ConsumerType.Exclusive)
    p = client.create_producer(topic, batching_enabled=False)
    p.send(b"now-1", partition_key="k")
    sent = time.time()
    p.send(b"later", partition_key="k", deliver_after=datetime.timedelta(seconds=3))
    p.send(b"at", partition_key="k", deliver_at=int((sent + 2) * 1000))
    p.send(b"now-2", partition_key="k")
    got = bodies(receive_n(exclusive, 4))
    assert got == ["now-1", "later", "at", "now-2"], got
    for c in (shared, keyed):
        first = bodies(receive_n(c, 2, timeout_ms=1500))
        assert first == ["now-1", "now-2"], first
        m = c.receive(timeout_millis=5000)
        c.acknowledge(m)
        assert m.data() == b"at" and time.time() - sent >= 1.8, (m.data(), time.time() - sent)
        m = c.receive(timeout_millis=5000)
        c.acknowledge(m)
        assert m.data() == b"later" and time.time() - sent >= 2.8, (m.data(), time.time() - sent)
        nothing_more(c)
    # A subscription whose Shared consumers leave, taken over by an Exclusive one: what it
    # held comes first, at once.
    switch = client.subscribe(topic, "switch", consumer_type=pulsar.ConsumerType.Shared)
    p.send(b"held", deliver_after=datetime.timedelta(seconds=60))
    p.send(b"after")
    got = bodies(receive_n(switch, 1))
    assert got == ["after"], got
    switch.close()
    switch = client.subscribe(topic, "switch", consumer_type=pulsar.ConsumerType.Exclusive)
    got = bodies(receive_n(switch, 1, timeout_ms=3000))
    assert got == ["held"], got
    nothing_more(switch)
    p.close()
    for c in (shared, keyed, exclusive, switch):
        c.close()


def delayed_before_restart():
    """Before a broker restart: a Shared subscription holds a message due in 30 s (its due
    time, in ms, is its body) and gets the one after it."""
    topic = f"{PREFIX}-delayed-restart"
    c = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared)
    p = client.create_producer(topic, batching_enabled=False)
    due = int((time.time() + 30) * 1000)
    p.send(str(due).encode(), deliver_at=due)
    p.send(b"plain")
    got = bodies(receive_n(c, 1))
    assert got == ["plain"], got
    nothing_more(c)
    p.close()
    c.close()


def delayed_after_restart():
    """After the restart: the held message is held again until it is due, then delivered."""
    topic = f"{PREFIX}-delayed-restart"
    c = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared)
    subscribed = time.time() * 1000
    m = c.receive(timeout_millis=60000)
    c.acknowledge(m)
    due = int(m.data())
    # Shows nothing unless the topic was back before the message was due.
    assert subscribed < due - 5000, f"the restart took too long: subscribed {due - subscribed:.0f} ms before due"
    now = time.time() * 1000
    assert now >= due - 200, f"delivered {due - now:.0f} ms before it was due"
    nothing_more(c)
    c.close()


def send_stored(p, body, seq):
    """Sends with an explicit sequence id; the message must be stored."""
    mid = p.send(body, sequence_id=seq)
    assert mid.ledger_id() >= 0 and mid.entry_id() >= 0, f"{body[:20]!r} (sequence id {seq}) not stored: {mid}"


def send_duplicate(p, body, seq):
    """Sends with an explicit sequence id; the broker must answer it as a duplicate (-1:-1)."""
    mid = p.send(body, sequence_id=seq)
    assert (mid.ledger_id(), mid.entry_id()) == (-1, -1), f"resent {seq}: {mid}"


def exactly(c, expected):
    """`c` receives exactly the messages `expected` (bodies), then nothing; closes it."""
    got = receive_n(c, len(expected))
    assert bodies(got) == expected, bodies(got)
    nothing_more(c)
    c.close()


def dedup_producer(topic, name, **kw):
    return client.create_producer(topic, producer_name=name, batching_enabled=False, **kw)


def dedup_before_restart():
    """Deduplication on: a resent sequence id is answered as sent (-1:-1) and stored once."""
    topic = f"{PREFIX}-dedup"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    p = dedup_producer(topic, "dedup-p")
    for i in range(10):
        send_stored(p, f"m-{i}".encode(), i)
    for i in (3, 9):
        send_duplicate(p, f"again-{i}".encode(), i)
    assert p.last_sequence_id() == 9, p.last_sequence_id()
    p.close()
    exactly(c, [f"m-{i}" for i in range(10)])


def dedup_two_more():
    """Two more messages (sequence ids 10 and 11), fewer than a snapshot waits for."""
    p = dedup_producer(f"{PREFIX}-dedup", "dedup-p")
    assert p.last_sequence_id() == 9, p.last_sequence_id()
    for i in (10, 11):
        send_stored(p, f"m-{i}".encode(), i)
    p.close()


def dedup_after_restart():
    """After the restart: the producer name resumes at its last stored sequence id, and
    resends of old ones are still answered as sent, not stored."""
    topic = f"{PREFIX}-dedup"
    c = client.subscribe(topic, "s")
    p = dedup_producer(topic, "dedup-p")
    assert p.last_sequence_id() == 11, p.last_sequence_id()
    for i in (8, 11):
        send_duplicate(p, f"again-{i}".encode(), i)
    send_stored(p, b"m-12", 12)
    p.close()
    exactly(c, ["m-10", "m-11", "m-12"])


def dedup_forgets_inactive_producers():
    """Deduplication on (by the broker's default), producer names inactive for 3 s
    forgotten: a name whose producer left that long ago starts afresh (last sequence id -1,
    its old sequence ids stored again), while a name whose producer stayed connected all
    along is still deduplicated."""
    topic = f"{PREFIX}-forget"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    kept = dedup_producer(topic, "kept-p")
    gone = dedup_producer(topic, "gone-p")
    for i in range(3):
        send_stored(kept, f"k-{i}".encode(), i)
        send_stored(gone, f"g-{i}".encode(), i)
    gone.close()
    # The timeout, the topic's look at its names (a quarter of it apart) and a margin.
    time.sleep(7)
    send_duplicate(kept, b"k-again", 1)
    back = dedup_producer(topic, "gone-p")
    assert back.last_sequence_id() == -1, back.last_sequence_id()
    send_stored(back, b"g-0-again", 0)
    send_stored(back, b"g-1-again", 1)
    back.close()
    kept.close()
    exactly(c, ["k-0", "g-0", "k-1", "g-1", "k-2", "g-2", "g-0-again", "g-1-again"])


def dedup_forgotten_after_restart():
    """After a SIGKILL: the forgotten name comes back only with what was sent after it was
    forgotten (up to sequence id 1), not with its old highest one (2), which the snapshot
    stored before it was forgotten held. (A sequence id of 0 is not sent explicitly by this
    client: it numbers such a message itself.)"""
    topic = f"{PREFIX}-forget"
    c = client.subscribe(topic, "s")
    p = dedup_producer(topic, "gone-p")
    assert p.last_sequence_id() == 1, p.last_sequence_id()
    send_duplicate(p, b"g-1-once-more", 1)
    send_stored(p, b"g-2-again", 2)
    p.close()
    exactly(c, ["g-2-again"])


def dedup_off():
    """Without deduplication (namespace public/nodedup, broker default off), a resent
    sequence id is stored again."""
    topic = f"persistent://public/nodedup/{PREFIX}-dup"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    p = dedup_producer(topic, "plain-p")
    for i in (0, 1, 1):
        send_stored(p, f"m-{i}".encode(), i)
    p.close()
    exactly(c, ["m-0", "m-1", "m-1"])


def dedup_chunked():
    """Deduplication on: a message sent in chunks (every chunk carries its sequence id) is
    stored whole, once."""
    topic = f"{PREFIX}-dedup-chunked"
    c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    p = dedup_producer(topic, "chunky", chunking_enabled=True)
    body = bytes(range(256)) * 1400
    p.send(body)
    p.send(b"after")
    p.close()
    got = receive_n(c, 2)
    assert len(got[0].data()) == len(body) and got[0].data() == body, len(got[0].data())
    assert got[1].data() == b"after", got[1].data()
    nothing_more(c)
    c.close()


def dedup_turned_on():
    """Deduplication turned on for a topic that stored messages without it: it starts from the
    topic's end, so a producer told to number from 0 is not taken for a duplicate."""
    topic = f"persistent://public/nodedup/{PREFIX}-dup"
    c = client.subscribe(topic, "s")
    p = dedup_producer(topic, "plain-p")
    assert p.last_sequence_id() == -1, p.last_sequence_id()
    # (The Python client takes sequence_id=0 for "none given"; 1 was stored before.)
    send_stored(p, b"new-1", 1)
    send_duplicate(p, b"again-1", 1)
    p.close()
    exactly(c, ["new-1"])


def schemas():
    """A producer's schema is registered as the topic's version 0, and its messages carry that
    version; the same schema again gets the same version, a changed one of the same type the
    next; a producer or consumer with a schema of another type is refused; a partitioned
    topic's partitions share one set of versions."""
    from pulsar.schema import Integer, JsonSchema, Record, String, StringSchema

    class User(Record):
        name = String()
        age = Integer()

    class UserV2(Record):
        name = String()
        age = Integer()
        email = String()

    def refused(make):
        try:
            make()
        except pulsar.IncompatibleSchema:
            return
        raise AssertionError("a schema of another type was accepted")

    topic = f"{PREFIX}-json"
    c = client.subscribe(topic, "s", schema=JsonSchema(User))
    p = client.create_producer(topic, schema=JsonSchema(User))
    p.send(User(name="ann", age=3))
    m = c.receive(timeout_millis=WAIT_MS)
    assert (m.value().name, m.value().age) == ("ann", 3), m.value()
    # The version as the broker sends it: 8 big-endian bytes.
    v0, v1 = "\x00" * 8, "\x00" * 7 + "\x01"
    assert m.schema_version() == v0, repr(m.schema_version())
    c.acknowledge(m)
    again = client.create_producer(topic, schema=JsonSchema(User))
    again.send(User(name="bob", age=4))
    assert c.receive(timeout_millis=WAIT_MS).schema_version() == v0
    v2 = client.create_producer(topic, schema=JsonSchema(UserV2))
    v2.send(UserV2(name="cy", age=5, email="c@y"))
    m = client.subscribe(topic, "v2", schema=JsonSchema(UserV2),
                         initial_position=pulsar.InitialPosition.Earliest)
    got = [m.receive(timeout_millis=WAIT_MS) for _ in range(3)]
    assert [g.schema_version() for g in got] == [v0, v0, v1], [g.schema_version() for g in got]
    assert got[2].value().email == "c@y", got[2].value()
    refused(lambda: client.create_producer(topic, schema=StringSchema()))
    refused(lambda: client.subscribe(topic, "str", schema=StringSchema()))
    # Raw bytes are not checked.
    raw = client.create_producer(topic)
    raw.send(b"{}")
    for x in (p, again, v2, raw, c, m):
        x.close()

    # The partitions share one set of versions: a new definition registered through one
    # partition is the next version for the others.
    parts = f"{PREFIX}-json-parts"
    p = client.create_producer(parts, schema=JsonSchema(User))
    for i in range(4):
        p.send(User(name=f"u{i}", age=i), partition_key=f"k{i}")
    p.close()
    p0 = client.create_producer(f"{parts}-partition-0", schema=JsonSchema(UserV2))
    p0.send(UserV2(name="d", age=6, email="d@"))
    p0.close()
    c1 = client.subscribe(f"{parts}-partition-1", "s", schema=JsonSchema(UserV2))
    p1 = client.create_producer(f"{parts}-partition-1", schema=JsonSchema(UserV2))
    p1.send(UserV2(name="e", age=7, email="e@"))
    assert c1.receive(timeout_millis=WAIT_MS).schema_version() == v1
    p1.close()
    c1.close()
    refused(lambda: client.create_producer(f"{parts}-partition-1", schema=StringSchema()))


def schemas_after_delete():
    """After the admin API deleted a topic's schemas, the next one registered gets the next
    version number, not 0 again: messages stored with the old numbers may remain."""
    from pulsar.schema import Integer, JsonSchema, Record, String

    class Point(Record):
        x = Integer()
        label = String()

    topic = f"{PREFIX}-json"
    c = client.subscribe(topic, "after", schema=JsonSchema(Point))
    p = client.create_producer(topic, schema=JsonSchema(Point))
    p.send(Point(x=1, label="one"))
    m = c.receive(timeout_millis=WAIT_MS)
    assert m.schema_version() == "\x00" * 7 + "\x02", repr(m.schema_version())
    assert (m.value().x, m.value().label) == (1, "one"), m.value()
    p.close()
    c.close()


def dedup_topic_level():
    """In a namespace without deduplication, one topic has it on by its own policy (a
    resend is answered as sent and stored once) and one partitioned topic by its policy (so
    its partitions have it); another topic does not (the resend is stored again)."""
    ns = "persistent://public/tdedup"
    for topic, on in ((f"{ns}/{PREFIX}-on", True), (f"{ns}/{PREFIX}-parts-partition-1", True),
                      (f"{ns}/{PREFIX}-off", False)):
        c = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
        p = dedup_producer(topic, "tp")
        send_stored(p, b"m-1", 1)
        (send_duplicate if on else send_stored)(p, b"m-1", 1)
        send_stored(p, b"m-2", 2)
        p.close()
        exactly(c, ["m-1", "m-2"] if on else ["m-1", "m-1", "m-2"])


globals()[SCENARIO]()
client.close()
print(f"ok {SCENARIO}")
