"""Bad input (issue 11, part 3): see tests/reliability/corpus.py for the documents."""

from __future__ import annotations

import json

import pytest

from repage.stores.objects import ObjectStore
from repage.stores.vectors import MilvusVectors
from tests.fixtures.s3 import create_bucket, unique_bucket_name
from tests.fixtures.milvus import unique_name
from tests.reliability.corpus import DIM, build_corpus
from tests.reliability.stores import write_config
from tests.support.reliability import MILVUS_TOKEN, S3_KEY_ID, S3_SECRET, CliLog, record

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_corpus_scratch(milvus_server_uri, moto_endpoint, tmp_path):
    cases = build_corpus()
    collection = unique_name("bad")
    with MilvusVectors.create_collection(milvus_server_uri, collection, dim=DIM, pk="auto", chunk_id_field=True) as v:
        v.insert([r for c in cases for r in c.rows])
    bucket = unique_bucket_name()
    create_bucket(moto_endpoint, bucket)
    with ObjectStore.from_url(f"s3://{bucket}", endpoint=moto_endpoint, access_key_id=S3_KEY_ID,
                              secret_access_key=S3_SECRET) as objects:
        for c in cases:
            for key, data in c.objects.items():
                objects.put(key, data)
    env = {"REPAGE_MILVUS_URI": milvus_server_uri, "REPAGE_MILVUS_TOKEN": MILVUS_TOKEN, "REPAGE_COLLECTION": collection,
           "REPAGE_STORE_URL": f"s3://{bucket}", "REPAGE_S3_ENDPOINT": moto_endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "REPAGE_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}
    write_config(tmp_path)
    cli = CliLog()
    scan = cli.run("scan", "--json", env=env, cwd=tmp_path)
    print("SCAN", scan.returncode, scan.stderr[-2000:])
    if scan.returncode == 0:
        for d in scan.json()["documents"]:
            print("  ", d["document_id"][:30], d["path"], d["state"], d["reason"][:150])
    run = cli.run("run", "--json", env=env, cwd=tmp_path)
    print("RUN", run.returncode, run.stderr[-2000:])
    if run.stdout:
        s = run.json()
        print(json.dumps({k: s[k] for k in ("documents", "migrated", "failed", "other", "stopped_because")}))
        for d, e in s["errors"].items():
            print("  ERR", d[:30], e[:300])
    st = cli.run("status", "--json", env=env, cwd=tmp_path)
    print("STATUS", st.stdout[:3000])
