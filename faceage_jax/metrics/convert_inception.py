"""Converts pytorch-fid's Inception weights (.pth) to an .npz that needs no pickle to read.

    python -m faceage_jax.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth \
        inception-2015-12-05.npz

The .pth is read by the restricted reader (`torch_weights`), checked key by key
and shape by shape against the network, and written with the same keys (less
the classifier's, which the features do not use).
"""

import argparse
import pathlib

from faceage_jax.metrics import inception, torch_weights


def convert(source: pathlib.Path, target: pathlib.Path) -> int:
    variables = inception.load_variables(source)  # .pth (or an .npz), checked.
    converted = inception.state_dict_from_variables(variables)
    torch_weights.save_npz(converted, target)
    return len(converted)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=pathlib.Path, help="pytorch-fid's .pth file")
    parser.add_argument("target", type=pathlib.Path, help="the .npz to write")
    args = parser.parse_args(argv)
    count = convert(args.source, args.target)
    print(f"Wrote {count} arrays to {args.target}")


if __name__ == "__main__":
    main()
