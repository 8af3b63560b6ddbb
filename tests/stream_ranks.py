"""Run under torchrun (gloo): stream a pack's train split as training does, two epochs, and write the ids
each rank saw (and the largest its cache folder grew to) to ``<out>/rank<r>.json``.

``python -m torch.distributed.run --nproc_per_node 2 tests/stream_ranks.py PACK OUT CACHE_BYTES``
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path


def folder_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass  # removed by the eviction meanwhile
    return total


def main() -> None:
    import torch.distributed as dist

    from streetvision.data import packed
    from streetvision.models.datamodule import EpochLoader

    pack_uri, out, cache_bytes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")  # before the stream is built: it records the rank then
    rank = dist.get_rank()
    pack = packed.open_pack(pack_uri)
    cache = out / f"cache{rank}"
    peak, done = [0], threading.Event()

    def sample() -> None:  # the cache's size, every 10 ms, while streaming
        while not done.is_set():
            peak[0] = max(peak[0], folder_bytes(cache))
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stream = packed.streamed(pack, "train", packed.Decode(lambda im: 0, 16), cache_dir=cache,
                             cache_bytes=cache_bytes, shuffle=True, seed=5)  # fmt: skip
    loader = EpochLoader(stream, {"epochs": 0}, batch_size=4)
    epochs = [[int(i) for _, _, batch in loader for i in batch] for _ in range(2)]
    done.set()
    sampler.join()
    record = {"rank": rank, "world": dist.get_world_size(), "epochs": epochs, "peak_cache_bytes": peak[0],
              "ids": pack.ids("train")}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
