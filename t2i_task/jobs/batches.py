"""Bulk jobs (OpenAI's Batch API) run to their end: lines run as stored work, results written once.

A batch's lines are stored processes at bulk priority that nobody holds
(t2i_task/storage/batch_rows.py): replicas claim them as they claim any unheld
work (leases.py), the scheduler gives them what live and queued work leave
(scheduler.py), and each ends FINISHED or ERROR exactly once, whoever ran it.
When every line of a batch has ended, one replica takes the batch (`finalizing`,
under a lease) and writes its output file (one line per FINISHED process) and its
error file (one per ERROR process: invalid, failed, cancelled or expired), in
the input's order, then marks it completed, cancelled or expired. A batch past
its completion window has its unended lines ended (`expired`).

`BulkLines` is the part of `ProcessQueue` (processes.py) that does this.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from t2i_task.storage.process_rows import ERROR_PREFIX, IMAGE_TYPE
from t2i_task.storage.tables import Batch, GenerativeProcess, RunStatus
from t2i_task.task import encode_image

log = logging.getLogger(__name__)

FINALIZE_LEASE_FACTOR = 10  # a replica writing a batch's results holds it for this many serving.lease_s
EXPIRED_REASON = "the batch expired (its completion window ended) before this request ran"
CANCELLED_REASON = "cancelled"  # the batch was cancelled before this request ran (a process's own cancel's words)


class BulkLines:
    """ProcessQueue's methods for bulk jobs (it provides the state they use)."""

    def line_ended(self, batch_id: str) -> None:
        """A line of this batch ended here: if it may have been the last (none other is in hand here),
        write the batch's results now (take_batch_to_finalize says whether every line has ended)."""
        if not self.draining and batch_id not in self.bulk_lines.values():
            self._finalize_soon(batch_id)

    async def batch_cancelled(self, batch_id: str) -> None:
        """The batch's unended lines were ended in the database: stop those running here now (other
        replicas see it at their next lease renewal), and write its results once none runs."""
        for process_id in [line for line, batch in self.bulk_lines.items() if batch == batch_id]:
            await self._let_go(process_id)
        self.line_ended(batch_id)

    async def end_batches(self) -> None:
        """End what is due (each sweep): batches past their window expire; batches whose lines have all
        ended (on any replica), or whose finalizing replica died, are finalized."""
        expired, ready = await self.db(self.store.batches_to_end)
        for batch_id in expired:
            await self.db(self.store.end_batch_lines, batch_id, EXPIRED_REASON, expired=True)
            log.warning("batch %s expired: its lines not yet run end with an error", batch_id)
            ready.append(batch_id)
        for batch_id in ready:
            self._finalize_soon(batch_id)

    def _finalize_soon(self, batch_id: str) -> None:
        task = asyncio.create_task(self._finalize(batch_id))
        self._finalizing.add(task)
        task.add_done_callback(self._finalizing.discard)

    async def _finalize(self, batch_id: str) -> None:
        lease_s = self.serving.lease_s * FINALIZE_LEASE_FACTOR
        try:
            batch = await self.db(self.store.take_batch_to_finalize, batch_id, self.instance, lease_s)
            if batch is None:  # lines still running somewhere, or another replica writes it
                return
            output_id, error_id, counts = await self.db(self._write_results, batch)
            ended = await self.db(self.store.end_batch, batch_id, self.instance, output_id, error_id)
        except Exception:  # the database or the storage away: the next sweep tries again
            log.exception("batch %s: results not written; the next sweep retries", batch_id)
            return
        if ended is None:  # taken over meanwhile (this replica hung past its lease): the other one's files stand
            await self.db(self._remove_files, [output_id, error_id])
            return
        log.info("batch %s %s: %d lines, %d succeeded, %d failed; output %s, errors %s", batch_id, ended.status,
                 batch.total, counts[0], counts[1], output_id, error_id)

    def _remove_files(self, file_ids: list[str | None]) -> None:
        for file_id in filter(None, file_ids):
            self.store.delete_file(file_id)

    def _write_results(self, batch: Batch) -> tuple[str | None, str | None, tuple[int, int]]:
        """Write the batch's output and error files (JSONL, in the input's order); their ids (None for an
        empty one) and the lines in each."""
        with tempfile.TemporaryDirectory(prefix="t2i-batch-") as folder:
            output, errors = Path(folder) / "output.jsonl", Path(folder) / "errors.jsonl"
            counts = [0, 0]
            with output.open("w") as good, errors.open("w") as bad:
                for lines in self.store.batch_lines(batch.id):
                    for process in lines:
                        ok, line = result_line(process, self.store.images.read)
                        (good if ok else bad).write(json.dumps(line) + "\n")
                        counts[0 if ok else 1] += 1
            ids = [self.store.create_file("batch_output", f"{batch.id}_{kind}.jsonl", path, path.stat().st_size,
                                          account=batch.account).id
                   if count else None for kind, path, count in (("output", output, counts[0]),
                                                               ("error", errors, counts[1]))]
        return ids[0], ids[1], (counts[0], counts[1])


def result_line(process: GenerativeProcess, read_image: Callable[[str], bytes]) -> tuple[bool, dict[str, Any]]:
    """A line of the output file (True) or of the error file (False), as OpenAI's Batch API writes them."""
    answer = (process.parameters or {}).get("answer", {})
    request_id = f"req_{process.batch_id}_{process.id}"
    line = {"id": f"batch_req_{process.id}", "custom_id": process.custom_id}
    if process.status is RunStatus.FINISHED:
        images = [row.data for row in process.output if row.data_type == IMAGE_TYPE]
        if answer.get("response_format") == "url":
            data = [{"url": answer["links"] + name} for name in images]
        else:
            data = [{"b64_json": encode_image(read_image(name), answer.get("output_format", "png"),
                                              answer.get("output_compression"))} for name in images]
        body = {"created": int(process.end_time.timestamp()), "data": data, **answer.get("echo", {})}
        return True, {**line, "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
    message = next((row.data.removeprefix(ERROR_PREFIX) for row in process.output if row.data_type != IMAGE_TYPE),
                   "no result")
    if "status_code" in answer:  # refused as a live request would have been
        status, code, kind = answer["status_code"], answer.get("code", "invalid_request"), "invalid_request_error"
    elif message == CANCELLED_REASON:
        status, code, kind = 499, "batch_cancelled", "invalid_request_error"
    elif message == EXPIRED_REASON:
        status, code, kind = 499, "batch_expired", "invalid_request_error"
    else:
        status, code, kind = 500, "generation_failed", "server_error"
    error = {"message": message, "type": kind, "param": answer.get("param"), "code": code}
    return False, {**line, "response": {"status_code": status, "request_id": request_id, "body": {"error": error}},
                   "error": {"code": code, "message": message}}

