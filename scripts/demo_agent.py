"""Print the id of the demo agent on $LETTA_BASE_URL, creating it on first use.

The agent needs no LLM key: model and embedding are `letta/letta-free` and it has no tools; its
memory has a `human` and a `persona` block and a `projects/memfuse` block (a subdirectory).
"""
import os

import httpx

NAME = "memfuse-demo"

with httpx.Client(base_url=os.environ["LETTA_BASE_URL"], timeout=30) as api:
    found = [a for a in api.get("/v1/agents/", params={"name": NAME}).raise_for_status().json()
             if a["name"] == NAME]
    if found:
        print(found[0]["id"])
    else:
        response = api.post("/v1/agents/", json={
            "name": NAME, "model": "letta/letta-free", "embedding": "letta/letta-free",
            "include_base_tools": False,
            "memory_blocks": [
                {"label": "human", "value": "Nothing is known about the human yet.\n",
                 "description": "What the agent knows about the human", "limit": 5000},
                {"label": "persona", "value": "I am a helpful agent whose memory is a folder.\n",
                 "description": "Who the agent is", "limit": 5000},
                {"label": "projects/memfuse", "value": "memfuse mounts my memory with FUSE.\n",
                 "description": "Notes on the memfuse project", "limit": 5000},
            ],
        })
        print(response.raise_for_status().json()["id"])
