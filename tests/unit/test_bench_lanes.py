"""`qatserve bench` lanes: the syntax users type, the flags each server gets, and every mistake's message."""

from __future__ import annotations

import pytest

from qatserve.bench.lanes import KV_TYPES, LaneError, PeerUnsupported, parse_lane, parse_lanes, parse_sweep


def test_kv_types_are_the_servers():
    from qatserve.quant.kernels.kv_quant import KV_TYPES as SERVED

    assert set(KV_TYPES) == set(SERVED)


def test_shorthands_and_keys():
    assert parse_lane("f16").qatserve_args() == ["-ctk", "f16", "-ctv", "f16", "-np", "2"]
    lane = parse_lane(" ctk=q8_0, ctv=Q4_0 ")
    assert (lane.name, lane.ctk, lane.ctv) == ("ctk=q8_0, ctv=Q4_0", "q8_0", "q4_0")
    assert parse_lane("kv=bf16").ctv == "bf16"
    lane = parse_lane("q4_0,lookup,draft-max=auto,np=3,rot=off,ngram=2,draft-min=1")
    assert lane.qatserve_args() == ["-ctk", "q4_0", "-ctv", "q4_0", "-np", "3", "--no-kv-rotation", "--lookup",
                                    "--draft-max", "auto", "--draft-min", "1", "--spec-ngram-size-n", "2"]
    # llama.cpp's older flag spellings are accepted as keys too.
    assert parse_lane("lookup,draft=5,slots=1").qatserve_args()[-2:] == ["--draft-max", "5"]
    assert parse_lane("lookup,draft=5,slots=1").slots == 1


def test_peer_flags():
    args, env = parse_lane("ctk=q8_0,ctv=q8_0,rot=off").llama_server_args()
    assert args == ["-ctk", "q8_0", "-ctv", "q8_0", "-np", "2"] and env == {"LLAMA_ATTN_ROT_DISABLE": "1"}
    # Lookup: llama.cpp matches one n-gram size, which must not exceed the block, and drafts the block.
    args, _ = parse_lane("lookup").llama_server_args()
    assert args[-6:] == ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                         "--spec-ngram-simple-size-m", "3"]
    args, _ = parse_lane("lookup,draft-max=8").llama_server_args()
    assert args[-4:] == ["--spec-ngram-simple-size-n", "4", "--spec-ngram-simple-size-m", "8"]
    with pytest.raises(PeerUnsupported, match="adaptive block size"):
        parse_lane("lookup,draft-max=auto").llama_server_args()


def test_draft_model_lane(tmp_path):
    draft = tmp_path / "draft.gguf"
    draft.write_bytes(b"GGUF")
    lane = parse_lane(f"md={draft},draft-max=4,draft-p-min=0.5")
    assert lane.qatserve_args()[-6:] == ["-md", str(draft), "--draft-max", "4", "--draft-p-min", "0.5"]
    args, _ = lane.llama_server_args()
    assert args[-8:] == ["--spec-type", "draft-simple", "-md", str(draft), "--spec-draft-n-max", "4",
                         "--spec-draft-p-min", "0.5"]


def test_sweep_lane_names():
    assert parse_lane("lookup").with_draft_max(2).name == "lookup,draft-max=2"
    swept = parse_lane("q8_0,lookup,draft=4").with_draft_max(7)
    assert (swept.name, swept.draft_max, swept.ctk) == ("q8_0,lookup,draft-max=7", 7, "q8_0")


@pytest.mark.parametrize("text, needle", [
    ("", "empty lane"),
    ("f17", "unknown setting 'f17' (did you mean 'f16'?)"),
    ("lokup", "did you mean 'lookup'?"),
    ("ctk=q9", "ctk=q9 is not a K/V cache type"),
    ("lookup=1", "lookup takes no value"),
    ("ctk", "ctk needs a value"),
    ("ctk=", "ctk= has no value"),
    ("draft-max=3", "draft-max needs a drafter"),
    ("lookup,md=x", "one drafter per lane, got lookup and md"),
    ("md=x,ngram=2", "ngram applies to lookup only"),
    ("lookup,draft-max=0", "draft-max must be 1..64, got 0"),
    ("lookup,draft-max=x", "draft-max expects an integer"),
    ("lookup,draft-min=5,draft-max=2", "draft-min (5) is larger than draft-max (2)"),
    ("lookup,draft-p-min=2", "draft-p-min must be in [0, 1]"),
    ("f16,kv=q8_0", "kv is set twice"),
    ("ctk=f16,ctk=q8_0", "ctk is set twice"),
    ("np=0", "np must be 1..64"),
    ("rot=maybe", "rot must be on or off"),
    ("md=/no/such/file.gguf", "no such file"),
    ("lookup,,f16", "empty setting"),
    ("f16,ngram=2", "needs a drafter"),
])
def test_lane_errors(text, needle):
    with pytest.raises(LaneError) as e:
        parse_lane(text)
    assert needle in str(e.value)
    if text:
        assert str(e.value).startswith(f"lane {text.strip()!r}: ")


def test_duplicate_lanes_and_sweeps():
    with pytest.raises(LaneError, match="given twice"):
        parse_lanes(["f16", "f16"])
    assert parse_sweep("draft-max=1..8") == list(range(1, 9))
    assert parse_sweep("draft-max=4,1..2,2") == [1, 2, 4]
    for bad, needle in (("ctk=1..2", "only draft-max"), ("draft-max", "give the block sizes"),
                        ("draft-max=3..1", "1 <= N <= M <= 64"), ("draft-max=a", "not N or N..M")):
        with pytest.raises(LaneError, match=needle.replace(".", r"\.")):
            parse_sweep(bad)
