"""Command line: export a saved train state to a PyTorch checkpoint.

    python -m siim_jax.export --workdir <dir> --out <file> [--format pth|safetensors] [--step N]
                              [--branch online|target] [--full]

Default: the encoder under timm / MAE key names, {'model': state_dict} in a .pth (needs torch) or a flat
.safetensors file (needs no torch); timm's VisionTransformer (global_pool='avg') and the MAE / SiameseIM
fine-tuning code load it with only their fresh head and fc_norm missing. --full: the whole pretraining state under
the official SiameseIM key names (target branch under mm_*, BatchNorm running statistics included), which the
official model loads with strict key matching. Any saved step, whatever mesh it was trained on. --workdir and
--out may be on gs:// (siim_jax.storage); an object-store failure is one error line, exit 1.
"""

import argparse
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m siim_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="directory written by python -m siim_jax.train")
    parser.add_argument("--out", required=True, help="output file (.pth or .safetensors)")
    parser.add_argument("--format", choices=("pth", "safetensors"), default=None,
                        help="file format; default: from the --out suffix (.safetensors, else pth)")
    parser.add_argument("--step", type=int, default=None, help="saved step to export; default: the newest")
    parser.add_argument("--branch", choices=("online", "target"), default="online",
                        help="which encoder the encoder export reads (the EMA target is often the better one)")
    parser.add_argument("--full", action="store_true", help="the whole pretraining state, official key names")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    file_format = args.format or ("safetensors" if args.out.endswith(".safetensors") else "pth")
    # imported after argument parsing so that --help is fast
    from siim_jax.interop import CheckpointFileError, export_state_dict, load_workdir_state, write_state_dict
    from siim_jax import storage
    from siim_jax.cli import RunError, fail
    from siim_jax.interop.files import require_torch
    from siim_jax.train.checkpoint import CheckpointMismatchError

    try:
        out_is_folder = storage.isdir(args.out)
    except RunError as error:  # the object store of --out cannot be reached
        fail(str(error), 1)
    if out_is_folder:
        fail(f"--out {args.out} is a directory; give a file path, e.g. "
             f"{storage.join(args.out, 'weights.' + file_format)}", 2)
    try:
        if file_format == "pth":
            require_torch("--format pth")
        if args.full and args.branch != "online":
            raise ValueError("--full exports both branches; --branch only selects the encoder of an encoder export")
        print(f"restoring {'the newest step' if args.step is None else f'step {args.step}'} from {args.workdir}",
              flush=True)
        method, state = load_workdir_state(args.workdir, args.step)
        kind = "full" if args.full else "encoder"
        state_dict = export_state_dict(method, state, kind, args.branch)
        print(f"writing {len(state_dict)} arrays to {args.out}", flush=True)
        write_state_dict(state_dict, args.out, file_format)
    except (CheckpointFileError, ValueError) as error:  # bad workdir, step, format or option combination
        fail(str(error), 2)
    except (CheckpointMismatchError, RunError) as error:  # RunError: e.g. storage.ObjectStoreError
        fail(str(error), 1)
    except OSError as error:  # writing --out: read-only folder, full disk ...
        fail(f"cannot write {args.out}: {error.strerror or error}", 1)
    what = "full pretraining state" if args.full else f"{args.branch} encoder"
    print(f"exported the {what} of step {int(state.step)} ({len(state_dict)} arrays, {file_format}) to {args.out}",
          flush=True)


if __name__ == "__main__":
    main()
