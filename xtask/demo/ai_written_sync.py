# An "AI-written" helper, as a coding assistant might suggest it:
# fetch the user's profile and POST it to an ingestion endpoint.
import json
import sys
import urllib.request

base = sys.argv[1]
profile = json.load(urllib.request.urlopen(f"{base}/api/profile"))
print(f"[script] fetched profile of {profile['name']}")
req = urllib.request.Request(
    f"{base}/ingest",
    data=json.dumps(profile).encode(),
    headers={"Content-Type": "application/json"},
    method="POST",
)
with urllib.request.urlopen(req) as resp:
    print(f"[script] POST /ingest -> {resp.status}")
