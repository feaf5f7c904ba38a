"""Benchmark of the host side of the input pipeline: decode, two flipped random resized crops, relative geometry,
block mask (the photometric augmentation runs on the accelerator, inside the train step).

    python -m siim_jax.tools.bench_input --make-jpegs /tmp/bench_jpegs            # 1000 photo-like 500x375 JPEGs
    python -m siim_jax.tools.bench_input --source imagefolder:/tmp/bench_jpegs --batch 64 --steps 20 [--baseline]

Ends with `images_per_sec_per_core: <number>`: images per second of process CPU time, which is the host
images/s divided by the cores it kept busy. `--baseline` first times the same images through the official code's
host-side work (PIL decode; torchvision flip, random resized crop, colour jitter, grayscale; PIL Gaussian blur and
solarise; ToTensor and Normalize; the block mask; collation into batches) in a torch DataLoader with one worker
process, CPU time of both processes counted; it needs torchvision. Both sides use the same block-mask generator
(the BEiT algorithm of SPEC section 1). Also installed as `siim-jax-bench-input`; the old name
`python -m siim_jax.data.bench` still works.
"""

import argparse
import os
import sys
import time

import numpy as np
from ml_collections import ConfigDict

from siim_jax.data.masks import block_mask
from siim_jax.data.pipeline import TwoViewBatches
from siim_jax.data.sources import SourceError, open_source


def _official_style_transforms(image_size: int, crop_min: float):
    """The official SiameseIM host transforms of the two views, as torchvision / PIL callables (SPEC section 1)."""
    import torchvision.transforms as T
    from PIL import ImageFilter, ImageOps

    def blur(image):
        return image.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))

    def view(blur_p: float, solarize_p: float):
        return T.Compose([
            T.RandomHorizontalFlip(),
            T.RandomResizedCrop(image_size, scale=(crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.Lambda(blur)], p=blur_p),
            T.RandomApply([T.Lambda(ImageOps.solarize)], p=solarize_p),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

    return view(1.0, 0.0), view(0.1, 0.2)


class _OfficialStyleDataset:
    """torch Dataset: image file -> (view1, view2) normalised float tensors (3, S, S) and the mask (g*g,)."""

    def __init__(self, paths, image_size: int, grid: int, num_masked: int, crop_min: float):
        self.paths = paths
        self.transforms = _official_style_transforms(image_size, crop_min)
        self.grid, self.num_masked = grid, num_masked

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        import torch
        from PIL import Image

        try:
            with open(self.paths[index], "rb") as f:
                image = Image.open(f).convert("RGB")  # torchvision's pil_loader
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # the official loader does not skip bad files: stop with a message naming the file
            raise ValueError(f"the official-style baseline cannot read {self.paths[index]}: {e}") from None
        mask = block_mask(np.random.default_rng(index), self.grid, self.num_masked)
        return self.transforms[0](image), self.transforms[1](image), torch.from_numpy(mask)


def time_baseline(paths, batches: int, batch: int, image_size: int, grid: int, num_masked: int,
                  crop_min: float) -> dict:
    """The official code's way: a torch DataLoader with one worker process builds and collates `batches` batches
    of `batch`. Returns images, wall seconds and CPU seconds of both processes (the worker's start and its first
    batch are included: about 1% at 15 batches)."""
    import resource

    import torch

    torch.set_num_threads(1)
    dataset = _OfficialStyleDataset(paths, image_size, grid, num_masked, crop_min)
    sampler = [k % len(paths) for k in range(batches * batch)]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, cpu = time.perf_counter(), time.process_time()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=1,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    for _ in loader:
        pass
    del loader  # the worker exits and is reaped, so its CPU time is counted below
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return {"images": batches * batch, "wall_s": wall, "cpu_s": cpu}


def time_pipeline(batches: TwoViewBatches, steps: int) -> dict:
    """Host batches 1..steps from TwoViewBatches.iterate (step 0 warms up); images, wall and CPU seconds."""
    stream = batches.iterate(0)
    next(stream)
    wall, cpu = time.perf_counter(), time.process_time()
    skipped = 0
    for _ in range(steps):
        skipped += len(next(stream)[1])
    result = {"images": steps * batches.batch_size, "wall_s": time.perf_counter() - wall,
              "cpu_s": time.process_time() - cpu, "skipped": skipped}
    stream.close()
    return result


def _report(name: str, r: dict, cores: int) -> float:
    per_core = r["images"] / r["cpu_s"]
    print(f"{name}: {r['images']} images in {r['wall_s']:.2f} s wall ({r['images'] / r['wall_s']:.1f} images/s "
          f"on {cores} thread(s)), {r['cpu_s']:.2f} s CPU -> {per_core:.1f} images/s per core", flush=True)
    return per_core


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m siim_jax.tools.bench_input", description=__doc__.split("\n")[0])
    parser.add_argument("--source", help="builtin | imagefolder:<root> | tfds:<name>")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tfds-data-dir", default="")
    parser.add_argument("--batch", type=int, default=64, help="images per host batch")
    parser.add_argument("--steps", type=int, default=20, help="timed batches (after one warm-up batch)")
    parser.add_argument("--threads", type=int, default=1, help="host threads building batches")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--num-masked", type=int, default=118)
    parser.add_argument("--crop-min", type=float, default=0.08)
    parser.add_argument("--baseline", action="store_true", help="also time the official-style host pipeline "
                        "(imagefolder sources; needs torchvision)")
    parser.add_argument("--make-jpegs", metavar="DIR", help="write --count photo-like 500x375 JPEGs in the "
                        "image-folder layout under DIR, then exit")
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)

    if args.make_jpegs:
        from siim_jax.tools.make_jpegs import write_image_folder
        classes = 10
        write_image_folder(args.make_jpegs, classes, -(-args.count // classes))
        print(f"wrote {classes * -(-args.count // classes)} JPEGs under {args.make_jpegs}/train; benchmark them "
              f"with --source imagefolder:{args.make_jpegs}")
        return
    if not args.source:
        parser.error("--source is required (or --make-jpegs DIR)")
    for name in ("batch", "steps", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}={getattr(args, name)} must be > 0")
    data = ConfigDict({"source": args.source, "split": args.split, "tfds_data_dir": args.tfds_data_dir,
                       "num_train": args.batch * (args.steps + 1), "raw_size": 256, "num_classes": 10})
    try:
        source = open_source(data, seed=0)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    grid = args.image_size // args.patch_size
    cores = min(args.threads, os.cpu_count() or 1)
    print(f"source {args.source}: {len(source)} examples; views {args.image_size}px, grid {grid}, "
          f"{args.num_masked} masked, crop_min {args.crop_min}; {cores} thread(s) on {os.cpu_count()} cores",
          flush=True)
    if args.baseline:
        if not hasattr(source, "paths"):
            parser.error("--baseline reads files: use an imagefolder: source")
        try:
            timed = time_baseline(source.paths, args.steps, args.batch, args.image_size, grid, args.num_masked,
                                  args.crop_min)
        except ValueError as e:  # re-raised from the DataLoader worker (see _OfficialStyleDataset)
            print("error: " + " ".join(str(e).split()) + " (run without --baseline to skip bad files)",
                  file=sys.stderr)
            sys.exit(1)
        baseline = _report("official-style (PIL + torchvision, one DataLoader worker)", timed, 1)
    batches = TwoViewBatches(source, args.batch, args.image_size, args.patch_size, args.num_masked, args.crop_min,
                             seed=0, num_threads=args.threads)
    result = time_pipeline(batches, args.steps)
    ours = _report(f"siim_jax host pipeline ({args.threads} thread(s))", result, cores)
    if result["skipped"]:
        print(f"skipped undecodable images: {result['skipped']}")
    if args.baseline:
        print(f"speed-up per core over the official-style host pipeline: {ours / baseline:.2f}x")
    print(f"images_per_sec_per_core: {ours:.1f}", flush=True)


if __name__ == "__main__":
    main()
