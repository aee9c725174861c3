#!/usr/bin/env python3
"""A full data directory under a running `ladle api`: mounts an 8 MiB tmpfs (needs root),
starts BINARY with its data directory there, stores one job, fills the tmpfs to its last
byte, then sends 40 submits and looks each acknowledged one up with GET. Prints the answers,
how many acknowledged jobs GET cannot find, and /readyz's status.

    sudo python3 benches/full_disk.py path/to/ladle [port=18190]

Only the standard library. See BENCHMARKS.md.
"""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

binary = sys.argv[1]
port = int(sys.argv[2]) if len(sys.argv) > 2 else 18190
mnt = f"/tmp/ladle-full-disk-{port}"
os.makedirs(mnt, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt], check=True)
try:
    # Inputs and outputs beside the data directory, in a root of their own (outputs inside the
    # data directory are refused, `storage_not_allowed`).
    data = mnt + "/data"
    for m in ["a", "b"]: os.makedirs(f"{mnt}/{m}", exist_ok=True)
    p = subprocess.Popen([binary, "api", "--bind", f"127.0.0.1:{port}", "--data-dir", data,
                          "--allowed-root", mnt],
                         stderr=open(f"{mnt}.log", "w"), env={**os.environ, "NO_COLOR": "1"})
    base = f"http://127.0.0.1:{port}"
    def req(method, path, body=None):
        r = urllib.request.Request(base + path, method=method, data=body and json.dumps(body).encode(),
                                   headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(r) as resp: return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e: return e.code, json.loads(e.read() or b"null")
    for _ in range(100):
        try: req("GET", "/healthz"); break
        except Exception: time.sleep(0.1)
    def recipe(i): return {"method": "linear", "models": [{"uri": f"file://{mnt}/a/"}, {"uri": f"file://{mnt}/b/"}],
                           "output": {"uri": f"file://{mnt}/out-{i}/"}}
    print("before filling:", req("POST", "/v1/merges", recipe(0))[0])
    fd = os.open(mnt + "/filler", os.O_WRONLY | os.O_CREAT)
    for n in [65536, 512, 1]:
        while True:
            try: os.write(fd, b"\0" * n)
            except OSError: break
    os.close(fd)
    codes, lost = {}, 0
    for i in range(1, 41):
        st, v = req("POST", "/v1/merges", recipe(i))
        key = f"{st} {v.get('code', '')}" if st != 202 else "202"
        codes[key] = codes.get(key, 0) + 1
        if st == 202 and req("GET", f"/v1/merges/{v['id']}")[0] == 404: lost += 1
    print(f"{binary}: 40 submits on a full disk: {codes}; acknowledged but not found by GET: {lost}; /readyz: {req('GET', '/readyz')[0]}")
    p.terminate(); p.wait(10)
finally:
    subprocess.run(["umount", mnt]); os.rmdir(mnt)
