"""How Label Studio should get the query images: served from a local-files storage (what
tidal/labeling/labelstudio.py does) or embedded in each task as a data: URI (what works without shared
files). One real Label Studio (the Makefile's .venv-labelstudio), N queried samples written as
tidal writes them (32×32 RGB PNGs, CIFAR-10's size), one project per way:

* push: POST /api/projects/<id>/import of the N tasks (the time push_query spends in Label Studio),
* the tasks' size: the bytes of the project's JSON export (what every pull downloads),
* open: GET of one task's image the way the labeling page does (a local-files URL; a data: URI
  needs no request, it is in the task).

    python benchmarks/labelstudio_images.py --n 500
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from servers import label_studio  # noqa: E402  (the tests' Label Studio starter)

TOKEN = "0123456789abcdef" * 2 + "01234567"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "labelstudio_images"


def _call(url: str, method: str = "GET", body=None, raw: bool = False):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        data = resp.read()
    return data if raw else (json.loads(data) if data else None)


def _pngs(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=9)
        path = folder / f"{k + 1:05d}.png"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="queried samples (default 500)")
    p.add_argument("--repeats", type=int, default=3, help="pushes per way, one project each (default 3)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tidal-ls-images-"))
    images = _pngs(root / "cycles" / "0" / "images", args.n)
    config = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image" choice="single">'
              '<Choice value="a"/><Choice value="b"/></Choices></View>')
    results: dict[str, dict] = {}
    with label_studio(root / "ls-data", root, TOKEN) as ls:
        url = ls["url"]
        for way in ("local-files", "data-uri"):
            push_s, export_bytes, open_s = [], [], []
            for r in range(args.repeats):
                project = _call(f"{url}/api/projects", "POST", {"title": f"bench {way} {r}", "label_config": config})
                if way == "local-files":
                    _call(f"{url}/api/storages/localfiles", "POST", {"project": project["id"], "path": str(root / "cycles"),
                                                                    "title": "images", "use_blob_urls": False})
                    image = [f"/data/local-files/?d={p.relative_to(root).as_posix()}" for p in images]
                else:
                    image = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images]
                tasks = [{"data": {"image": im, "sample_id": f"s{k}", "query_id": "q", "rank": k + 1}}
                         for k, im in enumerate(image)]
                start = time.perf_counter()
                _call(f"{url}/api/projects/{project['id']}/import", "POST", tasks)
                push_s.append(time.perf_counter() - start)
                export_bytes.append(len(_call(f"{url}/api/projects/{project['id']}/export?exportType=JSON"
                                              "&download_all_tasks=true", raw=True)))
                if way == "local-files":
                    start = time.perf_counter()
                    got = _call(url + image[0], raw=True)
                    open_s.append(time.perf_counter() - start)
                    assert got == images[0].read_bytes()
            results[way] = {"push_s_median": round(statistics.median(push_s), 3), "push_s": [round(x, 3) for x in push_s],
                            "export_bytes": export_bytes[0],
                            "open_image_s_median": round(statistics.median(open_s), 4) if open_s else 0.0}
    record = {"n": args.n, "repeats": args.repeats, "results": results, "png_bytes_total": sum(p.stat().st_size for p in images),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_at_start": os.getloadavg()[0],
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    lf, du = results["local-files"], results["data-uri"]
    lines = ["# Query images in Label Studio: local-files storage or data: URIs", "",
             "Produced by (from the repository root):", "", "```bash",
             f"python benchmarks/labelstudio_images.py --n {args.n}", "```", "",
             f"{args.n} 32×32 PNGs ({record['png_bytes_total']:,} bytes), {args.repeats} pushes per way, "
             f"medians; {record['machine']}, load average {record['load_avg_at_start']:.1f} at the start.", "",
             "| way | push (s) | project export (bytes) | open one image (s) |", "|---|---|---|---|",
             f"| local-files storage | {lf['push_s_median']} | {lf['export_bytes']:,} | {lf['open_image_s_median']} |",
             f"| data: URI in the task | {du['push_s_median']} | {du['export_bytes']:,} | 0 (in the task) |", ""]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
