"""The outbox: one durable file per unacknowledged Result."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from muster.agent.outbox import Outbox, file_name
from muster.v1 import agent_pb2


def result(task_id: str, attempt: int = 1, output: bytes = b"out") -> agent_pb2.Result:
    return agent_pb2.Result(
        task_id=task_id, attempt=attempt, outcome=agent_pb2.OUTCOME_SUCCEEDED, output=output
    )


def test_put_survives_a_reload_and_remove_deletes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put(result("a"))
    box.put(result("b", 2))
    reloaded = Outbox(tmp_path / "outbox")
    assert len(reloaded) == 2
    assert ("b", 2) in reloaded and ("b", 1) not in reloaded
    assert reloaded.get("a", 1) == result("a")
    assert reloaded.remove("a", 1) is True
    assert reloaded.remove("a", 1) is False
    assert [r.task_id for r in Outbox(tmp_path / "outbox").pending()] == ["b"]


def test_writes_are_private_and_leave_no_temporaries(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put(result("a"))
    box.put(result("a", output=b"replaced"))  # the same attempt again replaces it
    files = os.listdir(box.path)
    assert files == [file_name("a", 1)]
    assert (box.path / files[0]).stat().st_mode & 0o777 == 0o600
    assert box.path.stat().st_mode & 0o777 == 0o700
    assert box.get("a", 1) == result("a", output=b"replaced")


def test_an_interrupted_write_is_discarded_on_load(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put(result("a"))
    (box.path / f".{file_name('b', 1)}.abc123.tmp").write_bytes(b"half a res")
    reloaded = Outbox(tmp_path / "outbox")
    assert [r.task_id for r in reloaded.pending()] == ["a"]
    assert os.listdir(box.path) == [file_name("a", 1)]


def test_a_damaged_file_is_set_aside_not_resent(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put(result("good"))
    (box.path / file_name("bad", 1)).write_bytes(b"\xff\xff not a protobuf")
    assert [r.task_id for r in box.pending()] == ["good"]
    assert (box.path / (file_name("bad", 1) + ".corrupt")).exists()
    assert len(box) == 1


def test_pending_is_in_completion_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    for index, task_id in enumerate(["z", "a", "m"]):
        box.put(result(task_id))
        stamp = 1_700_000_000_000_000_000 + index * 1_000_000_000
        os.utime(box.path / file_name(task_id, 1), ns=(stamp, stamp))
    assert [r.task_id for r in box.pending()] == ["z", "a", "m"]


@pytest.mark.parametrize("task_id", ["../../etc/passwd", "a/b", "ünïcode", ".", "x" * 500, ""])
def test_any_task_id_maps_to_a_safe_file_inside_the_outbox(tmp_path: Path, task_id: str) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put(result(task_id, 3))
    name = file_name(task_id, 3)
    assert "/" not in name and len(name) < 255
    assert os.listdir(box.path) == [name]
    assert box.get(task_id, 3) == result(task_id, 3)
    assert file_name(task_id, 3) != file_name(task_id, 4)
