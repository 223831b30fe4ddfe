"""Code-cache extraction: images/s and peak resident memory at 2k and 20k examples.

    python -m benchmarks.extraction [--sizes 2000,20000] [--views center_flip] [--batch 256]

Each size runs in a fresh process (peak RSS = `ru_maxrss` of that process): a synthetic
source of 32x32 images made from their index (nothing held in memory), the digits VQ
tokenizer of experiments.llamagen_imagenet (random weights: the cost, not the codes, matters)
jitted over all local devices, every view of every image encoded and written to `.npy`
shards (`arjax.data.cache.extract`), then one epoch streamed back through `Batches`. A cache
that lived in memory would grow with the split; a streamed one stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
import jax, numpy as np
from flax import nnx
from arjax import sharding
from arjax.data import Batches, cache
from arjax.data.sources import ViewSource
from arjax.images import to_float
from arjax.models import bind, split
from arjax.tokenizers.vq import VQTokenizer
from experiments.llamagen_imagenet import DIGITS

class Synthetic(ViewSource):
    def __init__(self, n, views):
        super().__init__(32, views)
        self.num_examples, self.num_classes = n, 10
    def decode(self, idx):
        return ([np.random.default_rng(int(i)).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                 for i in idx], np.asarray(idx) % 10)

n, views, batch, path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
graphdef, params = split(VQTokenizer(DIGITS.tokenizer, rngs=nnx.Rngs(0)))
encode = lambda x: bind(graphdef, params).encode(to_float(x))
mesh = sharding.make_mesh((("data", -1),))
source = Synthetic(n, views)
t0 = time.perf_counter()
store = cache.extract(encode, source, path, "bench", batch, mesh, np.uint16, progress=False)
extract_s = time.perf_counter() - t0
batches = Batches(store, batch, 0, mesh)
t0 = time.perf_counter()
for _ in range(n // batch):
    jax.block_until_ready(next(batches))
read_s = time.perf_counter() - t0
batches.close()
print(json.dumps({"n": n, "views": source.num_views, "extract_s": extract_s,
                  "read_s": read_s, "images_per_s": n * source.num_views / extract_s,
                  "rows_read_per_s": (n // batch) * batch / read_s,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--views", default="center_flip")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores, load {os.getloadavg()}")
    print("| examples | views | images encoded/s | extraction s | rows read/s (stream) "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for n in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), args.views,
                                  str(args.batch), os.path.join(tmp, "cache")],
                                 capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {n} | {r['views']} | {r['images_per_s']:.0f} | {r['extract_s']:.1f} | "
              f"{r['rows_read_per_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
