"""A job's wake-up message is the very message Celery's send_task sends, pushed with one LPUSH."""

from __future__ import annotations

import json

import pytest
import redis

from app import queue

IDS = {"headers": ("id", "root_id"), "properties": ("correlation_id", "delivery_tag")}


@pytest.fixture
def broker(settings):
    """The settings on a Redis database no worker consumes, emptied first."""
    url = settings.redis_url.rsplit("/", 1)[0] + "/14"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield settings.with_overrides(redis_url=url), client
    client.flushdb()


def _without_ids(raw: bytes) -> dict:
    message = json.loads(raw)
    for part, keys in IDS.items():
        for key in keys:
            assert message[part][key]  # present, and unique per message (checked below)
            message[part][key] = "<id>"
    return message


@pytest.mark.parametrize("kind,priority", [("train", "high"), ("predict", "normal"), ("train", "low")])
def test_a_published_message_is_what_send_task_sends(broker, kind, priority):
    settings, client = broker
    queue.client(settings).send_task(queue.TASK_FOR_KIND[kind], args=[41, 2], priority=queue.PRIORITY[priority])
    assert queue.publish(settings, job_id=41, kind=kind, token=2, priority=priority)
    # One list holds both: the queue's, at the priority's step (send_task also declares a binding set).
    (key,) = [k for k in client.keys("*") if client.type(k) == b"list"]
    theirs, ours = client.lrange(key, 0, -1)[::-1]  # LPUSH: the newest first
    assert _without_ids(ours) == _without_ids(theirs)
    assert json.loads(ours)["headers"]["argsrepr"] == "[41, 2]"
    assert json.loads(ours)["headers"]["id"] != json.loads(theirs)["headers"]["id"]


def test_an_unreachable_broker_is_a_false_publish_not_an_error(settings):
    unreachable = settings.with_overrides(redis_url="redis://127.0.0.1:1/0")
    assert queue.publish(unreachable, job_id=1, kind="train", token=0) is False


def test_messages_from_one_template_carry_their_own_ids_and_arguments(broker):
    """The template is built once per thread; every message still gets fresh ids, its own arguments
    (body and argsrepr), and the ``reply_to`` Celery gives the publishing thread."""
    import base64
    import threading

    settings, _ = broker
    messages = [json.loads(queue.task_message(settings, queue.TRAIN_TASK, [job_id, 3], 3)[1]) for job_id in (7, 8)]
    for job_id, message in zip((7, 8), messages):
        assert json.loads(base64.b64decode(message["body"]))[0] == [job_id, 3]
        assert message["headers"]["argsrepr"] == f"[{job_id}, 3]"
        assert message["headers"]["id"] == message["headers"]["root_id"] == message["properties"]["correlation_id"]
    assert messages[0]["headers"]["id"] != messages[1]["headers"]["id"]
    assert messages[0]["properties"]["delivery_tag"] != messages[1]["properties"]["delivery_tag"]
    assert messages[0]["properties"]["reply_to"] == queue.client(settings).thread_oid

    other = {}

    def publish_elsewhere():
        other["message"] = json.loads(queue.task_message(settings, queue.TRAIN_TASK, [9, 0], 3)[1])
        other["oid"] = queue.client(settings).thread_oid

    thread = threading.Thread(target=publish_elsewhere)
    thread.start()
    thread.join(60)
    assert other["message"]["properties"]["reply_to"] == other["oid"] != messages[0]["properties"]["reply_to"]
