"""Issue #19 with two real users: a neighbour on the same machine (Mallory)
cannot reach another user's engine, make it touch her memory or files, plant
links for a root engine or launcher, or read stored KV.

Each case runs in its own private mount namespace (multiuser_world.sh): a copy
of /etc where the test adds the users `ucmalice` and `ucmmallory` with
useradd, and empty private /tmp and /dev/shm. The users, and everything they
planted, vanish with the namespace; the host's /etc and /tmp are never
changed, and no process of a case outlives it (its own pid namespace). The scenarios are in multiuser_cases.py; the assertions are here.
Needs root, unshare, useradd, runuser and the built engine (dist/).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "useradd", "runuser", "chroot")),
    reason="needs root with unshare, useradd, runuser and chroot (two users in a private mount namespace)",
)


def world(case: str) -> dict:
    mnt = tempfile.mkdtemp(prefix="ucm-world-")
    try:
        r = subprocess.run(
            [
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",  # a case that runs past the timeout takes every process of its world with it
                "--propagation",
                "private",
                "--",
                "bash",
                os.path.join(HERE, "multiuser_world.sh"),
                mnt,
                sys.executable,
                os.path.join(HERE, "multiuser_cases.py"),
                case,
            ],
            capture_output=True,
            # The checkout and this Python stay visible in the world even under /tmp (a CI clone there).
            env={**os.environ, "UCM_WORLD_KEEP": f"{ROOT}:{sys.prefix}"},
            text=True,
            timeout=120,
        )
    finally:
        os.rmdir(mnt)
    assert r.returncode == 0, f"case {case} failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_users_exist_only_inside_the_world():
    out = subprocess.run(["id", "ucmmallory"], capture_output=True, text=True)
    assert out.returncode != 0, "a user of the test leaked into the host's /etc"


def test_a_socket_in_tmp_serves_its_owner_only_and_leaves_tmp_and_root_as_they_were():
    r = world("ipc_in_tmp")
    assert not r["in_tmp"]["started"] and "socket directory /tmp is writable by other users" in r["in_tmp"]["output"]
    assert r["started"], r["output"]
    assert r["after"] == r["before"] == {"tmp": "0o1777", "root": "0o755"}
    assert r["socket"] == "0o600"
    assert r["root_hello"][0]["ok"] is True
    assert r["mallory_hello"][0] == {
        "ok": False,
        "code": "timeout",
        "error": "no reply to hello within 2000 ms from ipc:///tmp/rootrun/x.sock",
    }


def test_tcp_serves_only_holders_of_the_key_and_the_key_is_the_owners_alone():
    r = world("tcp")
    assert r["started"], r["output"]
    assert r["key_mode"] == "0o600"
    assert r["alice_hello"][0]["ok"] is True
    assert "no CURVE key for tcp://127.0.0.1" in r["mallory_client"][0]["error"]
    assert r["mallory_plain"] == [{"ok": False, "error": "Operation was not possible or timed out"}]
    assert r["mallory_reads_key"] != 0


def test_a_key_directory_planted_by_another_user_stops_the_engine():
    r = world("tcp_key_dir_planted")
    assert not r["started"]
    assert re.search(r"\[E\] /tmp/ucm-(\d+) belongs to uid \d+, not to this user \(\1\)", r["output"]), r["output"]
    assert r["planted"] == []


def test_regions_are_the_engine_users_shared_memory_only():
    r = world("regions")
    assert r["started"], r["output"]
    assert r["own_seg"]["ok"] is True
    assert r["mallory_seg"]["code"] == "bad_message"
    assert "region '/dev/shm/mallory-seg' belongs to uid" in r["mallory_seg"]["error"]
    assert r["shadow"]["code"] == "bad_message"
    assert "region '/etc/shadow' is not shared memory" in r["shadow"]["error"]


def test_a_runtime_directory_planted_with_links_is_refused_and_the_target_untouched():
    r = world("runtime_dir_planted")
    assert r["error"] and "is owned by uid" in r["error"] and "remove it" in r["error"], r
    assert r["decoy"] == "root's own bytes\n" and r["decoy_mode"] == "0o600"


def test_a_store_another_user_can_write_is_refused_and_links_in_it_never_followed():
    r = world("store_of_other")
    assert not r["open"]["started"] and "is writable by every user (mode 777)" in r["open"]["output"]
    for name in ("open-hers", "hers"):
        assert not r[name]["started"]
        assert f'directory "/tmp/store-{name}" belongs to uid' in r[name]["output"], r[name]["output"]
    assert r["decoy_dir"] == ["keep"]


def test_stored_blocks_are_private_to_the_engines_user():
    r = world("private_files")
    assert r["wait"] == 0 and r["committed"] == [True, True]
    assert r["files"] >= 2 and r["modes"] == ["0o600"]
    assert all(rc != 0 for rc in r["mallory_reads"] + r["alice_reads"])
    assert r["mallory_lists"] != 0


# ---- issue 25: a client knows it talks to its own engine; a hello cannot borrow another process's pid ----


def test_a_fake_engine_in_a_runtime_directory_made_by_another_user_is_never_used():
    r = world("fake_engine_in_squatted_runtime_dir")
    assert r["error"] and r["error"].startswith("RuntimeDirError: "), r
    assert re.search(r"owned by uid \d+, not by this user: another user made it", r["error"]), r["error"]
    assert "remove it (as root or its owner" in r["error"] and "XDG_RUNTIME_DIR" in r["error"], r["error"]
    assert r["found"] == [False, False] and r["wait"] == 1
    assert r["fake_saw"] == [], "the fake engine was asked something"


def test_an_endpoint_directly_in_tmp_is_refused_by_shim_and_engine():
    r = world("fake_engine_at_an_endpoint_in_tmp")
    assert r["error"] and r["error"].startswith("UntrustedEngine: untrusted: engine socket /tmp/x.sock"), r
    assert "directory /tmp is writable by other users (mode 1777, sticky" in r["error"], r["error"]
    assert r["found"] == [False, False] and r["wait"] == 1
    assert r["fake_saw"] == []
    assert not r["engine_started"]
    assert "socket directory /tmp is writable by other users (mode 1777, sticky like /tmp)" in r["engine_output"], r[
        "engine_output"
    ]


def test_a_socket_file_of_root_served_by_another_users_process_is_refused():
    r = world("socket_of_root_served_by_another_user")
    assert r["error"] and re.search(
        r"UntrustedEngine: untrusted: the process serving \S+engine.sock is pid \d+, uid \d+ \(ucmmallory\)", r["error"]
    ), r
    assert r["found"] == [False, False] and r["wait"] == 1
    # It answered a health or hello (that is how its peer is known), never a lookup: no block hash reached it.
    assert not [op for op in r["fake_saw"] if not op.startswith(("health", "hello"))], r["fake_saw"]


def test_a_hello_naming_another_connected_process_gets_neither_its_session_quota_nor_its_memory():
    r = world("hello_with_the_victims_pid")
    assert r["started"], r["output"]
    assert len(r["attack"]) == 17
    for a in r["attack"]:
        assert re.match(r"bad_message: hello names pid \d+, but the process that connected is pid \d+", a["hello"]), a
        assert a["register"] == "no_session", a
    assert r["victim_again"] == {"ok": True}


def test_keyless_tcp_connections_of_another_user_cannot_keep_the_engines_own_user_out():
    r = world("tcp_flood_of_another_user")
    assert r["started"], r["output"]
    assert r["hello"][0]["ok"] is True and r["hello"][1]["ok"] is True, r
    assert r["took_s"] < 10, r["took_s"]
    # The flood ran at full strength (600 connections made); that the engine closed them is its log line below.
    # (Whether the flood's client saw each close and opened another is timing: not asserted.)
    assert r["flood"] and r["flood"]["made"] >= 600, r["flood"]
    assert re.search(r"closed \d+ tcp connection\(s\) of other users", r["output"]), r["output"][-2000:]
