"""The one config digest: its bytes key checkpoints, run folders and stage caches, so they never change."""

from pathlib import Path

from hierloc.digest import digest_of


def test_digest_bytes_are_pinned():
    # The values of the former hierloc.train.checkpoint.config_digest and flows.lineage.digest_of.
    assert digest_of([{"b": [1, 2], "a": 1.5}, {"n": 600, "levels": [3, 6]}]) == "afb5ec2aef8edbbe"
    assert digest_of({"train": "x"}) == "118bd7b352bb12cb"


def test_key_order_and_sequence_type_do_not_matter():
    assert digest_of(({"a": 1, "b": 2}, [3])) == digest_of([{"b": 2, "a": 1}, [3]])
    assert digest_of({"p": Path("/x")}) == digest_of({"p": "/x"})  # str() for what JSON lacks
