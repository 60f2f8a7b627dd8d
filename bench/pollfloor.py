"""The floor of an idle mount's polling: a bare httpx client making the requests memfuse's
poller makes, on its schedule (the attached listing every 0.5 s; the attached and the owned
listing every 3 s, or five times what that took), and nothing else: no digest, no decoding,
no reconciliation, no FUSE. Prints its CPU use over the window as % of one core, and its
requests/s, as JSON on stdout. Run beside memfuse by bench/scale.py.

Usage: python bench/pollfloor.py BASE_URL AGENT_ID SECONDS
"""
from __future__ import annotations

import json
import sys
import time

import httpx

INTERVAL = 0.5      # memfuse's --poll-interval default
FULL_INTERVAL = 3.0  # memfuse's --full-poll-interval default
COST_FACTOR = 5      # poller.FULL_COST_FACTOR
PAGE = 2000          # letta.PAGE_SIZE
ID = b'"id":"block-'


def main() -> None:
    base, agent_id, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    attached = f"/v1/agents/{agent_id}/core-memory/blocks"
    requests = 0
    with httpx.Client(base_url=base, timeout=120) as client:
        cpu0, start = time.process_time(), time.monotonic()
        next_full = start
        while time.monotonic() - start < seconds:
            began = time.monotonic()
            client.get(attached, params={"limit": PAGE}).raise_for_status()
            requests += 1
            if began >= next_full:
                after = None
                while True:  # the owned listing, paged as memfuse pages it
                    params = {"tags": f"owner:{agent_id}", "limit": PAGE,
                              **({"after": after} if after else {})}
                    body = client.get("/v1/blocks/", params=params).content
                    requests += 1
                    # memfuse does not decode an unchanged page: neither does the floor (the
                    # bench's values never hold this text, so a search finds the ids)
                    if body.count(ID) < PAGE:
                        break
                    start_id = body.rindex(ID) + len(ID) - len(b"block-")
                    after = body[start_id:body.index(b'"', start_id)].decode()
                spent = time.monotonic() - began
                next_full = time.monotonic() + max(FULL_INTERVAL, COST_FACTOR * spent)
            time.sleep(max(0.0, began + INTERVAL - time.monotonic()))
        elapsed = time.monotonic() - start
        cpu = time.process_time() - cpu0
    print(json.dumps({"cpu_pct": cpu / elapsed * 100, "req_s": requests / elapsed}))


if __name__ == "__main__":
    main()
