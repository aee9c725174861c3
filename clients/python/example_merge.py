"""Submit a merge with the generated client, wait for it, print the manifest URL.

Usage: PYTHONPATH=clients/python python clients/python/example_merge.py BASE_URL RECIPE.json
(set LADLE_TOKEN when the server has tokens). Exits 1 when the job does not succeed.
"""

import json
import os
import sys
import time

from ladle_client import AuthenticatedClient
from ladle_client.api.merges import get_merge, submit_merge
from ladle_client.models import JobState, JobView, MergeRequest


def main() -> int:
    base, recipe_path = sys.argv[1], sys.argv[2]
    # A server without tokens (loopback) ignores the header: any placeholder will do.
    client = AuthenticatedClient(base_url=base, token=os.environ.get("LADLE_TOKEN") or "none")
    with open(recipe_path) as f:
        body = MergeRequest.from_dict(json.load(f))
    job = submit_merge.sync(client=client, body=body)
    if not isinstance(job, JobView):
        print(f"refused: {job}", file=sys.stderr)
        return 2
    print(f"job: {job.id}")
    deadline = time.monotonic() + 120
    while job.state in (JobState.QUEUED, JobState.RUNNING):
        if time.monotonic() > deadline:
            print("timed out", file=sys.stderr)
            return 1
        time.sleep(0.2)
        job = get_merge.sync(job.id, client=client)
        assert isinstance(job, JobView), job
    print(f"state: {job.state.value}")
    if job.state != JobState.SUCCEEDED:
        print(f"error: {job.error}", file=sys.stderr)
        return 1
    uri = job.result["uri"]
    print(f"manifest: {uri.rstrip('/')}/ladle-manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
