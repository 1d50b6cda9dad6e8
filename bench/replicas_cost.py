"""What the database pays per image when N replicas share one PostgreSQL and one object store.

    .venv/bin/python bench/replicas_cost.py [--replicas 2 3] [--processes 48] [--idle-s 30]

For each N: starts moto's S3 server and N replicas of the shipped configuration (leases at
their default, 30 s) on a fresh PostgreSQL schema, images in the bucket. Then it reads
PostgreSQL's own counters (pg_stat_database, pg_stat_user_tables) around two phases:

- idle, `--idle-s` seconds with nothing to do: what the replicas' sweeps cost (queue polls);
- work, `--processes` DashAI processes sent round-robin to the replicas, until all have ended:
  transactions, rows written and index scans per image, lease renewals included.

Nothing else may use the database meanwhile (the counters are the whole database's); this
script's own reads are counted and taken off. Two cores cannot show throughput scaling: this
measures cost per image and checks that every process ended once, not speed-up. The figures go
to docs/scaling.md by hand, with the machine and date.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_task.local_server import start_s3_server, start_server, write_config  # noqa: E402

POSTGRES = os.environ.get("T2I_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BUCKET = "t2i-images"
POLL_S = 2.0
TABLES = ("generative_process", "process_data", "generative_session")


class Counters:
    """PostgreSQL's counters for one schema; each read is one transaction of ours, taken off."""

    def __init__(self, engine, schema: str) -> None:
        self.engine, self.schema, self.own_transactions = engine, schema, 0

    def read(self) -> dict[str, float]:
        with self.engine.connect() as db:
            db.execute(text("SELECT pg_stat_clear_snapshot()"))
            database = db.execute(text(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")).scalar()
            tables = db.execute(text(
                "SELECT coalesce(sum(n_tup_ins), 0), coalesce(sum(n_tup_upd), 0), coalesce(sum(n_tup_del), 0), "
                "coalesce(sum(idx_scan), 0), coalesce(sum(seq_scan), 0) FROM pg_stat_user_tables "
                "WHERE schemaname = :schema"), {"schema": self.schema}).one()
            db.commit()
        self.own_transactions += 1
        return {"transactions": database - self.own_transactions, "inserted": tables[0], "updated": tables[1],
                "deleted": tables[2], "index scans": tables[3], "table scans": tables[4], "at": time.monotonic()}


def delta(after: dict, before: dict) -> dict:
    return {key: after[key] - before[key] for key in after}


def wait_for_stats() -> None:
    time.sleep(1.5)  # backends flush their counters at most once a second when idle


def measure(replicas: int, processes: int, idle_s: float) -> dict:
    schema = f"t2i_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        db.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    folder = Path(tempfile.mkdtemp(prefix="replicas-cost-"))
    s3, aws = start_s3_server(folder / "moto.log", BUCKET)
    servers = []
    try:
        config = write_config(folder)
        for i in range(replicas):
            env = {**aws, "T2I_DATABASE_URL": url, "T2I_IMAGES_DIR": f"s3://{BUCKET}/images",
                   "T2I_INSTANCE_NAME": f"replica-{i}"}
            servers.append(start_server(config, env=env, log_name=f"replica-{i}.log", timeout=240))
        counters = Counters(admin, schema)
        clients = [httpx.Client(base_url=server.url, timeout=120) for server in servers]
        time.sleep(20)  # past every replica's first sweep and model warm-up
        wait_for_stats()
        before = counters.read()
        time.sleep(idle_s)
        wait_for_stats()
        idle = delta(counters.read(), before)

        before = counters.read()
        session = clients[0].post("/api/v1/generative-session/", json={
            "task_name": "TextToImageGenerationTask", "name": "cost", "parameters": {}}).json()["id"]
        ids = []
        for i in range(processes):
            while (answer := clients[i % replicas].post("/api/v1/generative-process/", json={
                    "session_id": session, "input": [f"a red circle {i}"]})).status_code == 429:
                time.sleep(float(answer.headers.get("Retry-After", 1)))  # the replica's queue is full
            answer.raise_for_status()
            ids.append(answer.json()["id"])
        polls = 0
        with admin.connect() as db:
            while True:
                polls += 1
                ended = db.execute(text(f'SELECT count(*) FROM "{schema}".generative_process '
                                        "WHERE status IN ('FINISHED', 'ERROR')")).scalar()
                db.commit()
                if ended == processes:
                    break
                time.sleep(POLL_S)
        wait_for_stats()
        work = delta(counters.read(), before)
        work["transactions"] -= polls  # ours; what creating the session and processes cost is theirs
        work["index scans"] -= polls  # our polls read the status index
        with admin.connect() as db:
            rows = db.execute(text(f'SELECT status, count(*) FROM "{schema}".generative_process GROUP BY status')).all()
            outputs = db.execute(text(f'SELECT count(*), count(DISTINCT data) FROM "{schema}".process_data '
                                      "WHERE NOT is_input")).one()
        for client in clients:
            client.close()
        return {"replicas": replicas, "processes": processes, "idle": idle, "work": work,
                "statuses": dict(rows), "outputs": tuple(outputs)}
    finally:
        for server in servers:
            server.stop()
        s3.terminate()
        with admin.connect() as db:
            db.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--processes", type=int, default=48)
    parser.add_argument("--idle-s", type=float, default=30)
    args = parser.parse_args()
    results = [measure(n, args.processes, args.idle_s) for n in args.replicas]
    print(f"\n{'replicas':>8} | {'idle tx/s':>9} | {'tx/image':>8} | {'rows ins/image':>14} | "
          f"{'rows upd/image':>14} | {'idx scans/image':>15} | {'work s':>6} | {'work tx/s':>9} | statuses, outputs (all, distinct)")
    for r in results:
        idle, work, n = r["idle"], r["work"], r["processes"]
        idle_s = idle["at"]
        print(f"{r['replicas']:>8} | {idle['transactions'] / idle_s:>9.2f} | {work['transactions'] / n:>8.1f} | "
              f"{work['inserted'] / n:>14.1f} | {work['updated'] / n:>14.1f} | {work['index scans'] / n:>15.1f} | "
              f"{work['at']:>6.0f} | {work['transactions'] / work['at']:>9.1f} | {r['statuses']}, {r['outputs']}")


if __name__ == "__main__":
    main()
