"""What each API key has used: `GET /v1/usage`, the caller's own figures (an admin's: everyone's).

Images made and model-seconds (each generation's cost by its model's calibration, what the
scheduler charges it), counted in the database as each generation finishes on any replica, so
every replica answers the same; deleting work does not take usage back. The same figures are
Prometheus gauges labelled by key name (`t2i_key_images`, `t2i_key_model_seconds` on /metrics).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from t2i_task.api.backend import BackendDep, OwnerDep

router = APIRouter()


@router.get("/v1/usage")
async def usage(backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    """`{"object": "list", "data": [{"key", "images", "model_seconds"}]}`: the caller's key (with no keys
    configured, the one user's, named ""); an admin key gets a line for every key."""
    rows = {row.account: (row.images, row.model_seconds) for row in await backend.db(backend.store.usage, owner.scope)}
    if owner.scope is not None:
        rows.setdefault(owner.account, (0, 0.0))  # nothing of theirs has finished yet
    return {"object": "list", "data": [{"key": account, "images": images, "model_seconds": round(seconds, 3)}
                                       for account, (images, seconds) in sorted(rows.items())]}
