"""llama.cpp's slot actions (`POST /slots/ID?action=save|restore|erase`, --slot-save-path) on a real server:
a restored slot continues exactly as the uninterrupted one, and every bad name or file of faults.md
item 23 is a 400 that changes nothing."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import struct

import numpy as np
import pytest

from tests.server.conftest import AUTH, request, wait_slots_free
from tests.server.test_errors import assert_error

STORY = "Here is a long story about a cat named Tom who lived in a small house near the river. " * 3
_PREFIX = struct.Struct("<8sII")


def tokenize(server, text: str, special: bool) -> list[int]:
    return request(server, "POST", "/tokenize", {"content": text, "add_special": special})[2]["tokens"]


def complete(server, ids: list[int], n: int, **extra) -> dict:
    status, _, r = request(server, "POST", "/completion",
                           {"prompt": ids, "n_predict": n, "temperature": 0, "return_tokens": True, **extra})
    assert status == 200, r
    return r


def slot_action(server, slot, action: str, filename=None):
    body = {"filename": filename} if filename is not None else None
    return request(server, "POST", f"/slots/{slot}?action={action}", body)


def ok(resp) -> dict:
    status, _, body = resp
    assert status == 200, body
    return body


def slot_state(server) -> tuple:
    slots = request(server, "GET", "/slots")[2]
    usage = [ln for ln in request(server, "GET", "/metrics")[2].splitlines()
             if ln.startswith("qatserve_kv_cache_usage_ratio")]
    return [s["cache"] for s in slots], usage


@pytest.fixture(scope="module")
def story(spec_server):
    """Slot 0 after one request, saved as story.slot; then the follow-up prompt's uninterrupted answer."""
    ids = tokenize(spec_server, STORY, True)
    first = complete(spec_server, ids, 8, id_slot=0)
    saved = ok(slot_action(spec_server, 0, "save", "story.slot"))
    follow = ids + first["tokens"] + tokenize(spec_server, " And then", False)
    answer = complete(spec_server, follow, 12, id_slot=0)
    return {"ids": ids, "saved": saved, "follow": follow, "answer": answer}


def test_save_answers_like_llamacpp(spec_server, story):
    saved = story["saved"]
    assert saved["id_slot"] == 0 and saved["filename"] == "story.slot"
    assert len(story["ids"]) <= saved["n_saved"] <= len(story["ids"]) + 8
    assert saved["n_written"] == (spec_server.slot_dir / "story.slot").stat().st_size
    assert saved["timings"]["save_ms"] > 0
    assert story["answer"]["timings"]["cache_n"] >= 32  # the uninterrupted follow-up reused the prompt's blocks


def test_restored_slot_continues_exactly(spec_server, server, story):
    follow, want = story["follow"], story["answer"]
    assert ok(slot_action(spec_server, 0, "erase"))["n_erased"] > 0
    cold = complete(spec_server, follow, 12, id_slot=0)
    assert cold["tokens"] == want["tokens"] and cold["timings"]["cache_n"] == 0  # erase left nothing to reuse
    ok(slot_action(spec_server, 0, "erase"))
    restored = ok(slot_action(spec_server, 0, "restore", "story.slot"))
    assert restored["n_restored"] == story["saved"]["n_saved"] and restored["n_read"] == story["saved"]["n_written"]
    cache = request(spec_server, "GET", "/slots")[2][0]["cache"]
    assert cache["restored"] is True and cache["n_tokens"] == restored["n_restored"] and cache["n_reusable"] >= 32
    again = complete(spec_server, follow, 12, id_slot=0)
    assert again["tokens"] == want["tokens"]
    assert again["timings"]["cache_n"] == want["timings"]["cache_n"]  # the restored K/V was used
    # and the same as a server that never cached anything for it
    assert complete(server, follow, 12)["tokens"] == want["tokens"]


def test_unpinned_request_goes_to_the_restored_slot(spec_server, story):
    for slot in (0, 1):
        ok(slot_action(spec_server, slot, "erase"))
    ok(slot_action(spec_server, 1, "restore", "story.slot"))
    r = complete(spec_server, story["follow"], 12)
    assert r["id_slot"] == 1 and r["timings"]["cache_n"] == story["answer"]["timings"]["cache_n"]
    assert r["tokens"] == story["answer"]["tokens"]


def test_erase_frees_the_cache(spec_server, story):
    complete(spec_server, story["ids"], 4, id_slot=0)
    caches, usage = slot_state(spec_server)
    assert caches[0]["n_tokens"] > 0 and usage != ["qatserve_kv_cache_usage_ratio 0.0"]
    n = caches[0]["n_tokens"]
    assert ok(slot_action(spec_server, 0, "erase")) == {"id_slot": 0, "n_erased": n}
    ok(slot_action(spec_server, 1, "erase"))
    caches, usage = slot_state(spec_server)
    assert [c["n_tokens"] for c in caches] == [0, 0] and usage == ["qatserve_kv_cache_usage_ratio 0.0"]


def test_slot_actions_need_save_path(server):
    err = assert_error(slot_action(server, 0, "save", "x.slot"), 501)
    assert "--slot-save-path" in err["message"]


def test_bad_slot_id_or_action(spec_server):
    for path, param in (("/slots/2?action=erase", "id_slot"), ("/slots/-1?action=erase", "id_slot"),
                        ("/slots/abc?action=erase", "id_slot"), ("/slots/0?action=delete", "action"),
                        ("/slots/0", "action")):
        assert_error(request(spec_server, "POST", path, {"filename": "x.slot"}), 400, param=param)
    assert_error(request(spec_server, "POST", "/slots/0?action=save", {}), 400, param="filename")
    assert_error(request(spec_server, "POST", "/slots/0?action=save", {"filename": 7}), 400, param="filename")
    assert_error(request(spec_server, "POST", "/slots/0?action=save", {"filename": "x"}, headers={"Authorization": ""}),
                 401)


def test_busy_slot_is_409(spec_server, story):
    conn = http.client.HTTPConnection("127.0.0.1", spec_server.port, timeout=60)
    try:
        conn.request("POST", "/completion", json.dumps({"prompt": story["ids"], "n_predict": 400, "stream": True,
                                                        "id_slot": 0}), headers=AUTH)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # slot 0 is generating
        err = assert_error(slot_action(spec_server, 0, "save", "busy.slot"), 409)
        assert err["code"] == "slot_busy"
        assert_error(slot_action(spec_server, 0, "erase"), 409)
    finally:
        conn.close()
    wait_slots_free(spec_server, 5)
    assert not (spec_server.slot_dir / "busy.slot").exists()


# -- faults.md item 23 --------------------------------------------------------------------------------

def split(raw: bytes):
    magic, version, hlen = _PREFIX.unpack_from(raw)
    header = json.loads(raw[_PREFIX.size : _PREFIX.size + hlen])
    return magic, version, header, raw[_PREFIX.size + hlen + 32 :]


def join(magic: bytes, version: int, header, data: bytes, hlen: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return _PREFIX.pack(magic, version, len(h) if hlen is None else hlen) + h + hashlib.sha256(h).digest() + data


def edit_section(raw: bytes, name: str, change) -> bytes:
    """A copy of the file with section `name`'s bytes changed by change(bytearray) and its checksum redone."""
    magic, version, header, data = split(raw)
    data = bytearray(data)
    offset = 0
    for sec in header["sections"]:
        if sec[0] == name:
            part = bytearray(data[offset : offset + sec[1]])
            change(part)
            data[offset : offset + sec[1]] = part
            sec[2] = hashlib.sha256(part).hexdigest()
        offset += sec[1]
    return join(magic, version, header, bytes(data))


def crafted(raw: bytes, change) -> bytes:
    """A copy with the header changed by change(header) and a correct header checksum."""
    magic, version, header, data = split(raw)
    change(header)
    return join(magic, version, header, data)


def set_path(h, *path_and_value):
    *path, value = path_and_value
    node = h
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def first_f16_inf(part: bytearray) -> None:
    part[0:2] = np.array([np.inf], dtype=np.float16).tobytes()


def bad_files(good: bytes) -> dict[str, bytes]:
    magic, version, header, data = split(good)
    n_blk = header["n_reuse"] // 32
    first_layer = header["cache"]["layers"][0]["layer"]
    return {
        "empty": b"",
        "truncated prefix": good[:10],
        "truncated header": good[: _PREFIX.size + 40],
        "truncated data": good[:-100],
        "padded": good + b"\0",
        "bad magic": b"NOTASLOT" + good[8:],
        "format version 2": join(magic, 2, header, data),
        "header length 2^31": join(magic, version, header, data, hlen=2**31),
        "flipped header byte": good[:30] + bytes([good[30] ^ 1]) + good[31:],
        "flipped data byte": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
        "deep json header": join(magic, version, b"[" * 100_000, data),
        "other model": crafted(good, lambda h: set_path(h, "model", "fingerprint", "0" * 64)),
        "other vocabulary": crafted(good, lambda h: set_path(h, "model", "n_vocab", 32000)),
        "other cache type": crafted(good, lambda h: set_path(h, "cache", "type_k", "q8_0")),
        "other layer shape": crafted(good, lambda h: set_path(h, "cache", "layers", 0, "n_kv", 2)),
        "other block size": crafted(good, lambda h: set_path(h, "cache", "block_size", 64)),
        "2^30 tokens": crafted(good, lambda h: set_path(h, "n_tokens", 2**30)),
        "reuse past the tokens": crafted(good, lambda h: set_path(h, "n_reuse", h["n_tokens"] + 32)),
        "reuse not whole blocks": crafted(good, lambda h: set_path(h, "n_reuse", 33)),
        "block out of range": crafted(good, lambda h: h["blocks"][0].append(n_blk)),
        "blocks missing": crafted(good, lambda h: set_path(h, "blocks", [])),
        "section size lies": crafted(good, lambda h: set_path(h, "sections", 1, 1, h["sections"][1][1] + 2)),
        "token id 2^31-1": edit_section(good, "tokens", lambda p: p.__setitem__(slice(0, 4), b"\xff\xff\xff\x7f")),
        "negative token id": edit_section(good, "tokens", lambda p: p.__setitem__(slice(0, 4), b"\xff\xff\xff\xff")),
        "infinite K value": edit_section(good, f"k.{first_layer}", first_f16_inf),
    }


def test_bad_slot_files_are_400_and_change_nothing(spec_server, story, tmp_path):
    d = spec_server.slot_dir
    good = (d / "story.slot").read_bytes()
    for slot in (0, 1):
        ok(slot_action(spec_server, slot, "erase"))
    ok(slot_action(spec_server, 0, "restore", "story.slot"))
    before = slot_state(spec_server)

    names = {}
    for name, content in bad_files(good).items():
        fname = "bad-" + name.replace(" ", "-").replace("^", "") + ".slot"
        (d / fname).write_bytes(content)
        names[name] = fname
    outside = tmp_path / "outside.slot"
    outside.write_bytes(good)
    os.symlink(d / "story.slot", d / "link.slot")
    os.symlink(outside, d / "outside-link.slot")
    (d / "dir.slot").mkdir()
    os.mkfifo(d / "fifo.slot")
    names.update({"symlink to a good file": "link.slot", "symlink out of the directory": "outside-link.slot",
                  "directory": "dir.slot", "fifo": "fifo.slot", "missing": "missing.slot",
                  "parent path": "../story.slot", "absolute path": str(d / "story.slot"),
                  "subdirectory": "dir.slot/x.slot", "dot file": ".story.slot", "empty name": "",
                  "dot dot": "..", "control character": "a\nb.slot", "backslash": "..\\story.slot"})
    for case, fname in names.items():
        err = assert_error(slot_action(spec_server, 0, "restore", fname), 400, param="filename")
        assert "Traceback" not in err["message"], case
        assert slot_state(spec_server) == before, case

    # save never writes through a bad name or a symlink
    for fname in ("../escape.slot", str(tmp_path / "abs.slot"), "outside-link.slot", "dir.slot", "sub/x.slot"):
        assert_error(slot_action(spec_server, 1, "save", fname), 400, param="filename")
    assert outside.read_bytes() == good and not (d.parent / "escape.slot").exists()
    assert not (tmp_path / "abs.slot").exists()
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind

    # the slot still holds exactly what was restored before the bad files
    again = complete(spec_server, story["follow"], 12, id_slot=0)
    assert again["tokens"] == story["answer"]["tokens"]
    assert again["timings"]["cache_n"] == story["answer"]["timings"]["cache_n"]
    assert request(spec_server, "GET", "/health")[0] == 200


def test_file_of_another_model_is_400(spec_server, smollm_path):
    """A genuine slot file written by an engine running SmolLM2 (another model, another layout)."""
    from qatserve.engine import slot_file
    from qatserve.engine.engine import Engine, EngineConfig
    from qatserve.engine.loader import load_model_file
    from qatserve.engine.sampler import SamplingParams

    loaded = load_model_file(smollm_path)
    try:
        eng = Engine(loaded.model, loaded.tokenizer, EngineConfig(n_ctx=256, keep_slots=True))
        eng.add_request(loaded.tokenizer.encode(STORY), SamplingParams(temperature=0, max_tokens=2))
        eng.run_until_done()
        image = eng.save_slot(0)
        assert image.n_reuse >= 32
        slot_file.write(spec_server.slot_dir, "smollm.slot", image, slot_file.CacheIdentity.of(eng, loaded.gguf))
    finally:
        loaded.gguf.close()
    before = slot_state(spec_server)
    err = assert_error(slot_action(spec_server, 1, "restore", "smollm.slot"), 400, param="filename")
    assert "another model" in err["message"]
    assert slot_state(spec_server) == before
