"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) as the ImageFolder tree README's real-data table uses.

    python tests/fashion_mnist.py --idx DIR data/fmnist20k --train-per-class 2000

DIR holds the data set's four public files: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (https://github.com/zalandoresearch/fashion-mnist,
data/fashion/; on Debian, `apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist*.deb x`
puts them in x/usr/share/datasets/fashion-mnist). Writes OUT/train/<class>/NNNNN.png from the 60,000
training images (the first N of each class, in file order) and OUT/val/<class>/NNNNN.png from all 10,000
test images: grey copied to 3 channels, zero-padded from 28 to 32 px. Deterministic.
"""
import argparse
import gzip
import os

import numpy as np
from PIL import Image

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def idx(path):
    """An IDX file's array: magic (0, 0, dtype 0x08 = uint8, ndim), ndim big-endian uint32 sizes, the data."""
    data = gzip.open(path).read()
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def write(images, labels, out, per_class, size=32):
    count = np.zeros(len(CLASSES), int)
    pad = (size - images.shape[1]) // 2
    for img, c in zip(images, labels):
        if per_class and count[c] >= per_class:
            continue
        os.makedirs(os.path.join(out, CLASSES[c]), exist_ok=True)
        grey = np.pad(img, pad)
        Image.fromarray(np.stack([grey] * 3, -1)).save(os.path.join(out, CLASSES[c], f"{count[c]:05d}.png"))
        count[c] += 1
    return count.sum()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--idx", required=True, help="folder with the four *-ubyte.gz files")
    p.add_argument("--train-per-class", type=int, default=0, help="0: all 6,000")
    a = p.parse_args()
    n = write(idx(f"{a.idx}/train-images-idx3-ubyte.gz"), idx(f"{a.idx}/train-labels-idx1-ubyte.gz"),
              os.path.join(a.out, "train"), a.train_per_class)
    m = write(idx(f"{a.idx}/t10k-images-idx3-ubyte.gz"), idx(f"{a.idx}/t10k-labels-idx1-ubyte.gz"),
              os.path.join(a.out, "val"), 0)
    print(f"{a.out}: {n} training and {m} validation images")
