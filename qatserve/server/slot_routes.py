"""llama.cpp's slot actions: `POST /slots/{id}?action=save|restore|erase`, body {"filename": NAME} for
save and restore. Disabled (501, as llama.cpp) unless the server runs with --slot-save-path DIR.

Answers as llama.cpp's: save {id_slot, filename, n_saved, n_written, timings.save_ms}; restore {id_slot,
filename, n_restored, n_read, timings.restore_ms}; erase {id_slot, n_erased}. A slot that is processing a
request answers 409 (llama.cpp defers the action instead; here the client retries).

NAME is a plain file name inside DIR (llama.cpp's fs_validate_filename rules, plus no leading dot):
no path separators, so `../x` and absolute paths are refused before any file is touched; symlinks and
other non-regular files in DIR are refused (engine/slot_file.py opens without following them). The file
is read and validated off the event loop and off the engine thread; only a validated image reaches the
engine, whose thread writes it into the cache between two steps (AsyncEngine.call), as it copies a slot
out for save, so neither ever races a step.
"""

from __future__ import annotations

import asyncio
import time
import unicodedata
from pathlib import Path

from fastapi import APIRouter, Request

from qatserve.engine import slot_file
from qatserve.engine.slot_cache import SlotBusy
from qatserve.errors import RequestError
from qatserve.server.body import parse_body
from qatserve.server.errors import APIError, bad_request, from_engine
from qatserve.server.schemas import SlotFileRequest
from qatserve.server.state import ServerState, state_of

router = APIRouter()
ACTIONS = ("save", "restore", "erase")
_FORBIDDEN = set('/\\:*?"<>|') | {"\ufffd", "\ufeff", "\uff0e", "\u2215", "\u2216"}


def check_filename(name: str) -> str:
    """A name that can only mean a file directly inside the save directory, else 400 naming `filename`."""
    bad = (not name or len(name.encode("utf-8", "surrogatepass")) > 255 or name.startswith((".", " "))
           or name.endswith((".", " ")) or any(c in _FORBIDDEN or unicodedata.category(c) in ("Cc", "Cs")
                                                for c in name))
    if bad:
        raise bad_request(f"invalid filename {name[:80]!r}: a plain file name inside --slot-save-path is expected "
                          "(no path separators, no leading dot, no control or reserved characters)",
                          param="filename", code="invalid_filename")
    return name


def _slot_id(raw: str, state: ServerState) -> int:
    n = state.engine.config.n_slots
    if not (raw.isascii() and raw.isdigit()) or int(raw) >= n:
        raise bad_request(f"Invalid slot ID {raw[:20]!r}: this server has slots 0..{n - 1}", param="id_slot")
    return int(raw)


async def _identity(state: ServerState) -> slot_file.CacheIdentity:
    # Computed on first use: the model fingerprint reads a little of every tensor, not worth start-up time.
    if state.slot_identity is None:
        state.slot_identity = await asyncio.to_thread(slot_file.CacheIdentity.of, state.engine, state.loaded.gguf)
    return state.slot_identity


async def _on_engine(state: ServerState, fn):
    try:
        return await state.aengine.call(fn)
    except SlotBusy as e:
        raise APIError(409, str(e), param="id_slot", code="slot_busy", headers={"Retry-After": "1"}) from None
    except RequestError as e:
        raise bad_request(str(e), param="filename" if isinstance(e, slot_file.SlotFileError) else None) from None
    except Exception as e:
        raise from_engine(e) from None


@router.post("/slots/{id_slot}")
async def slot_action(request: Request, id_slot: str) -> dict:
    state = state_of(request)
    if state.config.slot_save_path is None:
        raise APIError(501, "This server does not support slots action. Start it with `--slot-save-path`",
                       code="not_supported")
    i = _slot_id(id_slot, state)
    action = request.query_params.get("action")
    if action not in ACTIONS:
        raise bad_request(f"Invalid action {str(action)[:20]!r}: expected one of {', '.join(ACTIONS)}", param="action")
    t0 = time.perf_counter()
    if action == "erase":
        n = await _on_engine(state, lambda eng: eng.erase_slot(i))
        return {"id_slot": i, "n_erased": n}
    body: SlotFileRequest = await parse_body(request, SlotFileRequest)
    name = check_filename(body.filename)
    directory = Path(state.config.slot_save_path)
    ident = await _identity(state)
    if action == "save":
        image = await _on_engine(state, lambda eng: eng.save_slot(i))
        try:
            n_bytes = await asyncio.to_thread(slot_file.write, directory, name, image, ident)
        except slot_file.SlotFileError as e:
            raise bad_request(str(e), param="filename") from None
        except OSError as e:
            raise APIError(500, f"cannot write slot file {name!r}: {e.strerror or e}",
                           code="slot_save_failed") from None
        return {"id_slot": i, "filename": name, "n_saved": len(image.tokens), "n_written": n_bytes,
                "timings": {"save_ms": 1000 * (time.perf_counter() - t0)}}
    try:
        image, n_bytes = await asyncio.to_thread(slot_file.read, directory, name, ident)
    except slot_file.SlotFileError as e:
        raise bad_request(f"Unable to restore slot: {e}", param="filename", code="invalid_slot_file") from None
    except OSError as e:
        raise bad_request(f"Unable to restore slot: cannot read {name!r}: {e.strerror or e}", param="filename",
                          code="invalid_slot_file") from None
    n = await _on_engine(state, lambda eng: eng.restore_slot(i, image))
    return {"id_slot": i, "filename": name, "n_restored": n, "n_read": n_bytes,
            "timings": {"restore_ms": 1000 * (time.perf_counter() - t0)}}
